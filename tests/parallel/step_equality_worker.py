"""Run in a subprocess with 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
the γ-MoD training step of a tiny config on one device, sharded on several meshes
(pjit) and with pmap; prints one JSON line of losses and parameter errors.

    python -m tests.parallel.step_equality_worker RECIPE MESH [MESH ...]
    MESH: "1x1x1" (one device), "DxFxT" (data x fsdp x tensor), or "pmap"
A `_distill` recipe distils from a dense teacher of another seed (saved to a temporary
checkpoint), its parameters sharded or replicated like the student's.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.train.optim import make_optimizer
from gamma_mod_jax.train.trainer import make_step_runner, model_for_training
from tests.parallel import synthetic_data

BATCH = 8
STEPS = 2
LOSS_KEYS = ("loss", "lm_loss", "routing_loss", "grad_norm", "distill_loss", "teacher_agreement")


def run(config, graphdef, rest, tx, params, batches, mesh: str, teacher=None) -> dict:
    config = config.copy_and_resolve_references()
    devices = None
    if mesh == "pmap":
        config.parallelism = "pmap"
    else:
        d, f, t = (int(v) for v in mesh.split("x"))
        config.mesh = dict(data=d, fsdp=f, tensor=t)
        devices = jax.devices()[: d * f * t]
    runner = make_step_runner(config, graphdef, rest, tx, params, log=lambda *_: None, devices=devices,
                              teacher=teacher)
    state, losses = runner.state, []
    for batch in batches:
        state, metrics = runner.step(state, batch)
        host = runner.to_host(metrics)
        losses.append({k: float(np.asarray(host[k])) for k in LOSS_KEYS + ("skip_ratio",) if k in host})
    state = runner.to_checkpoint(state)
    flat = {jax.tree_util.keystr(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)}) if mesh != "pmap" else []
    return {"losses": losses, "params": flat, "specs": specs}


def main(recipe: str, meshes):
    jax.config.update("jax_default_matmul_precision", "highest")
    config = load_config(f"configs/train.py:{recipe}")
    config.data.batch_size = BATCH
    # eps >> |g| makes Adam's update lr * m / eps, linear in the gradient: with the default
    # eps, gradients that are zero up to rounding noise (e.g. CLIP's key biases, to which
    # softmax is invariant) become full +-lr steps of random sign in any two runs that
    # sum in a different order, sharded or not. lr 1 keeps the updates visible.
    config.optim.eps = 1.0
    config.optim.learning_rate = 1.0
    model = model_for_training(config, log=lambda *_: None)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _, _ = make_optimizer(config.optim, params, int(config.train.num_steps))
    size = model.config.input_image_size
    batches = [synthetic_data.batch(i * BATCH, BATCH, size) for i in range(STEPS)]
    teacher = None
    if config.distill.coef > 0:
        import dataclasses
        import os
        import tempfile

        from gamma_mod_jax import api as gm
        from gamma_mod_jax.convert.checkpoint import save_checkpoint
        from gamma_mod_jax.train.distill import load_teacher

        path = os.path.join(tempfile.mkdtemp(), "teacher")
        save_checkpoint(path, gm.build_model(dataclasses.replace(model.config, mod=None), seed=5))
        config.distill.teacher_checkpoint = path
        teacher = load_teacher(config, model.config, log=lambda *_: None)
    results = {m: run(config, graphdef, rest, tx, params, batches, m, teacher) for m in meshes}
    reference = results[meshes[0]]
    initial = {jax.tree_util.keystr(p): np.asarray(x, np.float64)
               for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    report = {}
    for mesh, result in results.items():
        errors = {}
        for key, ref in reference["params"].items():
            got = result["params"][key]
            errors[key] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
        worst = max(errors, key=errors.get)
        # the updates of all parameters together (new - initial)
        want = np.concatenate([(reference["params"][k] - initial[k]).ravel() for k in initial])
        got = np.concatenate([(result["params"][k] - initial[k]).ravel() for k in initial])
        update_err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        loss_err = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for a, b in zip(result["losses"], reference["losses"])
                       for k in LOSS_KEYS if k in b)
        report[mesh] = {"losses": [l["loss"] for l in result["losses"]], "loss_rel_err": loss_err,
                        "param_rel_err": errors[worst], "worst_param": worst,
                        "update_rel_err": update_err, "update_norm": float(np.linalg.norm(want)), "specs": result["specs"],
                        "skip_ratio": [l["skip_ratio"] for l in result["losses"]],
                        "distill_loss": [l.get("distill_loss") for l in result["losses"]]}
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
