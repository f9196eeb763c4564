"""launch.evaluate --benchmark on tiny fixture benchmarks in LLaVA's layout: every benchmark
read and answered, answer and submission files, scores.json and the table, --compare,
resuming an interrupted run, bad input."""

import csv
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax.convert.checkpoint import save_checkpoint
from gamma_mod_jax.data.conversation import encode_prompt
from gamma_mod_jax.data.pipeline import collate_prompts
from gamma_mod_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from gamma_mod_jax.eval.benchmarks import readers
from gamma_mod_jax.eval.benchmarks.runner import encode_question
from gamma_mod_jax.eval.benchmarks.scoring import score_benchmark
from gamma_mod_jax.mod.flops import decoder_layer_flops
from gamma_mod_jax.models import generate as generate_module
from launch import evaluate
from tests.eval.benchmark_fixtures import SA, make_fixture

ANSWERED = {"gqa": 2, "sqa": 2, "textvqa": 1, "pope": 4, "mme": 3, "mmbench": 5, "seed": 1, "mmmu": 2, "vqav2": 2,
            "vizwiz": 1, "mmvet": 1}
# Capacity (top-k) routing: a random router skips nothing under the official thresholds.
COMMON = ["--batch-size", "4", "--buckets", "128", "--max-new-tokens", "2", "--inference", "capacity"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = str(root / "eval")
    words = make_fixture(data)
    tok = build_word_tokenizer(words, str(root / "tok"))
    assert len(tok) < 256  # the tiny model's vocabulary
    gmod = gm.build_model(gm.model_config("configs/llava15_7b.py:tiny,mod"), seed=1)
    save_checkpoint(str(root / "gmod"), gmod)
    save_checkpoint(str(root / "dense"), gm.build_model(gm.model_config("configs/llava15_7b.py:tiny"), seed=2))
    args = ["--benchmark", "all", "--data", data, "--checkpoint", str(root / "gmod"), "--tokenizer", str(root / "tok"),
            "--out", str(root / "out"), "--compare", str(root / "dense"), *COMMON]
    compiled = generate_module._generate._cache_size()
    assert evaluate.main(args) == 0
    # Eleven benchmarks, many batches, one bucket: one generation compile per model.
    assert generate_module._generate._cache_size() - compiled == 2
    scores = json.loads((root / "out" / "scores.json").read_text())
    return root, data, gmod, scores


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_every_benchmark_answered_in_llava_format(run):
    root, data, _, scores = run
    for out in (root / "out", root / "out" / "compare"):
        for name, n in ANSWERED.items():
            lines = _lines(out / name / "answers.jsonl")
            assert len(lines) == n, name
            for r in lines:
                assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r)
    gqa = {r["question_id"]: r for r in _lines(root / "out" / "gqa" / "answers.jsonl")}
    assert set(gqa) == {"201", "202"}  # 203's image is missing; the id-less line is skipped
    assert gqa["202"]["prompt"] == f"Is it big?\n{SA}"  # the suffix added where the file lacks it
    sqa = {r["question_id"]: r["prompt"] for r in _lines(root / "out" / "sqa" / "answers.jsonl")}
    assert sqa == {"s1": "<image>\nContext: A box.\nWhich is red?\nA. box\nB. ball\n"
                         "Answer with the option's letter from the given choices directly.",
                   "s3": "<image>\nWhich shape?\nA. circle\nB. square\nC. line\n"
                         "Answer with the option's letter from the given choices directly."}
    mmb = _lines(root / "out" / "mmbench" / "answers.jsonl")
    assert [(r["question_id"], r["round_id"]) for r in mmb] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert mmb[1]["options"] == ["a dog", "a car", "a cat"] and mmb[1]["option_char"] == ["A", "B", "C"]
    assert mmb[3]["prompt"].startswith("Look at the sizes.\nWhich is larger?\nA. the box\nB. the ball\n")
    mmvet = _lines(root / "out" / "mmvet" / "answers.jsonl")
    assert mmvet[0]["prompt"] == "What is shown?"


