"""FLOPs counter: the paper's Table 4, an independent matmul count, the command line."""

import contextlib
import io
import json

import pytest

from gamma_mod_jax.api import model_config
from gamma_mod_jax.mod.flops import decoder_layer_flops, full_model_breakdown, paper_tflops
from gamma_mod_jax.models.config import LlamaConfig
from launch import flops as flops_cli

VICUNA_7B = model_config("configs/llava_hr_7b.py").llm


@pytest.mark.parametrize("skip,expected", [(0.0, 19.16), (0.379, 12.59), (0.577, 9.26)])
def test_paper_table4(skip, expected):
    assert round(paper_tflops(VICUNA_7B, 1400, range(3, 31), skip), 2) == expected


def run_cli(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        flops_cli.main(list(args))
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("skip,expected", [(0.0, 19.16), (0.379, 12.59), (0.577, 9.26)])
def test_cli_reproduces_table4(skip, expected):
    result = run_cli("--config", "configs/llava_hr_7b.py", "--seq-len", "1400", "--skip-ratio", str(skip),
                     "--mod-layers", "3-30")
    assert round(result["tflops_paper"], 2) == expected
    assert result["tflops_full"] > result["tflops_paper"]


def test_decoder_formula_equals_matmul_count():
    s, h, f, heads = 37, 48, 80, 4
    matmuls = [(s, h, h)] * 4 + [(s, h, f)] * 3  # q, k, v, o; gate, up, down
    attention = [(s, s, h // heads)] * heads * 2  # QK^T and AV per head
    assert decoder_layer_flops(s, h, f) == sum(2 * m * n * k for m, n, k in matmuls + attention)


def test_full_model_decoder_part_equals_paper_convention():
    cfg = model_config("configs/llava_hr_7b.py")
    parts = full_model_breakdown(cfg, 1400, 0.379, range(3, 31))
    assert parts["llm_decoder"] == pytest.approx(paper_tflops(cfg.llm, 1400, range(3, 31), 0.379))
    assert {"vision_clip", "vision_convnext", "vision_adapters", "vision_fusion", "projector", "lm_head"} <= set(parts)


@pytest.mark.parametrize("args", [["--skip-ratio", "1.0"], ["--skip-ratio", "-0.1"], ["--mod-layers", "3-40"],
                                  ["--mod-layers", "x"]])
def test_bad_arguments_exit_nonzero(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flops_cli.main(["--config", "configs/llava_hr_7b.py", *args])
    assert exit_info.value.code != 0
    assert "error" in capsys.readouterr().err
