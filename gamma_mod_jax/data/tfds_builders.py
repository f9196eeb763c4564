"""TensorFlow-datasets builders (ArrayRecord files, no TensorFlow needed to build or read).

    LlavaConversations   "llava_conversations": LLaVA-format conversation data (JSON list
                         or JSON lines + image folder). Features: id (Text), image (the
                         image file's bytes, uint8 [n]; empty when text-only or missing),
                         image_path (Text, as written in the record; "" when text-only),
                         conversations (Text: the turns as JSON), error (Text:
                         "<reason>: <message>" for a record that cannot be used, else "").
    EasyVqa              "easy_vqa": the easy-vqa package's train/test splits. Features: id
                         (Text, "easy_vqa/<split>/<i>"), image (PNG bytes, uint8 [n]),
                         question (Text), answer (Text).

Only `tfds.features.Text` and `tfds.features.Tensor` are used: `tfds.features.Image`
needs TensorFlow to encode. Images are stored as their file bytes and decoded by the
pipeline's map step (PIL). Records keep the source order (shuffling disabled), so a
prepared dataset reads back record for record like `LlavaJsonSource` / easy_vqa_records,
and bad records are stored (with `error`, or with empty image bytes) to be skipped and
counted by the pipeline exactly as from the JSON file.

Build:   build_llava_tfds(json_path, image_dir, data_dir)   /   build_easy_vqa_tfds(data_dir)
Read:    tfds.data_source("llava_conversations" | "easy_vqa", split=..., data_dir=data_dir)
         (this module need not be imported: TFDS reads the prepared directory's metadata),
         or pipeline source "tfds" (data.tfds_name, data.tfds_data_dir).

A prepared dataset is never rebuilt in place: TFDS reuses <data_dir>/<name>/<version>.
Use one data_dir per LLaVA dataset (and per easy-VQA subset size).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Union

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from gamma_mod_jax.data import sources as src_lib

_EMPTY = np.zeros((0,), np.uint8)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """Builders defined in this package (not in a TFDS dataset folder).

    TFDS 4.9.10 looks for a builder's code folder with `importlib_resources`, which it
    only depends on for Python < 3.9; without it building a builder that lives in a
    package fails (ModuleNotFoundError). The code path is simply this file."""

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


def _file_bytes(path: Optional[str]) -> np.ndarray:
    if not path or not os.path.isfile(path):
        return _EMPTY
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)


class LlavaConversations(_LocalBuilder):
    """LLaVA-format conversations with their images (see module docstring).

    json_path: one file (the "train" split) or {split: file}; image_dir: the folder the
    records' image paths are relative to; max_examples: keep the first N per split.
    These arguments are needed to build only; reading needs just data_dir."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "LLaVA conversation JSON / JSON lines with image bytes."}

    def __init__(self, *, json_path: Union[str, Mapping[str, str], None] = None, image_dir: Optional[str] = None,
                 max_examples: Optional[int] = None, **kwargs):
        self._json_paths = ({"train": json_path} if isinstance(json_path, (str, os.PathLike)) else
                            dict(json_path or {}))
        self._image_dir = image_dir
        self._max_examples = max_examples
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA-format conversation records (mix665k / LCS-558K style) with image file bytes.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                "image_path": tfds.features.Text(),
                "conversations": tfds.features.Text(),
                "error": tfds.features.Text(),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        if not self._json_paths:
            raise ValueError("building llava_conversations needs json_path (a file or {split: file})")
        return {split: self._generate_examples(path) for split, path in self._json_paths.items()}

    def _generate_examples(self, json_path):
        source = src_lib.LlavaJsonSource(json_path, self._image_dir)
        n = len(source) if self._max_examples is None else min(len(source), int(self._max_examples))
        for i in range(n):
            record = source[i]
            raw_path = record["image"]
            if raw_path is not None and self._image_dir is not None:
                # Store the path as the record wrote it (relative to image_dir).
                rel = os.path.relpath(raw_path, self._image_dir)
                raw_path = raw_path if rel.startswith("..") else rel
            error = record.get("error")
            yield i, {
                "id": record["id"],
                "image": _EMPTY if error else _file_bytes(record["image"]),
                "image_path": "" if error or raw_path is None else raw_path,
                "conversations": json.dumps(record["conversations"], ensure_ascii=False),
                "error": f"{error[0]}: {error[1]}" if error else "",
            }


class EasyVqa(_LocalBuilder):
    """easy-VQA from the installed easy-vqa package; max_examples keeps the first N
    questions per split (a smaller build for tests and smoke runs)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "easy-vqa 1.0 questions with PNG image bytes."}

    def __init__(self, *, max_examples: Optional[int] = None, **kwargs):
        self._max_examples = max_examples
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="easy-VQA: simple shape/colour questions over 64x64 images (pip package easy-vqa).",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }),
            homepage="https://github.com/vzhou842/easy-VQA",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        from gamma_mod_jax.data import easy_vqa

        questions, answers, image_ids, paths = easy_vqa._split_data(split)
        n = len(questions) if self._max_examples is None else min(len(questions), int(self._max_examples))
        cache = {}
        for i in range(n):
            image_id = image_ids[i]
            if image_id not in cache:
                cache[image_id] = _file_bytes(paths.get(image_id))
            yield i, {"id": easy_vqa.easy_vqa_record_id(split, i), "image": cache[image_id],
                      "question": questions[i], "answer": answers[i]}


def build_llava_tfds(json_path: Union[str, Mapping[str, str]], image_dir: Optional[str], data_dir: str, *,
                     max_examples: Optional[int] = None) -> LlavaConversations:
    """Prepares "llava_conversations" under data_dir (a no-op if already prepared)."""
    builder = LlavaConversations(json_path=json_path, image_dir=image_dir, max_examples=max_examples,
                                 data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def build_easy_vqa_tfds(data_dir: str, *, max_examples: Optional[int] = None) -> EasyVqa:
    """Prepares "easy_vqa" under data_dir (a no-op if already prepared)."""
    builder = EasyVqa(max_examples=max_examples, data_dir=data_dir)
    builder.download_and_prepare()
    return builder
