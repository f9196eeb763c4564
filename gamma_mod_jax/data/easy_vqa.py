"""easy-VQA (the `easy-vqa` PyPI package: 64x64 PNG shapes, ~38.6k train and ~9.7k test
questions over 4000 / 1000 images, 13 one-word answers) as LLaVA-format records.

    easy_vqa_records(split)    [{"id", "image": PNG path inside the package,
                                 "conversations": [human "<image>\\n{question}", gpt "{answer}"]}]
    easy_vqa_vocabulary()      every word of the questions, answers and the prompt template
                               (for `tokenizer.build_word_tokenizer`)
    EASY_VQA_ANSWERS           the 13 answers, in the package's order
"""

from __future__ import annotations

import functools
import re
from typing import Dict, List, Optional, Tuple

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


def easy_vqa_conversation(question: str, answer: str) -> List[Dict[str, str]]:
    """The LLaVA-format turns of one easy-VQA question."""
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def easy_vqa_record_id(split: str, index: int) -> str:
    return f"easy_vqa/{split}/{index}"


def easy_vqa_records(split: str = "train", limit: Optional[int] = None) -> List[Dict]:
    """LLaVA-format records of an easy-VQA split in the package's question order
    (the first `limit` when given); record i has id "easy_vqa/<split>/<i>"."""
    questions, answers, image_ids, paths = _split_data(split)
    n = len(questions) if limit is None else min(int(limit), len(questions))
    records = []
    for i in range(n):
        records.append({"id": easy_vqa_record_id(split, i),
                        "image": paths.get(image_ids[i], f"<easy-vqa {split} image {image_ids[i]} missing>"),
                        "conversations": easy_vqa_conversation(questions[i], answers[i])})
    return records


def easy_vqa_image_path(split: str, index: int) -> str:
    """The PNG file of question `index` of `split` (KeyError if the package lacks it)."""
    _, _, image_ids, paths = _split_data(split)
    return paths[image_ids[index]]


def easy_vqa_split_size(split: str) -> int:
    return len(_split_data(split)[0])


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
