"""bf16 compute on fp32 master weights (the stage-2 recipes' setting) trains and stays close
to the fp32 run."""

import numpy as np

from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.train.metrics import read_metrics
from gamma_mod_jax.train.trainer import train
from tests.train.test_trainer import synthetic_iterator


def test_bf16_compute_with_fp32_master_weights(tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = load_config("configs/train.py:llava15_7b_mod0.3,tiny")
        config.model.dtype = dtype
        config.train.num_steps = 3
        out = train(config, str(tmp_path / dtype), make_data_iterator=synthetic_iterator(2), log=lambda *_: None)
        runs[dtype] = (read_metrics(tmp_path / dtype), out["state"])
    params = runs["bfloat16"][1].params.to_pure_dict()
    kernel = params["llm"]["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == np.float32  # master weights stay fp32
    fp32 = [r["loss"] for r in runs["float32"][0]]
    bf16 = [r["loss"] for r in runs["bfloat16"][0]]
    assert all(np.isfinite(bf16)) and all(r["finite"] for r in runs["bfloat16"][0])
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2)
