"""Readers of the eleven benchmarks in LLaVA's evaluation layout (docs/Evaluation.md of
LLaVA-1.5; `--data` is the `playground/data/eval` folder).

Each reader returns a `Benchmark`: the questions in file order, each with the prompt as
LLaVA's scripts give it to the model (the user message without `<image>`), its image, and
what the offline scorer needs; plus the records it could not use, counted by reason.
Prompt suffixes follow LLaVA's question files and scripts: short answers end with
"Answer the question using a single word or phrase." (already in LLaVA's JSONL files; added
when a file lacks it), multiple choice with the option lines and "Answer with the option's
letter from the given choices directly." (ScienceQA and MMBench: added by the script, as
`--single-pred-prompt` does), MM-Vet with nothing.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCDEFGHI"

# Answer lengths where the default (16 new tokens, for one word / one letter) is too short:
# MM-Vet is judged on free-form answers (LLaVA generates up to 1024 tokens).
MAX_NEW_TOKENS = {"mmvet": 512}

# Skip reasons, named in the output with the ids (or line numbers) they hit.
NO_ID = "no_question_id"
BAD_LINE = "bad_json_line"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
NO_QUESTION = "no_question_text"
OVER_LONG = "over_long_prompt"


class BenchmarkDataError(ValueError):
    """A benchmark's data folder or file cannot be used at all (names the path)."""


@dataclasses.dataclass
class Question:
    key: str                      # unique within the benchmark: question_id[#round]
    question_id: Any              # as in the source file (int or str)
    prompt: str                   # user message without the image placeholder
    image: Optional[str] = None   # image file path
    image_b64: Optional[str] = None  # MMBench: the image inline
    category: Optional[str] = None
    round_id: Optional[int] = None
    gt: Any = None                # what the scorer compares against (None: not scorable offline)
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def load_image(self):
        """PIL RGB image; FileNotFoundError / ValueError naming the file."""
        from PIL import Image

        if self.image_b64 is not None:
            try:
                with Image.open(io.BytesIO(base64.b64decode(self.image_b64))) as im:
                    return im.convert("RGB")
            except Exception as e:
                raise ValueError(f"question {self.key}: inline image unreadable ({type(e).__name__}: {e})") from None
        if self.image is None:
            return None
        if not os.path.isfile(self.image):
            raise FileNotFoundError(f"image file {self.image} not found")
        try:
            with Image.open(self.image) as im:
                return im.convert("RGB")
        except Exception as e:
            raise ValueError(f"image {self.image}: {type(e).__name__}: {e}") from None


@dataclasses.dataclass
class Benchmark:
    name: str
    questions: List[Question]
    skipped: Dict[str, List[str]]            # reason -> ids / "file:line"
    scored_offline: bool                     # ground truth found for an offline score
    note: str = ""                           # what happens instead when not scored offline
    source_file: str = ""


def with_suffix(text: str, suffix: str) -> str:
    """`text` ending with "\\n" + suffix (unchanged when it already ends with the suffix)."""
    text = text.strip()
    return text if text.endswith(suffix) else f"{text}\n{suffix}"


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise BenchmarkDataError(f"{path}: {what} not found")
    return path


