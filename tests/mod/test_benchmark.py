"""The benchmark command writes its results atomically with the documented keys.
(Speed itself is measured by running it, never asserted in tests.)"""

import json

import pytest

from launch import benchmark


def test_benchmark_cli_writes_results(tmp_path):
    out = tmp_path / "results.json"
    benchmark.main(["--config", "configs/benchmark.py:tiny", "--out", str(out)])
    results = json.loads(out.read_text())
    for phase in ("prefill", "train_step"):
        assert results[phase]["speedup"] > 0
        assert results[phase]["ideal_speedup"] > 1
        assert results[phase]["dense"]["median_s"] > 0
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
