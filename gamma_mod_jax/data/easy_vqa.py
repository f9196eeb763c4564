"""easy-VQA (the `easy-vqa` PyPI package: 64x64 PNG shapes, ~38.6k train and ~9.7k test
questions over 4000 / 1000 images, 13 one-word answers) as LLaVA-format records.

    easy_vqa_records(split)    [{"id", "image": PNG path inside the package,
                                 "conversations": [human "<image>\\n{question}", gpt "{answer}"]}]
    easy_vqa_records(split, questions_per_conversation=n, questions="all"|"open"|"balanced")
                               an image's questions as multi-turn conversations of up to n
                               question/answer turns (how LLaVA's instruction data is laid out:
                               the image and the system prompt are encoded once for n answers);
                               a selection of the questions
    easy_vqa_image_labels(split)
                               {image id: (colour, shape)} read off the questions
    easy_vqa_vocabulary()      every word of the questions, answers and the prompt template
                               (for `tokenizer.build_word_tokenizer`)
    EASY_VQA_ANSWERS           the 13 answers, in the package's order
"""

from __future__ import annotations

import functools
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

EASY_VQA_ANSWERS: Tuple[str, ...] = ("circle", "green", "red", "gray", "yes", "teal", "black", "rectangle",
                                     "yellow", "triangle", "brown", "blue", "no")
SPLITS = ("train", "test")


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("easy-VQA data needs the `easy-vqa` package: pip install easy-vqa") from None
    return easy_vqa


@functools.lru_cache(maxsize=None)
def _split_data(split: str):
    """(questions, answers, image ids, {image id: path}) of a split, as the package gives them."""
    if split not in SPLITS:
        raise ValueError(f"easy-VQA split must be one of {SPLITS}, got {split!r}")
    pkg = _package()
    if split == "train":
        questions, answers, image_ids = pkg.get_train_questions()
        paths = pkg.get_train_image_paths()
    else:
        questions, answers, image_ids = pkg.get_test_questions()
        paths = pkg.get_test_image_paths()
    return tuple(questions), tuple(answers), tuple(int(i) for i in image_ids), dict(paths)


def easy_vqa_conversation(question: str, answer: str, *more: Tuple[str, str]) -> List[Dict[str, str]]:
    """The LLaVA-format turns of one easy-VQA question (and of further (question, answer)
    pairs about the same image as later turns)."""
    turns = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]
    for q, a in more:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


def easy_vqa_record_id(split: str, index: int) -> str:
    return f"easy_vqa/{split}/{index}"


QUESTION_KINDS = ("all", "open", "balanced")


def easy_vqa_records(split: str = "train", limit: Optional[int] = None,
                     questions_per_conversation: int = 1, questions: str = "all") -> List[Dict]:
    """LLaVA-format records of an easy-VQA split (the first `limit` records when given).

    questions: "all", or "open" for only the open-ended ones ("what color is the shape?",
    "what shape is in the image?": a colour or a shape name as the answer, ~26% of them),
    the easy-VQA counterpart of LLaVA's caption-style alignment data: the answer names what
    the image shows, without the yes/no questions' text prior to fall back on. "balanced": every
    open question, and yes/no questions with as many false statements as true ones per kind
    (colour, shape): as drawn, "is there a <colour> shape?" is "no" 7 times in 8, so answering
    from the text alone scores ~82% on yes/no, and the image never needs looking at (a fixed,
    evenly spread subset of the false ones is kept).

    questions_per_conversation=1: one record per question in the package's order, record i
    with id "easy_vqa/<split>/<i>". n > 1: each image's questions (package order) in
    consecutive runs of up to n turns, images in order of their first question; the id names
    the questions, "easy_vqa/<split>/<i>+<j>+...". Every selected question is used exactly once."""
    n_turns = int(questions_per_conversation)
    if n_turns < 1:
        raise ValueError(f"easy-VQA questions_per_conversation must be >= 1, got {questions_per_conversation}")
    if questions not in QUESTION_KINDS:
        raise ValueError(f"easy-VQA questions must be one of {QUESTION_KINDS}, got {questions!r}")
    texts, answers, image_ids, paths = _split_data(split)
    used = [i for i in range(len(texts)) if questions == "all" or answers[i] not in ("yes", "no")]
    if questions == "balanced":
        statements = {i: _statement(texts[i], answers[i]) for i in range(len(texts)) if answers[i] in ("yes", "no")}
        for kind in ("color", "shape"):
            true = [i for i, (k, holds) in statements.items() if k == kind and holds]
            false = [i for i, (k, holds) in statements.items() if k == kind and not holds]
            used += true + [false[j] for j in np.linspace(0, len(false) - 1, min(len(true), len(false))).astype(int)]
        used = sorted(set(used))
    if n_turns == 1:
        groups = [[i] for i in used]
    else:
        by_image: Dict[int, List[int]] = {}
        for i in used:
            by_image.setdefault(image_ids[i], []).append(i)
        groups = [indices[k:k + n_turns] for indices in by_image.values()
                  for k in range(0, len(indices), n_turns)]
    if limit is not None:
        groups = groups[:int(limit)]
    records = []
    for group in groups:
        first = group[0]
        records.append({"id": easy_vqa_record_id(split, first) + "".join(f"+{i}" for i in group[1:]),
                        "image": paths.get(image_ids[first], f"<easy-vqa {split} image {image_ids[first]} missing>"),
                        "conversations": easy_vqa_conversation(texts[first], answers[first],
                                                               *((texts[i], answers[i]) for i in group[1:]))})
    return records


