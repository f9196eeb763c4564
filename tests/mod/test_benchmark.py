"""The benchmark command writes its results atomically with the documented keys.
(Speed itself is measured by running it, never asserted in tests.)"""

import json
import os
import subprocess
import sys

import jax
import pytest

from gamma_mod_jax.eval.benchmark import forward_flops
from gamma_mod_jax.config_file import load_config
from launch import benchmark


def test_benchmark_cli_writes_results(tmp_path):
    out = tmp_path / "results.json"
    benchmark.main(["--config", "configs/benchmark.py:tiny,peak_flops=1e12", "--out", str(out)])
    results = json.loads(out.read_text())
    dense_flops, gamma_flops = forward_flops(load_config("configs/benchmark.py:tiny"))
    for phase, times in (("prefill", 1), ("train_step", 3)):
        assert results[phase]["speedup"] > 0
        assert results[phase]["ideal_speedup"] > 1
        assert results[phase]["dense"]["median_s"] > 0
        for name, flops in (("dense", dense_flops), ("gamma_mod", gamma_flops)):
            timing = results[phase][name]
            assert timing["samples_per_s"] == pytest.approx(1 / timing["median_s"])  # batch 1
            assert timing["model_tflops_per_device"] == pytest.approx(times * flops / timing["median_s"] / 1e12)
            assert timing["mfu"] == pytest.approx(timing["model_tflops_per_device"])  # peak 1 TFLOP/s
    # the distillation step: the student's step plus one teacher forward, and more memory
    distill = results["train_step"]["gamma_mod_distill"]
    assert distill["model_tflops_per_device"] == pytest.approx((3 * gamma_flops + dense_flops) / distill["median_s"] / 1e12)
    # its arguments add exactly the teacher's weights (the dense LLM of the tiny config, fp32,
    # but its token embedding: the benchmark feeds embeddings, so XLA drops that argument)
    from flax import nnx

    from gamma_mod_jax.eval.benchmark import build_models
    teacher = nnx.state(build_models(load_config("configs/benchmark.py:tiny"))[0], nnx.Param).flat_state()
    teacher_mib = sum(x.value.size * 4 for path, x in teacher if path[0] != "embed_tokens") / 2**20
    assert distill["argument_mib"] - results["train_step"]["gamma_mod"]["argument_mib"] == pytest.approx(teacher_mib,
                                                                                                      rel=1e-3)
    threshold = results["prefill_threshold"]
    assert threshold["speedup"] > 0 and threshold["ideal_speedup"] > 1 and 0 < threshold["skip_ratio"] < 1
    kv = results["kv_cache"]
    assert 0 < kv["gamma_mod_bytes"] < kv["dense_bytes"] == sum(kv["dense_bytes_per_layer"])
    decode = results["decode"]["batch_2"]
    assert decode["dense_tokens_per_s"] > 0 < decode["gamma_mod_tokens_per_s"]
    assert results["compile_s"]["prefill"]["gamma_mod_threshold"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


@pytest.mark.slow
def test_benchmark_of_a_checkpoint_uses_its_weights_and_threshold(tmp_path, capsys):
    from gamma_mod_jax import api as gm
    from gamma_mod_jax.convert.checkpoint import save_checkpoint

    model = gm.build_model(gm.model_config("configs/llava15_7b.py:tiny,mod"), seed=3)
    save_checkpoint(str(tmp_path / "ckpt"), model)
    out = tmp_path / "results.json"
    assert benchmark.main(["--config", "configs/benchmark.py:tiny", "--checkpoint", str(tmp_path / "ckpt"),
                           "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert "the checkpoint's own prefill threshold 0.005" in capsys.readouterr().out
    assert results["prefill_threshold"]["threshold"] == 0.005
    assert results["config"]["llm"]["hidden_size"] == model.config.llm.hidden_size
    assert results["config"]["mod"]["layers"] == list(model.config.mod.layers)
    save_checkpoint(str(tmp_path / "dense"), gm.build_model(gm.model_config("configs/llava15_7b.py:tiny")))
    assert benchmark.main(["--checkpoint", str(tmp_path / "dense"), "--out", str(out)]) == 2
    assert "not a γ-MoD model" in capsys.readouterr().err


@pytest.mark.slow  # the cpu config at 1400 tokens: about a minute on a quiet 2-core machine
def test_gpu_run_script_runs_on_the_cpu_config(tmp_path):
    """launch/gpu_benchmark.sh with the cpu config (5 layers: one MoD layer; one timed run,
    no decoding): prefill and training step, samples/s and memory; no MFU on CPU, said once."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", "launch/gpu_benchmark.sh", "configs/benchmark.py:cpu,layers=5,repeats=1,warmup=0,decode=0",
                           str(out)], env=dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["attention"] == "xla" and results["decode"] == {}
    for phase in ("prefill", "train_step"):
        for name in ("dense", "gamma_mod"):
            timing = results[phase][name]
            assert timing["samples_per_s"] > 0 and timing["model_tflops_per_device"] > 0 and timing["mfu"] is None
            assert timing["temp_mib"] > 0
    assert proc.stdout.count("mfu: not reported") == 1 and "samples/s" in proc.stdout


def test_scan_switch_builds_scanned_models_with_the_loops_weights():
    """`scan=1,remat=full`: the benchmark's models are scanned (model.scan_layers) and hold
    the loop's weights layer by layer, so the two compile-time figures compare like for like."""
    import numpy as np

    from gamma_mod_jax.convert.keymap import param_paths
    from gamma_mod_jax.eval.benchmark import build_models

    scanned_config = load_config("configs/benchmark.py:tiny,scan=1,remat=full")
    assert scanned_config.remat == "full" and load_config("configs/benchmark.py:tiny").remat == "none"
    for loop, scanned in zip(build_models(load_config("configs/benchmark.py:tiny")), build_models(scanned_config)):
        assert scanned.scan_layers and not loop.scan_layers
        want = {p: np.asarray(v.get_value()) for p, v in param_paths(loop)}
        got = {p: np.asarray(v.get_value()) for p, v in param_paths(scanned)}
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path])
