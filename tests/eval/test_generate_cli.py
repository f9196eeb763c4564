"""launch.generate: answers equal gm.generate on the same batch (mixed prompt lengths, an
image-less prompt), bad lines reported by line number while the rest are answered, bad
command lines rejected with exit status 2."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.checkpoint import save_checkpoint
from gamma_mod_jax.data.conversation import encode_prompt
from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
from gamma_mod_jax.data.image import preprocess_image
from gamma_mod_jax.data.pipeline import collate_prompts
from gamma_mod_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from launch import generate

KEYS = ("input_ids", "attention_mask", "token_types", "pixel_values")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    build_word_tokenizer(easy_vqa_vocabulary(), str(root / "tok"))
    cfg = gm.model_config("configs/llava15_7b.py:tiny,mod")
    model = gm.build_model(cfg, seed=2)
    save_checkpoint(str(root / "ckpt"), model)
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.png", (17, 50))):  # not the model's size: resized as in training
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"not a png")
    return root, model, load_tokenizer(str(root / "tok"))


def expected_answers(model, tokenizer, requests, root, batch_size, new):
    size = model.config.input_image_size
    examples = []
    for prompt, image in requests:
        enc = encode_prompt(prompt, tokenizer, has_image=image is not None, image_token_index=-200)
        pixels = (preprocess_image(Image.open(root / image), size) if image else np.zeros((size, size, 3), np.float32))
        examples.append({**enc, "pixel_values": pixels})
    batch = collate_prompts(examples, batch_size=batch_size, buckets=(64,))
    tokens = np.asarray(gm.generate(model, {k: jnp.asarray(batch[k]) for k in KEYS}, max_new_tokens=new, eos_id=2))
    answers = []
    for row in tokens[:len(requests)]:
        row = [int(t) for t in row]
        answers.append(tokenizer.decode(row[:row.index(2)] if 2 in row else row, skip_special_tokens=True).strip())
    return answers


@pytest.mark.slow
def test_jsonl_answers_equal_generate_and_bad_lines_are_reported(setup, capsys):
    root, model, tokenizer = setup
    good = [("what color is the shape", "a.png"), ("is there a red circle in the image", "b.png"),
            ("what shape is it", None)]
    lines = [json.dumps({"id": "q0", "prompt": good[0][0], "image": good[0][1]}),
             json.dumps({"id": "missing", "prompt": "what shape", "image": "nowhere.png"}),
             json.dumps({"prompt": good[1][0], "image": good[1][1]}),
             "",
             json.dumps({"id": "broken", "prompt": "what shape", "image": "broken.png"}),
             json.dumps({"id": "empty", "prompt": "  ", "image": "a.png"}),
             json.dumps({"id": "no_prompt", "image": "a.png"}),
             "{not json",
             json.dumps({"id": "q2", "question": good[2][0]})]
    (root / "in.jsonl").write_text("\n".join(lines) + "\n")
    rc = generate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--jsonl",
                        str(root / "in.jsonl"), "--batch-size", "4", "--buckets", "64", "--max-new-tokens", "4",
                        "--out", str(root / "answers.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2
    out = [json.loads(line) for line in (root / "answers.jsonl").read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 5, 6, 7, 8, 9]
    answered = [o for o in out if "answer" in o]
    assert [o["id"] for o in answered] == ["q0", 3, "q2"]
    assert [o["answer"] for o in answered] == expected_answers(model, tokenizer, good, root, 4, 4)
    path = str(root / "in.jsonl")
    for line, words in ((2, "nowhere.png"), (5, "unreadable image"), (6, "no prompt"), (7, "no prompt"),
                        (8, "not a JSON object")):
        assert f"{path}:{line}: " in err and words in err.split(f"{path}:{line}: ")[1].splitlines()[0]
    figures = json.loads([l for l in err.splitlines() if l.startswith("{")][-1])
    assert figures["prompts"] == 3 and figures["prefill_ms"] > 0 and figures["decode_tokens_per_s"] > 0
    assert set(figures["prompt_skip"]) >= {"skip_ratio", "skip_image"}


@pytest.mark.slow
def test_single_prompt_streams_the_generated_answer(setup, capsys):
    root, model, tokenizer = setup
    rc = generate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--prompt",
                        "what color is the shape", "--image", str(root / "a.png"), "--buckets", "64",
                        "--max-new-tokens", "4"])
    assert rc == 0
    want = expected_answers(model, tokenizer, [("what color is the shape", "a.png")], root, 1, 4)[0]
    assert capsys.readouterr().out.strip() == want


@pytest.mark.parametrize("argv, words", [
    ([], "either --prompt"),
    (["--prompt", "hi", "--jsonl", "x.jsonl"], "either --prompt"),
    (["--prompt", "what shape", "--image", "/nowhere/img.png"], "/nowhere/img.png: image file not found"),
    (["--prompt", " "], "no prompt"),
    (["--jsonl", "/nowhere/in.jsonl"], "/nowhere/in.jsonl: file not found"),
    (["--prompt", "hi", "--buckets", "a,b"], "--buckets"),
])
def test_bad_command_lines_exit_2(setup, capsys, argv, words):
    root, _, _ = setup
    rc = generate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
