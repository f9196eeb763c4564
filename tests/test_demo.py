"""`make demo` end to end at smoke-test length: every stage runs and the report is complete."""

import json
import os

import numpy as np
import pytest

from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.eval.vqa import normalise_answer
from launch import demo


def test_normalise_answer():
    assert normalise_answer("  Circle.") == "circle"
    assert normalise_answer("No!") == normalise_answer("no")
    assert normalise_answer("dark  blue") == "dark blue"
    assert normalise_answer("circle") != normalise_answer("circles")


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    report = demo.main(["--out", str(out), "--quick"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["quick"] is True and saved == json.loads(json.dumps(report))
    for key in demo.REPORT_KEYS:
        section, _, name = key.partition(".")
        value = saved[section][name] if name else saved[section]
        assert isinstance(value, float), key
    assert 0.0 <= saved["dense"]["accuracy"] <= 1.0
    g = saved["gamma_mod"]
    assert g["mod_layers"] and g["dense_layers"] and not set(g["mod_layers"]) & set(g["dense_layers"])
    # capacity inference skips the routing ratio's share of the routable prefix
    assert 0.1 < g["skip_ratio"] < 0.7
    assert saved["tflops_gamma_mod"] < saved["tflops_dense"]
    assert len(g["image_patches_kept_per_layer"]) == len(g["mod_layers"])
    for name in ("report.md", "loss.png", "arank.png", "arank.json", "routing_maps.png"):
        assert (out / name).stat().st_size > 0, name
    assert "![loss.png](loss.png)" in (out / "report.md").read_text()
    # a second run replaces the previous demo output; a foreign directory is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(foreign), "--quick"])
    assert os.listdir(foreign) == ["notes.txt"]


# The shortest demo that still runs every stage on a different model from --quick's, so
# the repeat compares real work: two LLM layers routed, ARank over two batches.
TINY_DEMO = ("configs/demo.py:model.llm.num_hidden_layers=4,model.llm.hidden_size=64,model.llm.intermediate_size=128,"
             "demo.arank_batches=2")


def _figures(report):
    """What a run must reproduce exactly: accuracies, answers, layer choices, ARank, losses."""
    d, g = report["dense"], report["gamma_mod"]
    return {"dense": (d["accuracy"], d["final_lm_loss"]), "arank": report["arank"],
            "layers": (g["mod_layers"], g["dense_layers"]),
            "gamma_mod": (g["accuracy"], g["skip_ratio"], g["final_lm_loss"], g["image_patches_kept_per_layer"]),
            "vision": report["vision_pretraining"], "answers": [e["prediction"] for e in report["examples"]]}


@pytest.mark.slow
def test_same_seed_same_figures(tmp_path, capsys):
    first = demo.main(["--out", str(tmp_path / "a"), "--quick", "--seed", "3", "--config", TINY_DEMO])
    second = demo.main(["--out", str(tmp_path / "b"), "--quick", "--seed", "3", "--config", TINY_DEMO])
    assert _figures(first) == _figures(second)
    # the runs did train: losses and ARank are real numbers, not a constant
    assert np.isfinite(first["dense"]["final_lm_loss"]) and len(set(first["arank"])) > 1
    assert len(first["gamma_mod"]["mod_layers"]) == 2
    # --quick says its figures are not the README's, in the output and in both reports
    assert first["note"] == demo.QUICK_NOTE and demo.QUICK_NOTE in capsys.readouterr().out
    assert demo.QUICK_NOTE in (tmp_path / "a" / "report.md").read_text()
    # the report names the machine and times every stage
    assert first["machine"]["cores"] >= 1 and first["machine"]["jax_backend"] == "cpu"
    names = [s["name"] for s in first["stages"]]
    assert names == [name for name, _ in demo.stage_plan(load_config(TINY_DEMO))]
    assert all(s["seconds"] > 0 and s["cpu_seconds"] >= 0 for s in first["stages"])
    assert first["seconds"] >= sum(s["seconds"] for s in first["stages"]) * 0.99


def test_stage_clock_estimates_from_the_stages_so_far(monkeypatch):
    now = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(demo.time, "perf_counter", lambda: now["wall"])
    monkeypatch.setattr(demo.time, "process_time", lambda: now["cpu"])
    lines = []
    clock = demo.StageClock([("a", 10.0), ("b", 20.0), ("c", 30.0)], log=lambda text, **_: lines.append(text))
    clock.start(0, "stage a")
    assert "~60 s left in all" in lines[-1] and "reference machine" in lines[-1]
    now.update(wall=25.0, cpu=40.0)  # stage a took 2.5x its reference
    clock.start(1, "stage b")
    assert "this stage ~50 s" in lines[-1] and "~125 s left in all" in lines[-1] and "x 2.50" in lines[-1]
    now.update(wall=35.0, cpu=50.0)  # b: 10 s against 20: (25 + 10) / (10 + 20)
    clock.start(2, "stage c")
    assert "~35 s left in all" in lines[-1]
    now.update(wall=36.0)
    clock.finish()
    assert [(s["name"], s["seconds"], s["cpu_seconds"]) for s in clock.stages] == [
        ("a", 25.0, 40.0), ("b", 10.0, 10.0), ("c", 1.0, 0.0)]
    assert clock.total() == {"seconds": 36.0, "cpu_seconds": 50.0}


def test_demo_config_overrides():
    config = load_config("configs/demo.py:steps=12,data.buckets=(96,),model.clip.patch_size=4,lr=3e-4,"
                         "data.easy_vqa_questions=balanced")
    assert config.train.num_steps == 12 and tuple(config.data.buckets) == (96,)
    assert config.model.clip["patch_size"] == 4 and config.optim.learning_rate == 3e-4
    assert config.data.easy_vqa_questions == "balanced"
    for bad, named in (("train.num_stepz=3", "num_stepz"), ("steps=many", "train.num_steps"), ("speed=2", "speed"),
                       ("steps", "key=value")):
        with pytest.raises(ValueError, match=named):
            load_config(f"configs/demo.py:{bad}")


def _report(seed, dense, gamma, seconds):
    stages = [{"name": "dense_training", "seconds": seconds, "cpu_seconds": 2 * seconds}]
    return {"seed": seed, "quick": False, "sequence_length": 111, "dense": {"accuracy": dense},
            "gamma_mod": {"accuracy": gamma, "skip_ratio": 0.46, "routing_ratio": 0.5, "mod_layers": [1, 2, 3, 5]},
            "tflops_dense": 2e-4, "tflops_gamma_mod": 1e-4, "prefill_speedup": 1.3, "seconds": seconds,
            "cpu_seconds": 2 * seconds, "stages": stages, "machine": {"cpu": "test CPU", "cores": 2}}


def test_summarize_gives_mean_spread_and_targets(tmp_path, capsys):
    reports = [_report(0, 0.90, 0.91, 600.0), _report(1, 0.94, 0.93, 700.0), _report(2, 0.95, 0.945, 950.0)]
    for r in reports:
        (tmp_path / f"s{r['seed']}").mkdir()
        (tmp_path / f"s{r['seed']}" / "report.json").write_text(json.dumps(r))
    text = demo.main(["--summarize"] + [str(tmp_path / f"s{i}") for i in range(3)])
    # mean 0.93; deviations -0.03, 0.01, 0.02: std sqrt(0.0014 / 3) = 0.0216
    assert "| dense | 0.930 ± 0.022 [0.900, 0.950] |" in text
    assert "seconds in all: 750 ± 147 [600, 950]" in text  # sqrt(((150)^2 + 50^2 + 200^2) / 3) = 147.2
    assert "seed 0: missed dense >= 0.92 (machine: test CPU, 2 cores)" in text
    assert "seed 1: every target met" in text
    assert "seed 2: missed under 900 s" in text
    assert text in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--summarize", str(tmp_path / "absent")])
    assert exit_info.value.code == 2 and "absent/report.json" in capsys.readouterr().err


def test_summarize_adds_the_distillation_row(tmp_path):
    reports = [_report(i, 0.94, 0.93, 600.0) for i in range(3)]
    for r, accuracy in zip(reports, (0.91, 0.92, 0.93)):
        r["gamma_mod_distill"] = {"accuracy": accuracy, "skip_ratio": 0.46, "coef": 1.0}
        (tmp_path / f"s{r['seed']}").mkdir()
        (tmp_path / f"s{r['seed']}" / "report.json").write_text(json.dumps(r))
    text = demo.main(["--summarize"] + [str(tmp_path / f"s{i}") for i in range(3)])
    # mean 0.92, deviations -0.01, 0, 0.01: std sqrt(0.0002 / 3) = 0.0082; minus dense 0.94: -0.020
    assert "| γ-MoD + distillation (coef 1.0) | 0.920 ± 0.008 [0.910, 0.930] | 0.460 ± 0.000" in text
    assert "γ-MoD + distillation - dense: -0.020 ± 0.008" in text
