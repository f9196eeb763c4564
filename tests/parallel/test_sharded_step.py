"""The γ-MoD training step sharded over 8 simulated CPU devices (data x fsdp x tensor
meshes, and pmap) equals the single-device step: losses and updated parameters."""

import sys

from tests.parallel.helpers import child_env, result_line, run

RECIPE = "llava15_7b_mod0.3,tiny"  # hidden 64, 4 heads, MLP 128, vocab 256; CLIP 32 wide


def equality(*meshes):
    proc = run([sys.executable, "-m", "tests.parallel.step_equality_worker", RECIPE, *meshes],
               env=child_env(devices=8), timeout=900)
    return result_line(proc.stdout)


def check_equal(report, reference):
    for mesh, r in report.items():
        if mesh == reference:
            continue
        assert r["loss_rel_err"] < 1e-5, (mesh, r)
        assert r["param_rel_err"] < 1e-5, (mesh, r)   # every parameter, after two updates
        assert r["update_rel_err"] < 1e-5, (mesh, r)  # all updates together
        # γ-MoD routing ran (1 of the 6 routable tokens of each example skips each MoD
        # layer) and chose the same tokens: skip ratios are counts over the global batch
        assert r["skip_ratio"] == report[reference]["skip_ratio"] and r["skip_ratio"][0] > 0.01, (mesh, r)


def test_pjit_meshes_equal_the_single_device_step():
    report = equality("1x1x1", "8x1x1", "1x8x1", "2x2x2", "1x2x4")
    check_equal(report, "1x1x1")
    # the parameters really are sharded as the rules say
    assert report["1x1x1"]["specs"] == ["P()"]
    assert "P('fsdp',)" not in report["8x1x1"]["specs"] and report["8x1x1"]["specs"] == ["P()"]
    assert {"P('fsdp', 'tensor')", "P('tensor', 'fsdp')"} <= set(report["2x2x2"]["specs"])  # q/up, o/down, vocab
    assert {"P('fsdp', 'tensor')", "P('tensor', 'fsdp')"} <= set(report["1x2x4"]["specs"])
    assert "P(None, 'fsdp')" in report["1x8x1"]["specs"]


def test_pmap_equals_the_pjit_data_parallel_step():
    report = equality("8x1x1", "pmap")
    check_equal(report, "8x1x1")