def _read_jsonl(path: str, skipped: Dict[str, List[str]]) -> List[Tuple[int, dict]]:
    """(line number, record) of every parseable line with a question_id; others counted."""
    out = []
    with open(_require(path, "question file"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped.setdefault(BAD_LINE, []).append(f"{path}:{n}")
                continue
            if not isinstance(record, dict) or record.get("question_id") is None:
                skipped.setdefault(NO_ID, []).append(f"{path}:{n}")
                continue
            out.append((n, record))
    return out


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: not valid JSON ({e})") from None


def _questions_from_llava_jsonl(path: str, image_dir: str, skipped, suffix: Optional[str]) -> List[Question]:
    questions = []
    for n, r in _read_jsonl(path, skipped):
        text = str(r.get("text", "")).replace("<image>", "").strip()
        if not text:
            skipped.setdefault(NO_QUESTION, []).append(str(r["question_id"]))
            continue
        questions.append(Question(key=str(r["question_id"]), question_id=r["question_id"],
                                  prompt=with_suffix(text, suffix) if suffix else text,
                                  image=os.path.join(image_dir, r["image"]) if r.get("image") else None,
                                  category=r.get("category"), extra={"image_name": r.get("image")}))
    return questions


def _strip_suffix(prompt: str) -> str:
    return prompt[: -len(SHORT_ANSWER)].strip() if prompt.endswith(SHORT_ANSWER) else prompt.strip()


# ----------------------------------------------------------------------------- one reader each


def read_gqa(root, questions=None, images=None):
    d = os.path.join(root, "gqa")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava_gqa_testdev_balanced.jsonl")
    qs = _questions_from_llava_jsonl(qfile, images or os.path.join(d, "data", "images"), skipped, SHORT_ANSWER)
    gt_file = os.path.join(d, "data", "testdev_balanced_questions.json")
    scored = os.path.exists(gt_file)
    if scored:
        gt = _load_json(gt_file)
        for q in qs:
            entry = gt.get(str(q.question_id))
            q.gt = None if entry is None else entry.get("answer")
    return Benchmark("gqa", qs, skipped, scored, "" if scored else f"{gt_file} absent: files only", qfile)


def read_sqa(root, questions=None, images=None):
    d = os.path.join(root, "scienceqa")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava_test_CQM-A.json")
    records = _load_json(_require(qfile, "question file"))
    image_dir = images or os.path.join(d, "images", "test")
    problems_file = os.path.join(d, "problems.json")
    problems = _load_json(problems_file) if os.path.exists(problems_file) else None
    qs = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or r.get("id") is None:
            skipped.setdefault(NO_ID, []).append(f"{qfile}:[{i}]")
            continue
        if not r.get("image"):
            # SQA-IMG (the paper's "SQA") is the image subset; text-only questions are not asked.
            skipped.setdefault("text_only_not_in_sqa_img", []).append(str(r["id"]))
            continue
        turns = r.get("conversations") or []
        text = turns[0].get("value", "").replace("<image>", "").strip() if turns else ""
        if not text:
            skipped.setdefault(NO_QUESTION, []).append(str(r["id"]))
            continue
        gt = None
        if problems is not None and str(r["id"]) in problems:
            p = problems[str(r["id"])]
            gt = {"answer": int(p["answer"]), "num_choices": len(p["choices"])}
        prompt = with_suffix(text, MULTIPLE_CHOICE)
        # LLaVA's ScienceQA scorer tells image questions by "<image>" in the answer file's prompt.
        qs.append(Question(key=str(r["id"]), question_id=r["id"], prompt=prompt,
                           image=os.path.join(image_dir, r["image"]), gt=gt,
                           extra={"answer_prompt": "<image>\n" + prompt}))
    scored = problems is not None
    return Benchmark("sqa", qs, skipped, scored, "" if scored else f"{problems_file} absent: files only", qfile)


def read_textvqa(root, questions=None, images=None):
    d = os.path.join(root, "textvqa")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava_textvqa_val_v051_ocr.jsonl")
    qs = _questions_from_llava_jsonl(qfile, images or os.path.join(d, "train_images"), skipped, SHORT_ANSWER)
    ann_file = os.path.join(d, "TextVQA_0.5.1_val.json")
    scored = os.path.exists(ann_file)
    if scored:
        data = _load_json(ann_file)["data"]
        by_id = {a["question_id"]: a for a in data}
        by_image_question = {(str(a["image_id"]), a["question"].strip().lower()): a for a in data}
        for q in qs:
            a = by_id.get(q.question_id)
            if a is None:  # LLaVA's scorer matches by image and question text
                stem = os.path.splitext(q.extra.get("image_name") or "")[0]
                a = by_image_question.get((stem, q.prompt.split("\n")[0].strip().lower()))
            q.gt = None if a is None else list(a["answers"])
    return Benchmark("textvqa", qs, skipped, scored, "" if scored else f"{ann_file} absent: files only", qfile)


def read_pope(root, questions=None, images=None):
    d = os.path.join(root, "pope")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava_pope_test.jsonl")
    qs = _questions_from_llava_jsonl(qfile, images or os.path.join(d, "val2014"), skipped, SHORT_ANSWER)
    labels: Dict[Tuple[str, str], str] = {}
    ann_dir = os.path.join(d, "coco")
    if os.path.isdir(ann_dir):
        for name in sorted(os.listdir(ann_dir)):
            m = re.fullmatch(r"coco_pope_(\w+)\.json", name)
            if m:
                for _, r in _read_jsonl(os.path.join(ann_dir, name), {}):
                    labels[(m.group(1), str(r["question_id"]))] = str(r.get("label", "")).strip().lower()
    for q in qs:
        q.gt = labels.get((q.category, q.key))
    scored = bool(labels)
    return Benchmark("pope", qs, skipped, scored, "" if scored else f"{ann_dir}/coco_pope_*.json absent: files only",
                     qfile)


def _mme_ground_truth(image_root: str, image_name: str) -> Dict[str, str]:
    """question -> "Yes"/"No" from the MME release's per-image txt ("question\\tanswer")."""
    head, file = os.path.split(image_name)
    stem = os.path.splitext(file)[0]
    if os.path.basename(head) == "images":
        txt = os.path.join(image_root, os.path.dirname(head), "questions_answers_YN", stem + ".txt")
    else:
        txt = os.path.join(image_root, head, stem + ".txt")
    out = {}
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 2:
                    out[parts[0].strip()] = parts[1].strip()
    return out


def read_mme(root, questions=None, images=None):
    d = os.path.join(root, "MME")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava_mme.jsonl")
    image_root = images or os.path.join(d, "MME_Benchmark_release_version")
    qs = _questions_from_llava_jsonl(qfile, image_root, skipped, SHORT_ANSWER)
    # Two questions per image share a question_id in LLaVA's file: keys get the line's rank.
    seen: Dict[str, int] = {}
    for q in qs:
        n = seen.get(q.key, 0)
        seen[q.key] = n + 1
        q.key = f"{q.key}#{n}"
        q.gt = _mme_ground_truth(image_root, q.extra["image_name"] or "").get(_strip_suffix(q.prompt))
        q.extra["question"] = _strip_suffix(q.prompt)
    scored = any(q.gt is not None for q in qs)
    return Benchmark("mme", qs, skipped, scored, "" if scored else "no MME ground-truth txt files found: files only",
                     qfile)


def _is_none(value) -> bool:
    return value is None or str(value).strip().lower() in ("", "nan", "none")


def read_mmbench(root, questions=None, images=None, split="mmbench_dev_20230712", rounds="all"):
    """rounds: "all" (default) asks each question once per rotation of its options, for
    MMBench's circular evaluation; "first" asks it once, as LLaVA's script does by default."""
    if rounds not in ("all", "first"):
        raise ValueError(f"mmbench rounds must be 'all' or 'first', got {rounds!r}")
    d = os.path.join(root, "mmbench")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, f"{split}.tsv")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    qs = []
    with open(_require(qfile, "question file"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for n, row in enumerate(rows, 2):
        if _is_none(row.get("index")):
            skipped.setdefault(NO_ID, []).append(f"{qfile}:{n}")
            continue
        options = []
        for letter in "ABCD":
            if _is_none(row.get(letter)):
                break
            options.append(str(row[letter]))
        answer = None if _is_none(row.get("answer")) else str(row["answer"]).strip()
        index = int(row["index"]) if str(row["index"]).isdigit() else row["index"]
        # Circular evaluation: the question once per rotation of its options.
        for r in range(len(options) if rounds == "all" else min(len(options), 1)):
            rotated = options[r:] + options[:r]
            text = str(row.get("question", "")).strip()
            if not _is_none(row.get("hint")):
                text = str(row["hint"]).strip() + "\n" + text
            for letter, option in zip(OPTION_LETTERS, rotated):
                text += f"\n{letter}. {option}"
            gt = None
            if answer in OPTION_LETTERS[:len(options)]:
                gt = OPTION_LETTERS[(OPTION_LETTERS.index(answer) - r) % len(options)]
            qs.append(Question(key=f"{index}#{r}", question_id=index, prompt=with_suffix(text, MULTIPLE_CHOICE),
                               image_b64=row.get("image"), category=row.get("category"), round_id=r, gt=gt,
                               extra={"options": rotated, "row": {k: v for k, v in row.items() if k != "image"}}))
    scored = any(q.gt is not None for q in qs)
    return Benchmark("mmbench", qs, skipped, scored, "" if scored else "no answer column: files only", qfile)


def read_seed(root, questions=None, images=None):
    d = os.path.join(root, "seed_bench")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava-seed-bench.jsonl")
    qs = _questions_from_llava_jsonl(qfile, images or d, skipped, MULTIPLE_CHOICE)
    ann_file = os.path.join(d, "SEED-Bench.json")
    scored = os.path.exists(ann_file)
    if scored:
        by_id = {str(x["question_id"]): x for x in _load_json(ann_file)["questions"]}
        for q in qs:
            x = by_id.get(q.key)
            if x is not None:
                q.gt = str(x["answer"]).strip()
                q.extra["data_type"] = x.get("data_type", "image")
    return Benchmark("seed", qs, skipped, scored, "" if scored else f"{ann_file} absent: files only", qfile)


def _mmmu_options(value) -> List[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value.strip():
        import ast

        try:
            parsed = ast.literal_eval(value)  # MMMU stores options as a Python list literal
        except (ValueError, SyntaxError):
            return []
        return [str(v) for v in parsed] if isinstance(parsed, list) else []
    return []


def read_mmmu(root, questions=None, images=None):
    """MMMU is not in LLaVA's evaluation set; this project's layout: `mmmu/mmmu_val.jsonl`,
    one line per question {"id", "question", "options" (list, or MMMU's list literal),
    "answer" (letter, or text for open questions), "image" (file under `mmmu/images/`; the
    first image of the question), "question_type" ("multiple-choice" | "open")}."""
    d = os.path.join(root, "mmmu")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "mmmu_val.jsonl")
    image_dir = images or os.path.join(d, "images")
    qs = []
    with open(_require(qfile, "question file"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                skipped.setdefault(BAD_LINE, []).append(f"{qfile}:{n}")
                continue
            if not isinstance(r, dict) or r.get("id") is None:
                skipped.setdefault(NO_ID, []).append(f"{qfile}:{n}")
                continue
            options = _mmmu_options(r.get("options"))
            text = str(r.get("question", "")).strip()
            if not text:
                skipped.setdefault(NO_QUESTION, []).append(str(r["id"]))
                continue
            multiple_choice = r.get("question_type", "multiple-choice") == "multiple-choice" and options
            if multiple_choice:
                for letter, option in zip(OPTION_LETTERS, options):
                    text += f"\n{letter}. {option}"
                text = with_suffix(text, MULTIPLE_CHOICE)
            else:
                text = with_suffix(text, SHORT_ANSWER)
            qs.append(Question(key=str(r["id"]), question_id=r["id"], prompt=text,
                               image=os.path.join(image_dir, r["image"]) if r.get("image") else None,
                               category=r.get("subfield") or r.get("subject"),
                               gt=None if _is_none(r.get("answer")) else str(r["answer"]).strip(),
                               extra={"options": options if multiple_choice else []}))
    scored = any(q.gt is not None for q in qs)
    return Benchmark("mmmu", qs, skipped, scored, "" if scored else "no answers: files only", qfile)


def read_vqav2(root, questions=None, images=None):
    d = os.path.join(root, "vqav2")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava_vqav2_mscoco_test-dev2015.jsonl")
    qs = _questions_from_llava_jsonl(qfile, images or os.path.join(d, "test2015"), skipped, SHORT_ANSWER)
    # VQAv2-val (offline): the official annotation file next to a val question file.
    ann_file = os.path.join(d, "v2_mscoco_val2014_annotations.json")
    scored = False
    if os.path.exists(ann_file):
        by_id = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in _load_json(ann_file)["annotations"]}
        for q in qs:
            q.gt = by_id.get(q.question_id)
        scored = any(q.gt is not None for q in qs)
    return Benchmark("vqav2", qs, skipped, scored, "" if scored else "test-dev: scored by the EvalAI server "
                     "(answers_upload.json)", qfile)


def read_vizwiz(root, questions=None, images=None):
    d = os.path.join(root, "vizwiz")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava_test.jsonl")
    qs = _questions_from_llava_jsonl(qfile, images or os.path.join(d, "test"), skipped, SHORT_ANSWER)
    return Benchmark("vizwiz", qs, skipped, False, "test split: scored by the EvalAI server (answers_upload.json)",
                     qfile)


def read_mmvet(root, questions=None, images=None):
    d = os.path.join(root, "mm-vet")
    skipped: Dict[str, List[str]] = {}
    qfile = questions or os.path.join(d, "llava-mm-vet.jsonl")
    qs = _questions_from_llava_jsonl(qfile, images or os.path.join(d, "images"), skipped, None)
    return Benchmark("mmvet", qs, skipped, False, "scored by MM-Vet's GPT-4 judge (results.json)", qfile)


READERS = {"gqa": read_gqa, "sqa": read_sqa, "textvqa": read_textvqa, "pope": read_pope, "mme": read_mme,
           "mmbench": read_mmbench, "seed": read_seed, "mmmu": read_mmmu, "vqav2": read_vqav2,
           "vizwiz": read_vizwiz, "mmvet": read_mmvet}
BENCHMARK_NAMES = tuple(READERS)


def read_benchmark(name: str, root: str, *, questions: Optional[str] = None, images: Optional[str] = None,
                   mmbench_rounds: str = "all") -> Benchmark:
    """The benchmark `name` under the LLaVA eval folder `root`; ValueError for an unknown
    name, BenchmarkDataError naming the missing or unreadable file."""
    if name not in READERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARK_NAMES)}")
    if not os.path.isdir(root):
        raise BenchmarkDataError(f"{root}: benchmark data folder not found")
    if name == "mmbench":
        return read_mmbench(root, questions, images, rounds=mmbench_rounds)
    return READERS[name](root, questions, images)
