"""One process of the 2-process model checkpoint test: a tiny γ-MoD model with its
parameters sharded over every device of both processes (FSDP), saved with save_checkpoint
and restored with load_checkpoint onto the same shardings; prints a RESULT line.

    python -m tests.parallel.checkpoint_worker DIR COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID
"""

from __future__ import annotations

import json
import sys


def main(directory: str, address: str, count: int, index: int) -> None:
    from gamma_mod_jax.parallel.distributed import initialize

    initialize(address, count, index, heartbeat_timeout_s=60)
    import jax
    import numpy as np
    from flax import nnx

    from gamma_mod_jax import api as gm
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, save_checkpoint
    from gamma_mod_jax.convert.keymap import param_paths
    from gamma_mod_jax.parallel.mesh import make_mesh
    from gamma_mod_jax.parallel.sharding import param_shardings, place

    model = gm.build_model(gm.model_config("configs/llava15_7b.py:tiny,mod"), seed=3)  # the same in each process
    want = {path: np.asarray(var.get_value()) for path, var in param_paths(model)}
    mesh = make_mesh(dict(data=1, fsdp=-1, tensor=1))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, place(params, param_shardings(params, mesh, log=lambda *_: None)))
    shardings = {path: var.get_value().sharding for path, var in param_paths(model)}
    split = sum(not var.get_value().is_fully_addressable for _, var in param_paths(model))
    save_checkpoint(directory, model)
    restored = load_checkpoint(directory, sharding_for=lambda path, leaf: shardings[path])
    compared, worst, same_sharding = 0, 0.0, True
    for path, var in param_paths(restored):
        value = var.get_value()
        same_sharding &= value.sharding == shardings[path]
        for shard in value.addressable_shards:  # this process's slices only
            expected = want[path][shard.index]
            worst = max(worst, float(np.max(np.abs(np.asarray(shard.data) - expected), initial=0.0)))
            compared += 1
    print("RESULT " + json.dumps({"process": jax.process_index(), "split_params": split, "params": len(want),
                                  "compared_shards": compared, "max_abs_error": worst,
                                  "same_sharding": bool(same_sharding)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