def test_submission_files(run):
    root, _, _, _ = run
    out = root / "out"
    text = {r["question_id"]: r["text"] for r in _lines(out / "gqa" / "answers.jsonl")}
    preds = json.loads((out / "gqa" / "testdev_balanced_predictions.json").read_text())
    assert [p["questionId"] for p in preds] == ["201", "202"]
    assert preds[0]["prediction"] == text["201"].rstrip(".").lower()
    upload = json.loads((out / "vqav2" / "answers_upload.json").read_text())
    assert [a["question_id"] for a in upload] == [5001, 5002, 5003] and upload[2]["answer"] == ""
    assert [a["image"] for a in json.loads((out / "vizwiz" / "answers_upload.json").read_text())] == [
        "VizWiz_test_00000000.png"]
    assert list(json.loads((out / "mmvet" / "results.json").read_text())) == ["v1_0"]
    count = (out / "mme" / "mme_results" / "count.txt").read_text().splitlines()
    assert [line.split("\t")[:3] for line in count] == [
        ["0001.png", "Is there one dog? Please answer yes or no.", "Yes"],
        ["0001.png", "Are there two dogs? Please answer yes or no.", "No"]]
    with open(out / "mmbench" / "mmbench_submission.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["index"] for r in rows] == ["0", "1"] and "image" not in rows[0] and "prediction" in rows[0]
    assert [json.loads(line)["question_id"] for line in open(out / "seed" / "answers_upload.jsonl")] == [101]


def test_scores_routing_and_table(run):
    root, data, gmod, scores = run
    main, dense = scores["models"]
    gqa = main["benchmarks"]["gqa"]
    assert gqa["skipped"] == {"missing_image": 1, "no_question_id": 1}
    assert list(gqa["skipped_ids"]["missing_image"]) == ["203"]
    assert gqa["skipped_ids"]["no_question_id"][0].endswith("llava_gqa_testdev_balanced.jsonl:4")
    assert main["benchmarks"]["sqa"]["skipped"] == {"text_only_not_in_sqa_img": 1}
    for name in ("vqav2", "vizwiz", "mmvet"):
        assert main["benchmarks"][name]["scores"] is None and main["benchmarks"][name]["note"]
    tok = load_tokenizer(str(root / "tok"))
    for name in ANSWERED:
        questions = readers.read_benchmark(name, data).questions
        answers = {r["metadata"]["key"]: r["text"] for r in _lines(root / "out" / name / "answers.jsonl")}
        if main["benchmarks"][name]["scores"] is not None:
            assert main["benchmarks"][name]["scores"] == json.loads(json.dumps(score_benchmark(name, questions, answers)))
    # Mean sequence length: prompt tokens - 1 placeholder + image tokens, from the tokenizer directly.
    n_img = gmod.config.num_image_tokens
    lengths = [len(encode_prompt(q.prompt, tok, has_image=True)["input_ids"]) - 1 + n_img
               for q in readers.read_benchmark("pope", data).questions]
    pope_dense = dense["benchmarks"]["pope"]["routing"]
    assert pope_dense["mean_seq_len"] == pytest.approx(np.mean(lengths))
    llm = gmod.config.llm
    s = int(round(np.mean(lengths)))
    assert pope_dense["tflops_paper"] == pytest.approx(llm.num_hidden_layers * (
        8 * s * llm.hidden_size ** 2 + 4 * s * s * llm.hidden_size + 6 * s * llm.hidden_size * llm.intermediate_size)
        / 1e12)
    assert "skip_ratio" not in pope_dense
    routed = main["benchmarks"]["pope"]["routing"]
    n_mod = len(gmod.config.mod.layers)
    kept = int(s * (1 - routed["skip_ratio"]))
    assert 0 < routed["skip_ratio"] < 1 and routed["skip_question"] == 0.0 and routed["skip_answer"] is None
    # Capacity routing skips int(ratio x (image tokens + the config's system-token count))
    # image / system tokens in every MoD layer of every prompt, and nothing else.
    mod = gmod.config.mod
    k = int(mod.routing_ratio * (n_img + mod.system_tokens))
    assert k > 0
    for r in _lines(root / "out" / "pope" / "answers.jsonl"):
        m = r["metadata"]
        assert m["skipped"]["image"] + m["skipped"]["system"] == n_mod * k and m["skipped"]["question"] == 0
        assert m["tokens"]["image"] == n_img and sum(m["tokens"].values()) == m["seq_len"]
    assert routed["skip_ratio"] == pytest.approx(n_mod * k * 4 / (n_mod * sum(lengths)))
    assert routed["tflops_paper"] == pytest.approx(((llm.num_hidden_layers - n_mod) * decoder_layer_flops(s, llm.hidden_size, llm.intermediate_size) + n_mod * decoder_layer_flops(kept, llm.hidden_size, llm.intermediate_size)) / 1e12)
    table = (root / "out" / "table.md").read_text().splitlines()
    assert table[0].startswith("| Model | TextVQA | VQAv2 | GQA | SQA-I | POPE | MME | MMB | SEED-I | MMMU | MM-Vet |")
    assert len(table) == 5 and table[4].startswith("| gmod (γ-MoD, capacity) - dense |")
    assert "| files |" in table[2]  # VQAv2 test-dev: server-scored


def test_answers_equal_a_direct_greedy_decode(run):
    root, data, gmod, _ = run
    tok = load_tokenizer(str(root / "tok"))
    bench = readers.read_benchmark("pope", data)
    examples = [encode_question(q, tok, gmod.config.input_image_size, 128) for q in bench.questions]
    batch = collate_prompts(examples, batch_size=4, buckets=(128,))
    tokens = np.asarray(gm.generate(gmod, {k: jnp.asarray(batch[k]) for k in
                                           ("input_ids", "attention_mask", "token_types", "pixel_values")},
                                    max_new_tokens=2, eos_id=2))
    expected = [tok.decode([int(t) for t in row if int(t) != 2], skip_special_tokens=True).strip() for row in tokens]
    assert [r["text"] for r in _lines(root / "out" / "pope" / "answers.jsonl")] == expected


def test_interrupted_run_resumes_to_the_same_file(run):
    root, data, _, _ = run
    full = (root / "out" / "mmbench" / "answers.jsonl").read_text()
    resumed = root / "resumed"
    (resumed / "mmbench").mkdir(parents=True)
    lines = full.splitlines(keepends=True)
    # Killed while writing: two whole lines (of the first batch of four) and half of the third.
    (resumed / "mmbench" / "answers.jsonl").write_text("".join(lines[:2]) + lines[2][:25])
    args = ["--benchmark", "mmbench", "--data", data, "--checkpoint", str(root / "gmod"), "--tokenizer",
            str(root / "tok"), "--out", str(resumed), *COMMON]
    assert evaluate.main(args) == 0
    assert (resumed / "mmbench" / "answers.jsonl").read_text() == full
    assert evaluate.main(args) == 0  # nothing left to answer: the file stays as it is
    assert (resumed / "mmbench" / "answers.jsonl").read_text() == full


def test_bad_input_is_an_error_and_keeps_answers(run, capsys):
    root, data, _, _ = run
    before = (root / "out" / "gqa" / "answers.jsonl").read_text()
    base = ["--data", data, "--checkpoint", str(root / "gmod"), "--tokenizer", str(root / "tok"),
            "--out", str(root / "out"), *COMMON]
    assert evaluate.main(["--benchmark", "gqa,coco"] + base) == 2
    assert "unknown benchmark 'coco'" in capsys.readouterr().err
    empty = root / "empty"
    empty.mkdir()
    assert evaluate.main(["--benchmark", "gqa", "--data", str(empty)] + base[2:]) == 2
    err = capsys.readouterr().err
    assert "llava_gqa_testdev_balanced.jsonl: question file not found" in err
    assert (root / "out" / "gqa" / "answers.jsonl").read_text() == before
    # Nothing answered (here: --limit 0) is no score, not a score of 0.
    zero = ["--benchmark", "gqa", "--limit", "0", "--data", data, "--checkpoint", str(root / "gmod"), "--tokenizer",
            str(root / "tok"), "--out", str(root / "zero"), *COMMON]
    assert evaluate.main(zero) == 0
    gqa = json.loads((root / "zero" / "scores.json").read_text())["models"][0]["benchmarks"]["gqa"]
    assert gqa["scores"] is None and "nothing scored" in gqa["note"] and gqa["num_answered"] == 0


def test_mmbench_first_round_only_and_file_overrides(tmp_path, capsys):
    data = str(tmp_path / "eval")
    make_fixture(data)
    first = readers.read_benchmark("mmbench", data, mmbench_rounds="first").questions
    assert [(q.key, q.gt) for q in first] == [("0#0", "B"), ("1#0", "A")]
    assert evaluate.main(["--benchmark", "gqa,pope", "--questions", "x.jsonl", "--data", data, "--checkpoint", "c",
                          "--tokenizer", "t", "--out", str(tmp_path / "o")]) == 2
    assert "give one --benchmark" in capsys.readouterr().err
