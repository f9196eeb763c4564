"""Tiny benchmarks in LLaVA's `playground/data/eval/<bench>/` layout, with generated PNG
images, for the benchmark-evaluation tests. `make_fixture(root)` returns every text the
prompts can hold (for a word tokenizer)."""

import base64
import io
import json
import os

import numpy as np
from PIL import Image

SA = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."


def _png(path=None, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if path is None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def _jsonl(path, records, raw_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def _json(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)


def make_fixture(root):
    j = os.path.join
    # GQA: one line already with the suffix, one without, one line with no id, one missing image.
    _jsonl(j(root, "gqa/llava_gqa_testdev_balanced.jsonl"),
           [{"question_id": "201", "image": "a.png", "text": f"What color is the box?\n{SA}"},
            {"question_id": "202", "image": "b.png", "text": "Is it big?"},
            {"question_id": "203", "image": "gone.png", "text": f"Where is it?\n{SA}"}],
           raw_lines=[json.dumps({"image": "a.png", "text": "no id"})])
    _png(j(root, "gqa/data/images/a.png"), 1)
    _png(j(root, "gqa/data/images/b.png"), 2, (20, 50))
    _json(j(root, "gqa/data/testdev_balanced_questions.json"),
          {"201": {"answer": "red"}, "202": {"answer": "no"}, "203": {"answer": "left"}})
    # ScienceQA: conversations JSON; s2 has no image (not in SQA-IMG).
    _json(j(root, "scienceqa/llava_test_CQM-A.json"), [
        {"id": "s1", "image": "s1/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A box.\nWhich is red?\nA. box\nB. ball"},
            {"from": "gpt", "value": "A"}]},
        {"id": "s2", "conversations": [{"from": "human", "value": "Which is a fruit?\nA. apple\nB. rock"},
                                       {"from": "gpt", "value": "A"}]},
        {"id": "s3", "image": "s3/image.png", "conversations": [
            {"from": "human", "value": "Which shape?\nA. circle\nB. square\nC. line\n<image>"},
            {"from": "gpt", "value": "B"}]}])
    _json(j(root, "scienceqa/problems.json"), {"s1": {"answer": 0, "choices": ["box", "ball"]},
                                               "s2": {"answer": 0, "choices": ["apple", "rock"]},
                                               "s3": {"answer": 1, "choices": ["circle", "square", "line"]}})
    _png(j(root, "scienceqa/images/test/s1/image.png"), 3)
    _png(j(root, "scienceqa/images/test/s3/image.png"), 4)
    # TextVQA with OCR tokens in the prompt; ten reference answers.
    _jsonl(j(root, "textvqa/llava_textvqa_val_v051_ocr.jsonl"),
           [{"question_id": 7, "image": "t1.png", "text": f"what is written?\nReference OCR token: STOP\n{SA}"}])
    _json(j(root, "textvqa/TextVQA_0.5.1_val.json"),
          {"data": [{"question_id": 7, "image_id": "t1", "question": "what is written?",
                     "answers": ["stop"] * 8 + ["stop sign"] * 2}]})
    _png(j(root, "textvqa/train_images/t1.png"), 5)
    # POPE: two splits, labels in coco/coco_pope_<split>.json.
    pope = [{"question_id": i, "image": f"p{i}.png", "text": f"Is there a dog in the image?\n{SA}",
             "category": "adversarial" if i <= 2 else "random"} for i in range(1, 5)]
    _jsonl(j(root, "pope/llava_pope_test.jsonl"), pope)
    _jsonl(j(root, "pope/coco/coco_pope_adversarial.json"), [{"question_id": 1, "label": "yes"},
                                                             {"question_id": 2, "label": "no"}])
    _jsonl(j(root, "pope/coco/coco_pope_random.json"), [{"question_id": 3, "label": "no"},
                                                        {"question_id": 4, "label": "yes"}])
    for i in range(1, 5):
        _png(j(root, f"pope/val2014/p{i}.png"), 10 + i)
    # MME: two questions per image sharing a question_id; ground truth in the release's txt files.
    q1, q2, q3 = ("Is there one dog? Please answer yes or no.", "Are there two dogs? Please answer yes or no.",
                  "Is this a painting? Please answer yes or no.")
    _jsonl(j(root, "MME/llava_mme.jsonl"),
           [{"question_id": "count/0001.png", "image": "count/0001.png", "text": f"{q1}\n{SA}", "category": "count"},
            {"question_id": "count/0001.png", "image": "count/0001.png", "text": f"{q2}\n{SA}", "category": "count"},
            {"question_id": "artwork/images/9.png", "image": "artwork/images/9.png", "text": f"{q3}\n{SA}",
             "category": "artwork"}])
    mme = j(root, "MME/MME_Benchmark_release_version")
    _png(j(mme, "count/0001.png"), 20)
    with open(j(mme, "count/0001.txt"), "w") as f:
        f.write(f"{q1}\tYes\n{q2}\tNo\n")
    _png(j(mme, "artwork/images/9.png"), 21)
    os.makedirs(j(mme, "artwork/questions_answers_YN"))
    with open(j(mme, "artwork/questions_answers_YN/9.txt"), "w") as f:
        f.write(f"{q3}\tYes\n")
    # MMBench: tsv with inline base64 images, a hint on one row, 3 and 2 options.
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    rows = [["0", "What is shown?", "nan", "a cat", "a dog", "a car", "nan", "B", "object", _png(None, 30), "x", "p",
             "nan", "dev"],
            ["1", "Which is larger?", "Look at the sizes.", "the box", "the ball", "nan", "nan", "A", "size",
             _png(None, 31), "x", "p", "nan", "dev"]]
    os.makedirs(j(root, "mmbench"))
    with open(j(root, "mmbench/mmbench_dev_20230712.tsv"), "w") as f:
        f.write("\n".join("\t".join(r) for r in [header] + rows) + "\n")
    # SEED-Bench: options and suffix in the LLaVA file; answers in SEED-Bench.json.
    _jsonl(j(root, "seed_bench/llava-seed-bench.jsonl"),
           [{"question_id": 101, "image": "SEED-Bench-image/x.png",
             "text": f"How many dogs?\nA. 1\nB. 2\nC. 3\nD. 4\n{MC}"}])
    _json(j(root, "seed_bench/SEED-Bench.json"), {"question_type": {"Instances Counting": 1}, "questions": [
        {"question_id": "101", "answer": "B", "data_type": "image", "question_type_id": 1}]})
    _png(j(root, "seed_bench/SEED-Bench-image/x.png"), 40)
    # MMMU (this project's layout): a multiple-choice and an open question.
    _jsonl(j(root, "mmmu/mmmu_val.jsonl"),
           [{"id": "validation_Art_1", "question": "Which style is it?", "options": "['Baroque', 'Modern']",
             "answer": "A", "image": "art1.png", "question_type": "multiple-choice"},
            {"id": "validation_Math_2", "question": "How many sides?", "options": "[]", "answer": "3",
             "image": "m2.png", "question_type": "open"}])
    _png(j(root, "mmmu/images/art1.png"), 50)
    _png(j(root, "mmmu/images/m2.png"), 51)
    # VQAv2 test-dev, VizWiz test, MM-Vet: files only.
    _jsonl(j(root, "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"),
           [{"question_id": 5001, "image": "COCO_test2015_1.png", "text": f"What is it?\n{SA}"},
            {"question_id": 5002, "image": "COCO_test2015_2.png", "text": f"How many?\n{SA}"}])
    # The whole test2015 list (the upload covers it; 5003 is not in test-dev).
    _jsonl(j(root, "vqav2/llava_vqav2_mscoco_test2015.jsonl"), [{"question_id": i, "image": "x.png", "text": "?"}
                                                               for i in (5001, 5002, 5003)])
    _png(j(root, "vqav2/test2015/COCO_test2015_1.png"), 60)
    _png(j(root, "vqav2/test2015/COCO_test2015_2.png"), 61)
    vz = "When the provided information is insufficient, respond with 'Unanswerable'."
    _jsonl(j(root, "vizwiz/llava_test.jsonl"),
           [{"question_id": 0, "image": "VizWiz_test_00000000.png", "text": f"What is this?\n{vz}\n{SA}"}])
    _png(j(root, "vizwiz/test/VizWiz_test_00000000.png"), 70)
    _jsonl(j(root, "mm-vet/llava-mm-vet.jsonl"), [{"question_id": 0, "image": "v1_0.png", "text": "What is shown?"}])
    _png(j(root, "mm-vet/images/v1_0.png"), 80)
    return [SA, MC, vz, q1, q2, q3, "What color is the box? Is it big? Context: A box. Which is red? box ball "
            "Which shape? circle square line what is written? Reference OCR token: STOP Is there a dog in the image? "
            "What is shown? a cat a dog a car Which is larger? Look at the sizes. the box the ball How many dogs? "
            "Which style is it? Baroque Modern How many sides? What is it? How many? What is this? A B C D 1 2 3 4"]
