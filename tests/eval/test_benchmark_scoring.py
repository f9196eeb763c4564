"""Offline benchmark scorers against values worked out by hand for crafted predictions."""

import pytest

from gamma_mod_jax.eval.benchmarks.readers import Question
from gamma_mod_jax.eval.benchmarks.scoring import (extract_choice, mme_yes_no, normalise_vqa_answer, parse_sqa_letter,
                                                   pope_yes_no, score_benchmark, score_gqa, score_mmbench, score_mme,
                                                   score_mmmu, score_pope, score_seed, score_sqa, score_vqa,
                                                   vqa_soft_score)


def q(key, gt, **kw):
    return Question(key=key, question_id=key, prompt="?", gt=gt, **kw)


@pytest.mark.parametrize("text, expected", [
    ("Two.", "2"), ("The Red car", "red car"), ("dont", "don't"), ("yes!", "yes"), ("3.5", "3.5"),
    ("black and white", "black and white"), ("1,000", "1000"), ("ten", "10"), ("man's hat", "man 's hat"),
    ("t-shirt", "t shirt"), ("couldnt've", "couldn't've"), ("an apple", "apple")])
def test_vqa_normalisation(text, expected):
    assert normalise_vqa_answer(text) == expected


def test_vqa_soft_score_by_hand():
    refs = ["red"] * 2 + ["blue"] * 8
    # Leaving out one of the 2 "red": 1 match -> 1/3; leaving out a "blue": 2 -> 2/3.
    assert vqa_soft_score("Red.", refs) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert vqa_soft_score("blue", refs) == pytest.approx(1.0)   # 7 or 8 matches: always >= 3
    assert vqa_soft_score("green", refs) == 0.0
    # "Two." normalises to "2": 3 matches; leaving one of them out: 2/3, otherwise 1.
    assert vqa_soft_score("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)  # 0.9
    s = score_vqa([q("a", ["2"] * 3 + ["3"] * 7), q("b", refs), q("c", refs)], {"a": "Two.", "b": "Red.", "c": "x"})
    assert s["accuracy"] == pytest.approx((0.9 + 0.6 + 0.0) / 3) and s["num_scored"] == 3


def test_gqa_exact_match_after_llava_conversion():
    s = score_gqa([q("1", "yes"), q("2", "cat"), q("3", "left"), q("4", "no")],
                  {"1": "Yes.", "2": "A cat", "3": "left"})  # 4 unanswered: not scored
    assert s == {"accuracy": pytest.approx(2 / 3), "num_scored": 3}


@pytest.mark.parametrize("text, n, expected", [
    ("B", 3, "B"), ("C. apple", 3, "C"), ("The answer is A.", 2, "A"), ("I think B", 3, None),
    ("D", 3, None), ("The answer is A. The answer is B.", 3, None), ("C.apple", 3, None)])
def test_sqa_letter_parsing(text, n, expected):
    assert parse_sqa_letter(text, n) == expected


def test_sqa_accuracy():
    qs = [q("1", {"answer": 1, "num_choices": 2}), q("2", {"answer": 0, "num_choices": 3}),
          q("3", {"answer": 2, "num_choices": 3}), q("4", {"answer": 0, "num_choices": 2})]
    s = score_sqa(qs, {"1": "B", "2": "A. dog", "3": "maybe C", "4": "B"})
    assert s["accuracy"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("Yes, there is a dog.", "yes"), ("No.", "no"), ("no", "no"),
    ("There is not a dog in the image.", "no"), ("Nope", "yes"), ("Yes. No.", "yes"), ("NO", "yes")])
def test_pope_yes_no(text, expected):
    assert pope_yes_no(text) == expected


def test_pope_metrics_per_split_by_hand():
    # random: labels yes, yes, no, no; predictions yes, no, yes, no -> TP 1 FN 1 FP 1 TN 1.
    # adversarial: labels yes, no; predictions yes, yes -> TP 1 FP 1.
    qs = [q("r1", "yes", category="random"), q("r2", "yes", category="random"), q("r3", "no", category="random"),
          q("r4", "no", category="random"), q("a1", "yes", category="adversarial"),
          q("a2", "no", category="adversarial")]
    ans = {"r1": "Yes, it is.", "r2": "No, there is not.", "r3": "Yes", "r4": "There is not one.",
           "a1": "yes", "a2": "I see one."}
    s = score_pope(qs, ans)
    r, a = s["splits"]["random"], s["splits"]["adversarial"]
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == pytest.approx((0.5, 0.5, 0.5, 0.5,
                                                                                                   0.5))
    # precision 1/2, recall 1/1, F1 = 2 * 0.5 * 1 / 1.5 = 2/3, yes ratio 1.
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == pytest.approx((0.5, 0.5, 1.0,
                                                                                                   2 / 3, 1.0))
    assert s["f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_mme_acc_plus_by_hand():
    assert [mme_yes_no(t) for t in ("Yes", "no.", "Yes, it is", "Not sure", "Maybe")] == ["yes", "no", "yes", "no",
                                                                                           "other"]
    img = lambda cat, name: {"image_name": f"{cat}/{name}"}
    qs = [q("c1a", "Yes", category="count", extra=img("count", "1")), q("c1b", "No", category="count",
                                                                        extra=img("count", "1")),
          q("c2a", "Yes", category="count", extra=img("count", "2")), q("c2b", "No", category="count",
                                                                        extra=img("count", "2")),
          q("k1a", "Yes", category="code_reasoning", extra=img("code", "1")),
          q("k1b", "No", category="code_reasoning", extra=img("code", "1"))]
    ans = {"c1a": "Yes", "c1b": "No", "c2a": "Yes", "c2b": "Yes", "k1a": "Maybe", "k1b": "No"}
    s = score_mme(qs, ans)
    # count: 3 of 4 right (acc 0.75), 1 of 2 images with both right (acc+ 0.5): 125.
    assert s["categories"]["count"] == pytest.approx({"acc": 0.75, "acc_plus": 0.5, "score": 125.0})
    # code_reasoning: 1 of 2 right, no image fully right: 50.
    assert s["categories"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == pytest.approx(50.0)


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), ("(C) a cat", "C"), ("The answer is A", "A"), ("a cat", "C"), ("dog", None),
    ("A or B", None), ("E", None), ("I think it is B.", "B")])
