"""Per-device memory of the train state under FSDP, from the compiled training step.

    python -m launch.sharding_memory [--config configs/train.py:llava15_7b_mod0.3,tiny] \
        [--devices 1,2,4,8] [--axis fsdp] [--batch-per-device 1] [--length 48]

For each N the step is compiled (never run: parameters are abstract, so a 7B model
costs no memory) on a mesh of N simulated CPU devices with the given axis of size N
(the rest 1), and prints per device: the parameters and optimizer state by their
shardings, the compiled executable's argument bytes (that state plus the batch slice)
and temporary bytes (XLA's buffer assignment). Under FSDP the state shrinks about 1/N;
what stays is the replicated remainder (vectors, dimensions N does not divide).
"""

from __future__ import annotations

import functools
import json
import os
import sys

from launch._common import parse_args, parser as make_parser


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--config", default="configs/train.py:llava15_7b_mod0.3,tiny", help="training config: configs/<file>.py[:arg]")
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--axis", default="fsdp", choices=("data", "fsdp", "tensor"), help="the mesh axis the devices go to")
    parser.add_argument("--batch-per-device", type=int, default=1, help="examples per device")
    parser.add_argument("--length", type=int, default=48, help="text length of the batch")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parse_args(parser, argv)
    counts = [int(n) for n in args.devices.split(",")]
    if "jax" in sys.modules:
        raise SystemExit("run as a program: the device count is set before jax is imported")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(counts)} {os.environ.get('XLA_FLAGS', '')}"

    import jax
    import numpy as np
    from flax import nnx

    from gamma_mod_jax import api
    from gamma_mod_jax.config_file import load_config
    from gamma_mod_jax.parallel.mesh import make_mesh
    from gamma_mod_jax.parallel.sharding import batch_sharding, replicated
    from gamma_mod_jax.train.optim import make_optimizer
    from gamma_mod_jax.train.step import train_step
    from gamma_mod_jax.train.trainer import sharding_rules, train_state_shardings

    config = load_config(args.config)
    model = api.abstract_model(api.model_config(config.model))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    tx, _, _ = make_optimizer(config.optim, params, int(config.train.num_steps))
    size = model.config.input_image_size
    rows = []
    for n in counts:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, args.axis: n}, jax.devices()[:n])
        shardings, abstract = train_state_shardings(params, tx, mesh, sharding_rules(config), log=lambda *_: None)
        b = args.batch_per_device * n
        shapes = {"input_ids": ((b, args.length), np.int32), "attention_mask": ((b, args.length), np.int32),
                  "labels": ((b, args.length), np.int32), "token_types": ((b, args.length), np.int32),
                  "pixel_values": ((b, size, size, 3), np.float32)}
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape))
                 for k, (shape, dtype) in shapes.items()}
        step = jax.jit(functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx),
                       in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}),
                       out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
        compiled = step.lower(abstract, batch).compile()
        stats = compiled.memory_analysis()
        shard_bytes = lambda x: int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        params_b = sum(shard_bytes(x) for x in jax.tree.leaves(abstract.params))
        opt_b = sum(shard_bytes(x) for x in jax.tree.leaves(abstract.opt_state))
        batch_b = sum(shard_bytes(x) for x in jax.tree.leaves(batch))
        rows.append({"devices": n, "params_bytes": params_b, "optimizer_bytes": opt_b, "batch_bytes": batch_b,
                     "argument_bytes": int(stats.argument_size_in_bytes),
                     "temp_bytes": int(stats.temp_size_in_bytes),
                     "output_bytes": int(stats.output_size_in_bytes),
                     "alias_bytes": int(stats.alias_size_in_bytes)})
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    if args.json:
        print(json.dumps({"config": args.config, "axis": args.axis, "param_bytes_total": total, "rows": rows}))
        return
    mib = lambda v: f"{v / 2**20:10.2f}"
    print(f"{args.config}: {total / 2**20:.2f} MiB of parameters; {args.axis}=N, per device (MiB):")
    print(f"{'N':>3} {'params':>10} {'optimizer':>10} {'state':>10} {'x N=1':>7} {'compiled args':>14} "
          f"{'(- batch)':>10} {'temp':>10}")
    base = rows[0]["params_bytes"] + rows[0]["optimizer_bytes"]
    for r in rows:
        state = r["params_bytes"] + r["optimizer_bytes"]
        print(f"{r['devices']:>3} {mib(r['params_bytes'])} {mib(r['optimizer_bytes'])} {mib(state)} "
              f"{state / base:7.3f} {mib(r['argument_bytes']):>14} {mib(r['argument_bytes'] - r['batch_bytes'])} "
              f"{mib(r['temp_bytes'])}")


if __name__ == "__main__":
    main()
