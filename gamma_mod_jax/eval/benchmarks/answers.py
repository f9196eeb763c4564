"""Answer files in LLaVA's format and each benchmark's submission format.

`<out>/<bench>/answers.jsonl`: one JSON line per question, in question order:
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} (MMBench adds
"round_id", "options", "option_char" as LLaVA's MMBench script does). `answer_id` is a
deterministic hash of the model id and the question key (LLaVA draws a random one), so a
resumed run writes the same file as an uninterrupted one. `metadata` holds the question key
and, for the routing statistics, the prompt's sequence length and per-type token counts.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from typing import Dict, List

from gamma_mod_jax.eval.benchmarks.readers import OPTION_LETTERS, Benchmark, Question
from gamma_mod_jax.eval.benchmarks.scoring import normalise_vqa_answer
from gamma_mod_jax.io_utils import atomic_write

_NAMESPACE = uuid.UUID("5c3f2b8e-6a51-4a0e-9a43-0d1b7a6e2f10")


def answer_record(question: Question, text: str, model_id: str, metadata: dict) -> dict:
    """One answers.jsonl line for `question` answered with `text`."""
    record = {"question_id": question.question_id, "prompt": question.extra.get("answer_prompt", question.prompt),
              "text": text,
              "answer_id": uuid.uuid5(_NAMESPACE, f"{model_id}/{question.key}").hex, "model_id": model_id,
              "metadata": {"key": question.key, **metadata}}
    if question.round_id is not None:
        options = question.extra.get("options", [])
        record.update(round_id=question.round_id, options=options, option_char=list(OPTION_LETTERS[:len(options)]))
    return record


class AnswerFile:
    """answers.jsonl opened for resuming: `done` maps question keys to the records already
    written; a torn last line (an interrupted write) is dropped and the file rewritten
    without it; `append` writes and flushes whole lines."""

    def __init__(self, path: str):
        self.path = path
        self.done: Dict[str, dict] = {}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        good: List[str] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        key = record["metadata"]["key"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # torn or foreign line: the question is asked again
                    if line.endswith("\n"):
                        self.done[key] = record
                        good.append(line)
            with atomic_write(path) as f:
                f.writelines(good)
        self._file = open(path, "a", encoding="utf-8")

    def append(self, records: List[dict]) -> None:
        for record in records:
            self.done[record["metadata"]["key"]] = record
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _dump(path: str, doc) -> str:
    with atomic_write(path) as f:
        json.dump(doc, f)
    return path


def write_submission(bench: Benchmark, answers: Dict[str, str], out_dir: str, data_root: str) -> List[str]:
    """The benchmark's submission / official-scorer files under `out_dir`; their paths."""
    name, qs = bench.name, bench.questions
    if name == "gqa":  # GQA's eval.py --tier testdev_balanced reads this list
        return [_dump(os.path.join(out_dir, "testdev_balanced_predictions.json"),
                      [{"questionId": q.question_id, "prediction": answers[q.key].rstrip(".").lower()}
                       for q in qs if q.key in answers])]
    if name == "vqav2":  # EvalAI wants every test2015 question (LLaVA's full list when present), unanswered: ""
        by_id = {q.question_id: normalise_vqa_answer(answers[q.key]) for q in qs if q.key in answers}
        ids = [q.question_id for q in qs]
        full = os.path.join(data_root, "vqav2", "llava_vqav2_mscoco_test2015.jsonl")
        if data_root and os.path.exists(full):
            with open(full, encoding="utf-8") as f:
                ids = [json.loads(line)["question_id"] for line in f if line.strip()]
        return [_dump(os.path.join(out_dir, "answers_upload.json"),
                      [{"question_id": i, "answer": by_id.get(i, "")} for i in ids])]
    if name == "vizwiz":
        return [_dump(os.path.join(out_dir, "answers_upload.json"),
                      [{"image": q.extra.get("image_name"), "answer": normalise_vqa_answer(answers.get(q.key, ""))}
                       for q in qs])]
    if name == "mmvet":  # MM-Vet's GPT-4 judge notebook reads {"v1_<id>": answer}
        return [_dump(os.path.join(out_dir, "results.json"),
                      {f"v1_{q.question_id}": answers[q.key] for q in qs if q.key in answers})]
    if name == "seed":
        path = os.path.join(out_dir, "answers_upload.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for q in qs:
                if q.key in answers:
                    f.write(json.dumps({"question_id": q.question_id, "prediction": answers[q.key]}) + "\n")
        return [path]
    if name == "mme":  # MME eval_tool: <category>.txt lines "image\tquestion\tground truth\tprediction"
        folder = os.path.join(out_dir, "mme_results")
        os.makedirs(folder, exist_ok=True)
        by_category: Dict[str, List[str]] = {}
        for q in qs:
            if q.key in answers:
                line = "\t".join([os.path.basename(q.extra.get("image_name") or ""), q.extra["question"], str(q.gt or ""),
                                  answers[q.key].replace("\n", " ").replace("\t", " ")])
                by_category.setdefault(q.category or "unknown", []).append(line)
        paths = []
        for category, lines in sorted(by_category.items()):
            paths.append(os.path.join(folder, f"{category}.txt"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        return paths
    if name == "mmbench":  # the first pass's predictions as the MMBench server's sheet (tsv)
        path = os.path.join(out_dir, "mmbench_submission.tsv")
        rows = [q for q in qs if q.round_id == 0]
        dropped = {"hint", "category", "source", "image", "comment", "l2-category"}
        columns: List[str] = []
        for q in rows:
            columns += [c for c in q.extra["row"] if c not in dropped and c not in columns]
        at = max([columns.index(c) + 1 for c in "ABCD" if c in columns] or [len(columns)])
        columns.insert(at, "prediction")
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, columns, delimiter="\t", extrasaction="ignore")
            writer.writeheader()
            for q in rows:
                writer.writerow({**q.extra["row"], "prediction": answers.get(q.key, "")})
        return [path]
    return []