def test_choice_extraction(text, expected):
    assert extract_choice(text, ["red", "blue", "a cat"]) == expected


def test_mmbench_circular_by_hand():
    # Question 0: answer "A" with options x, y: round 0 gt A, round 1 (options y, x) gt B.
    # Question 1: answer "B" with options p, q: round 0 gt B, round 1 gt A.
    qs = [q("0#0", "A", round_id=0, extra={"options": ["x", "y"]}), q("0#1", "B", round_id=1,
                                                                      extra={"options": ["y", "x"]}),
          q("1#0", "B", round_id=0, extra={"options": ["p", "q"]}), q("1#1", "A", round_id=1,
                                                                      extra={"options": ["q", "p"]})]
    for x in qs:
        x.question_id = x.key.split("#")[0]
    s = score_mmbench(qs, {"0#0": "A", "0#1": "B", "1#0": "B", "1#1": "B"})
    assert s["accuracy"] == 1.0 and s["circular_accuracy"] == 0.5 and s["num_questions"] == 2


def test_seed_and_mmmu():
    s = score_seed([q("1", "A", extra={"data_type": "image"}), q("2", "B", extra={"data_type": "image"}),
                    q("3", "C", extra={"data_type": "video"})], {"1": "A", "2": "B.", "3": "C"})
    assert s["accuracy"] == pytest.approx(2 / 3) and s["image_accuracy"] == pytest.approx(1 / 2)
    m = score_mmmu([q("1", "B", extra={"options": ["cat", "dog"]}), q("2", "A", extra={"options": ["cat", "dog"]}),
                    q("3", "2", extra={"options": []})], {"1": "dog", "2": "B", "3": "Two."})
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_headline_and_files_only():
    s = score_benchmark("mme", [q("a", "Yes", category="existence", extra={"image_name": "e/1"})], {"a": "yes"})
    assert s["headline"] == pytest.approx(200.0)
    assert score_benchmark("mmvet", [], {}) is None and score_benchmark("vizwiz", [], {}) is None


def test_paper_layout_table_by_hand():
    from gamma_mod_jax.eval.benchmarks.report import markdown_table, vqa_table

    table = vqa_table([("dense", {"accuracy": 0.9, "samples_per_s": 4.0}, 0.000256, None),
                       ("γ-MoD", {"accuracy": 0.95, "samples_per_s": 5.0}, 0.000171, 0.457)])
    assert table.splitlines() == [
        "| Model | easy-VQA | Avg | TFLOPs | Skip | Speed |", "|---|---|---|---|---|---|",
        "| dense | 90.0 |  | 0.000256 | 0.0% | 4.00 |",
        "| γ-MoD | 95.0 |  | 0.000171 | 45.7% | 5.00 |",
        "| dense - γ-MoD | -5.0 |  | +8.5e-05 | -45.7% | -1.00 |"]
    # The four-benchmark average of the paper's efficiency tables, and "files" for server-scored ones.
    result = lambda h: {"scores": {"headline": h}, "routing": {"tflops_paper": 19.16}, "samples_per_s": None}
    row = {"gqa": result(64.2), "sqa": result(67.9), "mmmu": result(34.6), "textvqa": result(67.1),
           "vqav2": {"scores": None, "routing": {}, "samples_per_s": None}}
    lines = markdown_table([("LLaVA-HR-7B", row)]).splitlines()
    assert lines[0] == "| Model | TextVQA | VQAv2 | GQA | SQA-I | MMMU | Avg | TFLOPs | Skip | Speed |"
    assert lines[2] == "| LLaVA-HR-7B | 67.1 | files | 64.2 | 67.9 | 34.6 | 58.5 | 19.16 | 0.0% |  |"
