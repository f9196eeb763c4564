"""launch.evaluate: generation-based VQA accuracy, checked against a direct greedy decode."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.checkpoint import save_checkpoint
from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
from gamma_mod_jax.data.pipeline import collate_prompts, make_eval_examples
from gamma_mod_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from launch import evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    build_word_tokenizer(easy_vqa_vocabulary(), str(root / "tok"))
    cfg = gm.model_config("configs/llava15_7b.py:tiny,mod")
    model = gm.build_model(cfg, seed=1)
    save_checkpoint(str(root / "ckpt"), model)
    return root, model


def test_accuracy_equals_a_direct_greedy_decode(setup):
    root, model = setup
    tokenizer = load_tokenizer(str(root / "tok"))
    # The tiny model's vocabulary (256) covers the 63-word tokenizer; random weights answer
    # something, and the score must match what a plain greedy decode of each prompt says.
    rc = evaluate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data", "easy_vqa",
                        "--limit", "6", "--batch-size", "4", "--buckets", "64", "--max-new-tokens", "2",
                        "--out", str(root / "res.json")])
    assert rc == 0
    res = json.loads((root / "res.json").read_text())
    assert res["num_examples"] == 6 and len(res["predictions"]) == 6 and 0.0 <= res["skip_ratio"] <= 1.0
    examples = list(make_eval_examples({"source": "easy_vqa", "split": "test", "buckets": (64,)}, tokenizer=tokenizer,
                                       image_size=model.config.input_image_size, limit=6))
    for example, pred in zip(examples, res["predictions"]):
        batch = collate_prompts([example], buckets=(64,))
        tokens = np.asarray(gm.generate(model, {k: jnp.asarray(batch[k]) for k in
                                                ("input_ids", "attention_mask", "token_types", "pixel_values")},
                                        max_new_tokens=2, eos_id=2))[0]
        text = tokenizer.decode([int(t) for t in tokens if int(t) != 2], skip_special_tokens=True).strip()
        assert pred["prediction"] == text and pred["answer"] == example["answer"]
    assert res["accuracy"] == np.mean([p["correct"] for p in res["predictions"]])


def test_bad_data_spec_is_an_error(setup, capsys):
    root, _ = setup
    rc = evaluate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data", "coco",
                        "--out", str(root / "x.json")])
    assert rc == 2 and "coco" in capsys.readouterr().err
    assert not (root / "x.json").exists()