def easy_vqa_image_paths(split: str) -> Dict[int, str]:
    """{image id: PNG path} of a split."""
    return dict(_split_data(split)[3])


# Words as the word-level tokenizer splits text: runs of letters / digits, and every
# punctuation character on its own ("user's" -> "user", "'", "s").
_WORD = re.compile(r"[^\W_]+|[^\w\s]|_")


def _words(text: str) -> List[str]:
    return _WORD.findall(text)


def easy_vqa_vocabulary() -> List[str]:
    """Sorted distinct words (and punctuation marks) of every easy-VQA question and
    answer and of the vicuna_v1 prompt template, for `build_word_tokenizer`."""
    from gamma_mod_jax.data.conversation import ROLES, VICUNA_V1_SYSTEM

    words = set(EASY_VQA_ANSWERS)
    for split in SPLITS:
        questions, answers, _, _ = _split_data(split)
        for text in set(questions) | set(answers):
            words.update(_words(text))
    for text in (VICUNA_V1_SYSTEM, *ROLES, ":"):
        words.update(_words(text))
    return sorted(words)


EASY_VQA_COLORS: Tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASY_VQA_SHAPES: Tuple[str, ...] = ("circle", "rectangle", "triangle")


def _statement(question: str, answer: str) -> Tuple[str, bool]:
    """A yes/no question's (kind: "color" | "shape", whether the named value is in the image)."""
    words = set(_words(question))
    kind = "color" if any(c in words for c in EASY_VQA_COLORS) else "shape"
    return kind, (answer == "yes") != ("not" in words or " is no " in f" {question} ")


def easy_vqa_image_labels(split: str = "train") -> Dict[int, Tuple[Optional[str], Optional[str]]]:
    """{image id: (colour, shape)} read off the split's questions and answers (easy-VQA has
    no label file): an open question's answer names the attribute, "what is the blue
    shape?" names the colour too, and a yes/no question states that the named colour or
    shape is or is not there ("not" / "is no" negate). An attribute no question settles,
    directly or by excluding all but one value, is None."""
    texts, answers, image_ids, _ = _split_data(split)
    facts: Dict[int, Dict[str, set]] = {}
    for q, a, image_id in zip(texts, answers, image_ids):
        f = facts.setdefault(image_id, {"color": set(), "shape": set(), "not_color": set(), "not_shape": set()})
        words = set(_words(q))
        colors = [c for c in EASY_VQA_COLORS if c in words]
        shapes = [s for s in EASY_VQA_SHAPES if s in words]
        if a in ("yes", "no"):
            _, holds = _statement(q, a)
            for kind, named in (("color", colors), ("shape", shapes)):
                f[kind if holds else "not_" + kind].update(named)
        else:
            f["color" if a in EASY_VQA_COLORS else "shape"].add(a)
            f["color"].update(colors)  # "what is the blue shape?"
    labels = {}
    for image_id, f in facts.items():
        out = []
        for kind, values in (("color", EASY_VQA_COLORS), ("shape", EASY_VQA_SHAPES)):
            remaining = set(values) - f["not_" + kind]
            known = f[kind] or (remaining if len(remaining) == 1 else set())
            if len(known) > 1:
                raise ValueError(f"easy-VQA {split} image {image_id}: its questions disagree about its {kind} "
                                 f"({sorted(known)})")
            out.append(next(iter(known)) if known else None)
        labels[image_id] = tuple(out)
    return labels
