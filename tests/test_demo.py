"""`make demo` end to end at smoke-test length: every stage runs and the report is complete."""

import json
import os

import pytest

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
