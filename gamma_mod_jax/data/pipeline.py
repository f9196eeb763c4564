"""The training input pipeline (Grain) and evaluation prompts for LLaVA-format data.

    source (sources.py)  ->  length index (text lengths, built once, cached beside the data)
    ->  batch plan: per epoch a seeded shuffle of the usable records, cut into global
        batches of global_batch_size; each global batch's length from all its examples
        (the same plan in every process)
    ->  map over global batch numbers: encode this process's rows of the batch (conversation,
        truncation, image), collate at the plan's length  (threads, worker processes)
    ->  bad-record accounting  (the training process)

`make_train_iterator` (or `make_train_iterator_from_config(config, model_cfg)` for a
training config) returns a Grain `DatasetIterator` (get_state / set_state, and
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` in an Orbax CheckpointManager)
yielding numpy batches:

    input_ids       int32 [B, T]  text ids, -200 where the image goes, pad 0
    attention_mask  int32 [B, T]  1 on real tokens
    labels          int32 [B, T]  -100 where unsupervised and on padding
    token_types     int32 [B, T]  gamma_mod_jax.token_types (padding = PADDING)
    pixel_values    float32 [B, S, S, 3]  CLIP-normalised; zeros for text-only rows (uint8
                                  resized pixels with data.uint8_pixels, normalised on device)
    valid           int32 [B]     1 for real examples, 0 for padding rows (a record that
                                  failed to encode, or filler at the end of a finite run
                                  with drop_remainder=False; all -100 labels, no attention)

T is the smallest configured bucket holding the longest example of the *global* batch
(every process's rows), so a jitted step compiles once per bucket and all processes hold
the same shapes at every step. Process p's rows are rows [p * B, (p + 1) * B) of the
global batch, B = global_batch_size / process_count.

Bad records (sources.SKIP_REASONS) never raise. Those the length index can see (the
source's error, no assistant turn, a conversation the encoder refuses, a missing image
file, over-long with truncation "drop") are left out of the plan and reported by every
process with the first batch of each epoch. A record that fails only when this process
encodes it (an image that does not decode, a truncation that keeps no answer) becomes
a padding row after the process's real rows (valid 0), so the global shape still agrees.
Each batch carries (reason, id, message) of those events and of every truncated example
("truncate_right"); the outermost iterator, in the training process, moves them into a
`BadRecordLog` that is part of the iterator's checkpoint state. The trainer reads them
with `iterator.stats()` (flat counts: skipped, truncated, skipped_<reason>, and the
plan's padding_efficiency, length, global_batches) or `pipeline_stats(iterator)`
(counts, ids, first message per reason); each skipped id is also logged once.

The order depends on the seed, the global batch size, the buckets and the data alone:
not on the process count, the mesh or worker_count. The iterator state is the number
of global batches served (plus the bad-record log), so a checkpoint restores onto
another process count or worker count and continues the same sequence.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import grain
import ml_collections
import numpy as np

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.data import sources as src_lib
from gamma_mod_jax.io_utils import atomic_write
from gamma_mod_jax.token_types import IGNORE_INDEX, IMAGE_TOKEN_INDEX

log = logging.getLogger(__name__)

SOURCES = ("llava_json", "tfds", "easy_vqa")
TRUNCATION_POLICIES = ("drop", "truncate_right")


def data_config_defaults() -> ml_collections.ConfigDict:
    """The data section of a training config, with its defaults."""
    p = ml_collections.config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.source = "llava_json"            # "llava_json" | "tfds" | "easy_vqa"
    c.json_path = p(str)               # llava_json: a JSON list or JSON-lines file
    c.image_dir = p(str)               # llava_json: image paths in the records are relative to it
    c.allow_paths_outside_image_dir = False  # True: absolute / ../ image paths may leave image_dir
    c.tfds_name = p(str)               # tfds: "llava_conversations" | "easy_vqa" (tfds_builders.py)
    c.tfds_data_dir = p(str)           # tfds (and easy_vqa when set): where the prepared data lies
    c.split = "train"                  # tfds / easy_vqa split
    c.easy_vqa_turns = 1               # easy_vqa: questions per conversation (an image's questions as turns)
    c.easy_vqa_questions = "all"       # easy_vqa: "all" | "open" (colour/shape answers) | "balanced" (easy_vqa.py)
    c.max_records = p(int)             # use only the first N records of the source
    c.tokenizer_path = p(str)          # used when no tokenizer object is passed
    c.template = "vicuna_v1"
    c.image_token_index = IMAGE_TOKEN_INDEX
    c.pad_token_id = 0
    c.buckets = (64, 128)              # static text lengths T (placeholder included)
    c.truncation = "drop"              # over-long examples: "drop" | "truncate_right"
    c.move_image_to_front = False
    c.image_size = p(int)              # the model's input_image_size (make_train_iterator's argument wins)
    c.batch_size = 8                   # per process (global batch: batch_size x processes)
    c.global_batch_size = p(int)       # the plan's global batch (None: batch_size x processes); when set, each
                                       # process gets global_batch_size / processes rows (batch_size unused)
    c.group_by_modality = False        # LLaVA's group_by_modality_length: batches all with or all without image
    c.length_index_dir = p(str)        # where the per-record length index is cached (None: beside json_path)
    c.length_index_workers = 0         # processes building the length index (0: in this process)
    c.shuffle_seed = p(int)            # None: make_train_iterator's seed
    c.num_epochs = p(int)              # None: repeat forever
    c.worker_count = 0                 # 0: in the training process
    c.worker_buffer_size = 2           # batches buffered per worker
    c.read_threads = 2                 # threads per process running the map step
    c.read_buffer_size = 16            # examples prefetched per process
    c.drop_remainder = True
    # True: pixel_values travel as the resized uint8 image and the trainer normalises them on
    # the device (the same values; 4x fewer bytes host -> device); False: CLIP-normalised float32
    c.uint8_pixels = False
    c.max_consecutive_skips = 10_000   # this many bad records in a row: the data is broken, raise
    c.max_logged_ids = 1_000           # ids kept per skip reason (counts are always exact)
    return c


_UNSET_IF_EMPTY = ("json_path", "image_dir", "tfds_name", "tfds_data_dir", "tokenizer_path", "image_size",
                   "global_batch_size", "length_index_dir")


def _cfg(data_cfg) -> ml_collections.ConfigDict:
    """data_cfg (ConfigDict, mapping, or attribute object) over the defaults."""
    out = data_config_defaults()
    if isinstance(data_cfg, ml_collections.ConfigDict):
        items = data_cfg.items()
    elif isinstance(data_cfg, Mapping):
        items = data_cfg.items()
    elif dataclasses.is_dataclass(data_cfg):
        items = dataclasses.asdict(data_cfg).items()
    else:
        items = vars(data_cfg).items()
    unknown = [k for k, _ in items if k not in out]
    if unknown:
        raise ValueError(f"unknown data config field(s) {sorted(unknown)}; known: {sorted(out.keys())}")
    with out.ignore_type():
        for k, v in items:
            if k in _UNSET_IF_EMPTY and (v == "" or v == 0):
                v = None  # configs write "" / 0 for "not set"
            out[k] = v
    if out.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {out.source!r}")
    if out.truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"data.truncation must be one of {TRUNCATION_POLICIES}, got {out.truncation!r}")
    buckets = tuple(int(b) for b in out.buckets)
    if not buckets or any(b < 2 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"data.buckets must be increasing text lengths >= 2, got {tuple(out.buckets)}")
    with out.ignore_type():
        out.buckets = buckets
    if int(out.batch_size) < 1:
        raise ValueError(f"data.batch_size must be at least 1, got {out.batch_size}")
    return out


# ----------------------------------------------------------------------------- sources


def make_source(data_cfg, *, split: Optional[str] = None):
    """The random-access record source named by `data_cfg.source`:
    llava_json -> LlavaJsonSource(json_path, image_dir); tfds -> TfdsSource(tfds_name);
    easy_vqa -> the installed easy-vqa package's split (or, when tfds_data_dir is set,
    the prepared TFDS "easy_vqa" dataset there)."""
    cfg = _cfg(data_cfg)
    split = split or cfg.split
    if cfg.source == "llava_json":
        if not cfg.json_path:
            raise ValueError("data.source 'llava_json' needs data.json_path")
        return src_lib.LlavaJsonSource(cfg.json_path, cfg.image_dir,
                                       allow_paths_outside_image_dir=bool(cfg.allow_paths_outside_image_dir))
    if cfg.source == "tfds":
        if not cfg.tfds_name:
            raise ValueError("data.source 'tfds' needs data.tfds_name")
        return src_lib.TfdsSource(cfg.tfds_name, split=split, data_dir=cfg.tfds_data_dir)
    turns = int(cfg.easy_vqa_turns)
    if cfg.tfds_data_dir:
        if turns != 1 or cfg.easy_vqa_questions != "all":
            raise ValueError(f"data.easy_vqa_turns={turns}, data.easy_vqa_questions={cfg.easy_vqa_questions!r}: the "
                             f"prepared TFDS easy_vqa dataset holds every question, one per record; grouping and "
                             f"selecting read the easy-vqa package (unset data.tfds_data_dir)")
        return src_lib.TfdsSource("easy_vqa", split=split, data_dir=cfg.tfds_data_dir)
    from gamma_mod_jax.data.easy_vqa import easy_vqa_records
    name = (f"easy_vqa/{split}" + (f", {cfg.easy_vqa_questions} questions" if cfg.easy_vqa_questions != "all" else "")
            + (f", {turns} per conversation" if turns != 1 else ""))
    records = easy_vqa_records(split, questions_per_conversation=turns, questions=cfg.easy_vqa_questions)
    return src_lib.RecordListSource(records, name=name)


# ----------------------------------------------------------------------------- map step


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _has_assistant_turn(conversations) -> bool:
    return any(t.get("from") in ("gpt", "assistant") and t.get("value", "").strip() for t in conversations)


def _decode_image(record) -> Any:
    """The record's image as a PIL RGB image; _Skip(MISSING_IMAGE | UNREADABLE_IMAGE)."""
    from gamma_mod_jax.data.conversation import BadRecord
    from gamma_mod_jax.data.image import load_image

    path = record["image"]
    if "image_bytes" in record:
        data = np.asarray(record["image_bytes"], np.uint8)
        if data.size == 0:
            raise _Skip(src_lib.MISSING_IMAGE, f"image {path} was missing when the dataset was built")
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data.tobytes())) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises many types for bad bytes
            raise _Skip(src_lib.UNREADABLE_IMAGE, f"image {path}: {type(e).__name__}: {e}") from None
    if not os.path.isfile(path):
        raise _Skip(src_lib.MISSING_IMAGE, f"image file {path} not found")
    try:
        return load_image(path)
    except BadRecord as e:
        raise _Skip(src_lib.UNREADABLE_IMAGE, str(e)) from None
    except Exception as e:
        raise _Skip(src_lib.UNREADABLE_IMAGE, f"image {path}: {type(e).__name__}: {e}") from None


def min_token_count(tokenizer):
    """A function texts -> a lower bound on the tokens `tokenizer` makes of them, cheap
    enough to run before tokenizing (None when the kind of tokenizer is unknown).
    Subword models (BPE, Unigram, SentencePiece) cover at most their longest vocabulary
    piece's length of non-space characters per token (byte-level and byte-fallback
    pieces cover one byte); word-level models (WordLevel, WordPiece: an unknown word is
    one token) make at least one token per whitespace-separated word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kind = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    if kind in ("WordLevel", "WordPiece"):
        return lambda texts: sum(len(t.split()) for t in texts)
    if kind in ("BPE", "Unigram") or "Llama" in kind or "SentencePiece" in kind:
        longest = max(1, max((len(piece) for piece in tokenizer.get_vocab()), default=1))
        return lambda texts: sum(len(t) - sum(t.count(c) for c in " \t\n\r") for t in texts) // longest
    return None


@dataclasses.dataclass
class ExampleEncoder:
    """Grain map step: raw record -> encoded example, or a skip marker
    {"_skip": reason, "_id", "_message"}. Never raises for a bad record: any exception
    encoding one is a counted skip with the record's id. With truncation "drop" a
    conversation that cannot fit in max_len tokens by its characters (min_token_count)
    is skipped as over-long before it is tokenized."""
    tokenizer: Any
    image_size: int
    max_len: int
    truncation: str = "drop"
    move_image_to_front: bool = False
    template: str = "vicuna_v1"
    image_token_index: int = IMAGE_TOKEN_INDEX
    uint8_pixels: bool = False         # pixel_values: resized uint8 instead of normalised float32

    def __call__(self, record: Dict[str, Any]) -> Dict[str, Any]:
        rid = str(record.get("id", "?")) if isinstance(record, Mapping) else "?"
        try:
            return self._encode(record, rid)
        except _Skip as s:
            return {"_skip": s.reason, "_id": rid, "_message": str(s)}
        except Exception as e:  # noqa: BLE001 - one odd record must never stop training
            return {"_skip": src_lib.MALFORMED, "_id": rid, "_message": f"record {rid}: {type(e).__name__}: {e}"}

    def _min_tokens(self, texts) -> int:
        if not hasattr(self, "_count"):
            self._count = min_token_count(self.tokenizer)
        return self._count(texts) if self._count is not None else 0

    def _encode(self, record, rid):
        from gamma_mod_jax.data import conversation as conv
        from gamma_mod_jax.data.image import preprocess_image, resize_and_crop

        if record.get("error"):
            reason, message = record["error"]
            raise _Skip(reason, message)
        if not _has_assistant_turn(record["conversations"]):
            raise _Skip(src_lib.NO_ASSISTANT_TURN, f"record {rid} has no non-empty assistant ('gpt') turn")
        if self.truncation == "drop":
            at_least = self._min_tokens([turn["value"] for turn in record["conversations"]])
            if at_least > self.max_len:
                raise _Skip(src_lib.OVER_LONG, f"record {rid}: at least {at_least} tokens by its characters "
                                               f"> {self.max_len} (not tokenized)")
        if self.move_image_to_front:
            record = conv.move_image_to_front(record)
        has_image = record.get("image") is not None
        try:
            enc = conv.encode_conversation(record["conversations"], self.tokenizer, has_image=has_image,
                                           image_token_index=self.image_token_index, template=self.template)
        except conv.BadRecord as e:
            raise _Skip(src_lib.BAD_CONVERSATION, f"record {rid}: {e}") from None
        except Exception as e:  # a tokenizer failing on odd text must not stop training
            raise _Skip(src_lib.BAD_CONVERSATION, f"record {rid}: {type(e).__name__}: {e}") from None
        length = len(enc["input_ids"])
        truncated = False
        if length > self.max_len:
            try:
                enc, truncated = conv.truncate(enc, self.max_len, self.truncation,
                                               image_token_index=self.image_token_index)
            except conv.BadRecord as e:
                raise _Skip(src_lib.OVER_LONG, f"record {rid}: {length} tokens > {self.max_len}: {e}") from None
            if not np.any(np.asarray(enc["labels"]) != IGNORE_INDEX):
                raise _Skip(src_lib.OVER_LONG, f"record {rid}: {length} tokens; no answer token is left "
                                               f"within the first {self.max_len}")
            if has_image and not np.any(np.asarray(enc["input_ids"]) == self.image_token_index):
                raise _Skip(src_lib.OVER_LONG, f"record {rid}: {length} tokens; the image placeholder is "
                                               f"beyond the first {self.max_len}")
        pixels = None
        if has_image:
            image = _decode_image(record)
            try:
                pixels = (resize_and_crop(image, self.image_size) if self.uint8_pixels
                          else np.asarray(preprocess_image(image, self.image_size), np.float32))
            except Exception as e:  # e.g. a zero-sized image
                raise _Skip(src_lib.UNREADABLE_IMAGE, f"image {record['image']}: {type(e).__name__}: {e}") from None
        return {"input_ids": np.asarray(enc["input_ids"], np.int32),
                "labels": np.asarray(enc["labels"], np.int32),
                "token_types": np.asarray(enc["token_types"], np.int32),
                "pixel_values": pixels, "_id": rid, "_truncated": bool(truncated)}


# ----------------------------------------------------------------------------- batching


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def collate(examples: Sequence[Optional[Dict[str, Any]]], *, batch_size: int, image_size: int,
            buckets: Optional[Sequence[int]] = None, length: Optional[int] = None,
            pad_token_id: int = 0, pixel_dtype=np.float32) -> Dict[str, np.ndarray]:
    """Encoded examples -> one right-padded batch of `batch_size` rows at text length
    `length` (None: the smallest of `buckets` that fits the longest example). A None
    example, and every row after the last example, is a padding row: valid 0, no
    attended token, all labels -100. Text-only and padding rows have zero pixels (of
    `pixel_dtype`: float32 normalised, or uint8 for on-device normalisation)."""
    real = [e for e in examples if e is not None]
    t = length if length is not None else pick_bucket(max(len(e["input_ids"]) for e in real), buckets)
    b = batch_size
    out = {"input_ids": np.full((b, t), pad_token_id, np.int32),
           "attention_mask": np.zeros((b, t), np.int32),
           "labels": np.full((b, t), IGNORE_INDEX, np.int32),
           "token_types": np.full((b, t), tt.PADDING, np.int32),
           "pixel_values": np.zeros((b, image_size, image_size, 3), pixel_dtype),
           "valid": np.zeros((b,), np.int32)}
    for i, e in enumerate(examples):
        if e is None:
            continue
        n = len(e["input_ids"])
        if n > t:
            raise ValueError(f"record {e.get('_id', '?')}: {n} tokens do not fit the batch's length {t}")
        out["input_ids"][i, :n] = e["input_ids"]
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = e["labels"]
        out["token_types"][i, :n] = e["token_types"]
        if e.get("pixel_values") is not None:
            out["pixel_values"][i] = e["pixel_values"]
        out["valid"][i] = 1
    return out


# ----------------------------------------------------------------------------- the global batch plan
#
# Every process derives the same sequence of global batches from the record lengths, the
# seed and the global batch size alone (BatchPlan), and encodes only its own rows of each
# (_PlannedBatchEncoder). Shapes therefore agree across processes without any
# communication, and the order does not depend on the process count, the mesh or the
# number of worker processes.


def record_text_length(record: Mapping[str, Any], tokenizer, *, template: str = "vicuna_v1",
                       image_token_index: int = IMAGE_TOKEN_INDEX, move_image_to_front: bool = False,
                       drop_over: Optional[int] = None, min_tokens=None):
    """(text length, None) of a raw record as the map step will encode it (the image
    placeholder counts 1; before truncation), or (-1, (reason, message)) for a record the
    plan leaves out: the source's error, no assistant turn, a conversation the encoder
    refuses, an image file that does not exist (or was not stored), and with `drop_over`
    (truncation "drop": the largest bucket) a text that cannot fit by its characters
    (`min_tokens`, default min_token_count), before it is tokenized. Reads no image."""
    from gamma_mod_jax.data import conversation as conv

    rid = str(record.get("id", "?"))
    if record.get("error"):
        return -1, tuple(record["error"])
    if not _has_assistant_turn(record["conversations"]):
        return -1, (src_lib.NO_ASSISTANT_TURN, f"record {rid} has no non-empty assistant ('gpt') turn")
    if drop_over is not None:  # truncation "drop": a text that cannot fit is not tokenized
        count = min_tokens or min_token_count(tokenizer)
        at_least = count([turn["value"] for turn in record["conversations"]]) if count is not None else 0
        if at_least > drop_over:
            return -1, (src_lib.OVER_LONG, f"record {rid}: at least {at_least} tokens by its characters "
                                           f"> {drop_over} (not tokenized)")
    if move_image_to_front:
        record = conv.move_image_to_front(record)
    has_image = record.get("image") is not None
    try:
        enc = conv.encode_conversation(record["conversations"], tokenizer, has_image=has_image,
                                       image_token_index=image_token_index, template=template)
    except Exception as e:  # BadRecord, or a tokenizer failing on odd text
        message = str(e) if isinstance(e, conv.BadRecord) else f"{type(e).__name__}: {e}"
        return -1, (src_lib.BAD_CONVERSATION, f"record {rid}: {message}")
    if has_image:
        path = record["image"]
        if "image_bytes" in record:
            if np.asarray(record["image_bytes"]).size == 0:
                return -1, (src_lib.MISSING_IMAGE, f"image {path} was missing when the dataset was built")
        elif not os.path.isfile(path):
            return -1, (src_lib.MISSING_IMAGE, f"image file {path} not found")
    return len(enc["input_ids"]), None


@dataclasses.dataclass
class LengthIndex:
    """Per record of a source: `lengths` int32 [n] (text length, -1 for a record left
    out), `has_image` bool [n], `ids` (record ids) and `problems` {index: (reason,
    message)} of the records left out."""
    lengths: np.ndarray
    has_image: np.ndarray
    ids: List[str]
    problems: Dict[int, Tuple[str, str]]


def _tokenizer_fingerprint(tokenizer) -> str:
    import hashlib

    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return f"{type(tokenizer).__name__}:{len(vocab)}:{digest}"


def _length_index_path(cfg, source, n: int, tokenizer) -> Optional[str]:
    """Where the index of this source, encoding and tokenizer is cached: data.length_index_dir,
    else beside a LLaVA JSON file; None for in-memory sources (built each time)."""
    import hashlib

    data_file = getattr(source, "json_path", None)
    folder = cfg.length_index_dir or (os.path.dirname(os.path.abspath(data_file)) if data_file else None)
    if folder is None:
        return None
    stat = os.stat(data_file) if data_file else None
    key = json.dumps([repr(source), data_file, stat and stat.st_size, stat and stat.st_mtime_ns,
                      getattr(source, "image_dir", None), n, _tokenizer_fingerprint(tokenizer), cfg.template,
                      int(cfg.image_token_index), bool(cfg.move_image_to_front), _drop_over(cfg)])
    name = os.path.basename(data_file) if data_file else "source"
    return os.path.join(folder, f"{name}.lengths-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")


def _drop_over(cfg) -> Optional[int]:
    """The length above which a record is left out before tokenizing (truncation "drop")."""
    return int(cfg.buckets[-1]) if cfg.truncation == "drop" else None


def _index_range(source, tokenizer, start: int, stop: int, template: str, image_token_index: int,
                 move_image_to_front: bool, drop_over: Optional[int]):
    """record_text_length of records [start, stop): (lengths, has_image, ids, problems)."""
    lengths = np.full((stop - start,), -1, np.int32)
    has_image = np.zeros((stop - start,), bool)
    ids: List[str] = []
    problems: Dict[int, Tuple[str, str]] = {}
    min_tokens = min_token_count(tokenizer) if drop_over is not None else None  # reads the vocabulary once
    for i in range(start, stop):
        record = source[i]
        ids.append(str(record.get("id", i)))
        has_image[i - start] = record.get("image") is not None
        try:
            lengths[i - start], problem = record_text_length(record, tokenizer, template=template,
                                                             image_token_index=image_token_index,
                                                             move_image_to_front=move_image_to_front,
                                                             drop_over=drop_over, min_tokens=min_tokens)
        except Exception as e:  # noqa: BLE001 - one odd record must never stop training
            lengths[i - start] = -1
            problem = (src_lib.MALFORMED, f"record {ids[-1]}: {type(e).__name__}: {e}")
        if problem is not None:
            problems[i] = (str(problem[0]), str(problem[1]))
    return lengths, has_image, ids, problems


def build_length_index(source, n: int, tokenizer, cfg, workers: int = 0) -> LengthIndex:
    """The text length of each of the first n records of `source` (record_text_length);
    `workers` > 1: in that many worker processes (the source and tokenizer are pickled)."""
    args = (cfg.template, int(cfg.image_token_index), bool(cfg.move_image_to_front), _drop_over(cfg))
    if workers > 1 and n >= 2 * workers:
        import concurrent.futures
        import multiprocessing

        bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_index_range, *zip(*[(source, tokenizer, int(a), int(b), *args)
                                                       for a, b in zip(bounds[:-1], bounds[1:])])))
    else:
        parts = [_index_range(source, tokenizer, 0, n, *args)]
    problems: Dict[int, Tuple[str, str]] = {}
    for part in parts:
        problems.update(part[3])
    return LengthIndex(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                       [i for p in parts for i in p[2]], problems)


def length_index(source, n: int, tokenizer, cfg) -> LengthIndex:
    """build_length_index, cached in an .npz file (see _length_index_path) that is
    written once (atomically) and read by every later run and process."""
    path = _length_index_path(cfg, source, n, tokenizer)
    if path and os.path.isfile(path):
        with np.load(path) as f:
            problems = {int(k): (r, m) for k, (r, m) in json.loads(str(f["problems"])).items()}
            return LengthIndex(f["lengths"], f["has_image"], json.loads(str(f["ids"])), problems)
    log.info("building the length index of %d records (%s)%s", n, source,
             f" in {cfg.length_index_workers} processes" if int(cfg.length_index_workers) > 1 else "")
    index = build_length_index(source, n, tokenizer, cfg, workers=int(cfg.length_index_workers))
    if path:
        try:
            with atomic_write(path, "wb") as f:
                np.savez(f, lengths=index.lengths, has_image=index.has_image, ids=json.dumps(index.ids),
                         problems=json.dumps({str(k): v for k, v in index.problems.items()}))
        except OSError as e:  # a read-only data folder: rebuilt next time
            log.warning("could not cache the length index at %s (%s); set data.length_index_dir", path, e)
    return index


class BatchPlan:
    """The run's sequence of global batches, the same in every process.

    Default: the usable records in the order of Grain's global shuffle of all records
    (`MapDataset.shuffle(seed)`: grain.experimental.index_shuffle with seed + epoch, a new
    order every epoch), cut into consecutive global batches of `global_batch_size` (a
    batch may span two epochs; a finite run's last partial batch is dropped with
    drop_remainder, otherwise filled with padding rows, index -1). With one process and
    no bad record these are the batches of the earlier per-process pipeline.
    group_by_modality (LLaVA's `group_by_modality_length`): per epoch, records with and
    without an image are shuffled (numpy, seed (seed, epoch)) and cut separately, the full
    batches of both kinds shuffled together, the two remainders merged and cut into the
    last batches of the epoch (a partial one dropped or filled as above).
    A batch's text length is the smallest bucket holding its longest example
    (over-long examples: the largest bucket, truncated by the map step; with truncation
    "drop" they are left out of the plan)."""

    def __init__(self, index: LengthIndex, *, global_batch_size: int, buckets: Sequence[int], seed: int,
                 num_epochs: Optional[int], drop_remainder: bool, truncation: str = "drop",
                 group_by_modality: bool = False):
        self.buckets = tuple(int(b) for b in buckets)
        self.global_batch_size, self.seed = int(global_batch_size), int(seed)
        self.num_epochs, self.drop_remainder = num_epochs, bool(drop_remainder)
        self.group_by_modality = bool(group_by_modality)
        self.has_image, self.ids = np.asarray(index.has_image, bool), index.ids
        lengths = np.asarray(index.lengths, np.int64)
        self.problems = dict(index.problems)
        if truncation == "drop":
            for i in np.flatnonzero(lengths > self.buckets[-1]):
                self.problems[int(i)] = (src_lib.OVER_LONG, f"record {self.ids[i]}: {lengths[i]} tokens > "
                                                            f"{self.buckets[-1]}")
                lengths[i] = -1
        self.lengths = np.minimum(lengths, self.buckets[-1])  # truncate_right cuts to the largest bucket
        self.usable = np.flatnonzero(self.lengths >= 0)
        u, g = len(self.usable), self.global_batch_size
        if self.group_by_modality:
            kinds = [int(self.has_image[self.usable].sum()), int((~self.has_image[self.usable]).sum())]
            rest = sum(k % g for k in kinds)
            self.batches_per_epoch = (sum(k // g for k in kinds) + rest // g
                                      + int(not self.drop_remainder and rest % g > 0))
            self._batches = None if self.batches_per_epoch == 0 else (
                self.batches_per_epoch * int(num_epochs) if num_epochs is not None else sys.maxsize)
        else:
            self.batches_per_epoch = u / g  # batches span epochs
            positions = None if num_epochs is None else u * int(num_epochs)
            self._batches = (sys.maxsize if u else None) if positions is None else (
                positions // g if self.drop_remainder else -(-positions // g))
        # Plan-phase skips in source order: reported once per epoch, with the batch that starts it.
        self.epoch_events = [[reason, self.ids[i], message] for i, (reason, message) in sorted(self.problems.items())]
        self._cache: Dict[int, Any] = {}

    def __len__(self) -> int:
        if self._batches is None:
            counts = collections.Counter(reason for reason, _ in self.problems.values())
            raise src_lib.BrokenDataError(
                f"the data yields no batch: {len(self.usable)} usable records of {len(self.lengths)}, fewer than "
                f"one global batch of {self.global_batch_size}; skipped {len(self.problems)} "
                f"({', '.join(f'{r}: {c}' for r, c in sorted(counts.items())) or 'none'})")
        return self._batches

    def _epoch(self, e: int):
        """Plain: the usable records of epoch e in order; grouped: its batches [n, g]."""
        if e not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[e] = self._grouped_epoch(e) if self.group_by_modality else self._shuffled_epoch(e)
        return self._cache[e]

    def _shuffled_epoch(self, e: int) -> np.ndarray:
        n = len(self.lengths)
        seed = (self.seed + e) % 2 ** 32
        order = np.fromiter((grain.experimental.index_shuffle(j, max_index=n - 1, seed=seed, rounds=4)
                             for j in range(n)), np.int64, n) if n > 1 else np.zeros((n,), np.int64)
        return order[self.lengths[order] >= 0]

    def _grouped_epoch(self, e: int) -> np.ndarray:
        g = self.global_batch_size
        rng = np.random.default_rng([self.seed, e])

        def cut(order):
            full = len(order) // g
            return order[: full * g].reshape(full, g), order[full * g:]

        parts = [self.usable[self.has_image[self.usable]], self.usable[~self.has_image[self.usable]]]
        cuts = [cut(rng.permutation(p)) for p in parts]
        batches = np.concatenate([c[0] for c in cuts])[rng.permutation(sum(len(c[0]) for c in cuts))]
        merged, rest = cut(np.sort(np.concatenate([c[1] for c in cuts])))
        batches = np.concatenate([batches.reshape(-1, g), merged])
        if not self.drop_remainder and len(rest):
            batches = np.concatenate([batches, np.pad(rest, (0, g - len(rest)), constant_values=-1)[None]])
        return batches

    def _rows_and_epoch_starts(self, k: int) -> Tuple[np.ndarray, int]:
        g = self.global_batch_size
        if self.group_by_modality:
            e, j = divmod(k, self.batches_per_epoch)
            return self._epoch(e)[j], int(j == 0)
        u = len(self.usable)
        start, stop = k * g, (k + 1) * g
        if self.num_epochs is not None:
            stop = min(stop, u * int(self.num_epochs))
        parts, pos = [], start
        while pos < stop:
            e, offset = divmod(pos, u)
            take = min(stop, (e + 1) * u) - pos
            parts.append(self._epoch(e)[offset: offset + take])
            pos += take
        rows = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
        starts = -(-stop // u) - -(-start // u)  # epochs whose first record falls in [start, stop)
        return np.pad(rows, (0, g - len(rows)), constant_values=-1), starts

    def batch(self, k: int) -> Tuple[np.ndarray, int, int]:
        """(record indices [global_batch_size] with -1 for padding rows, text length, number
        of epochs that start in it) of global batch k."""
        if not 0 <= k < len(self):
            raise IndexError(f"global batch {k} not in [0, {len(self)})")
        rows, starts = self._rows_and_epoch_starts(int(k))
        longest = int(self.lengths[rows[rows >= 0]].max(initial=1))
        return rows, pick_bucket(longest, self.buckets), starts

    def batches(self, first: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """(record indices [n, global_batch_size], text lengths [n]) of global batches [first, stop)."""
        out = [self.batch(k)[:2] for k in range(first, stop)]
        return (np.stack([r for r, _ in out]) if out else np.zeros((0, self.global_batch_size), np.int64),
                np.asarray([t for _, t in out], np.int64))


class _PlannedBatchEncoder:
    """Grain map step: global batch number -> this process's rows of it, encoded and
    collated at the plan's length. Rows whose record fails to encode here (an image that
    does not decode, an over-long conversation whose truncation keeps no answer) become
    padding rows (valid 0, after the rows that encode), so the global shape still agrees
    with every other process; the skip is counted by this process."""

    def __init__(self, plan: BatchPlan, source, encoder: ExampleEncoder, *, process_index: int,
                 process_count: int, image_size: int, pad_token_id: int):
        self.plan, self.source, self.encoder = plan, source, encoder
        self.rows_per_process = plan.global_batch_size // process_count
        self.first_row = process_index * self.rows_per_process
        self.image_size, self.pad_token_id = image_size, pad_token_id

    def __call__(self, k: int) -> Dict[str, Any]:
        plan = self.plan
        rows, length, epoch_starts = plan.batch(k)
        events: List[List[str]] = [list(ev) for _ in range(epoch_starts) for ev in plan.epoch_events]
        examples: List[Dict[str, Any]] = []  # the rows that encode; padding rows follow them
        skipped = 0
        for i in rows[self.first_row: self.first_row + self.rows_per_process]:
            if i < 0:
                continue
            ex = self.encoder(self.source[int(i)])
            if "_skip" in ex:
                events.append([ex["_skip"], ex["_id"], ex["_message"]])
                skipped += 1
                continue
            if ex["_truncated"]:
                events.append([src_lib.TRUNCATED, ex["_id"],
                               f"record {ex['_id']} truncated to {len(ex['input_ids'])} tokens"])
            if len(ex["input_ids"]) != plan.lengths[i]:
                raise RuntimeError(f"record {ex['_id']} encodes to {len(ex['input_ids'])} tokens, its length "
                                   f"index says {plan.lengths[i]}: the index is stale (delete the data's "
                                   f"*.lengths-*.npz file)")
            examples.append(ex)
        batch = collate(examples, batch_size=self.rows_per_process, length=length, image_size=self.image_size,
                        pad_token_id=self.pad_token_id,
                        pixel_dtype=np.uint8 if self.encoder.uint8_pixels else np.float32)
        real = np.where(rows >= 0, plan.lengths[np.maximum(rows, 0)], 0)
        batch["_events"] = events
        batch["_ids"] = [e["_id"] for e in examples]
        batch["_plan"] = {"global_batch": int(k), "skipped_rows": skipped, "real_tokens": int(real.sum()),
                          "computed_tokens": int(len(rows) * length)}
        return batch


class _PlannedBatchDataset(grain.IterDataset):
    """The plan's global batches from any position, this process's rows of each: a Grain
    MapDataset over batch numbers (map: _PlannedBatchEncoder), read by threads and
    optionally worker processes (each worker encodes whole batches, kept in order)."""

    def __init__(self, encoder: _PlannedBatchEncoder, *, read_options, worker_count: int, worker_buffer_size: int,
                 max_consecutive_skips: int):
        super().__init__()
        self.encoder, self.read_options = encoder, read_options
        self.worker_count, self.worker_buffer_size = worker_count, worker_buffer_size
        self.max_consecutive_skips = max_consecutive_skips

    def batches_from(self, k: int) -> grain.DatasetIterator:
        ds = grain.MapDataset.range(k, len(self.encoder.plan)).map(self.encoder).to_iter_dataset(self.read_options)
        if self.worker_count > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                             per_worker_buffer_size=self.worker_buffer_size))
        return ds.__iter__()

    def __iter__(self):
        return _PlannedBatchIterator(self)

    def __str__(self):
        plan = self.encoder.plan
        return f"PlannedBatches(global_batch_size={plan.global_batch_size}, buckets={plan.buckets})"


class _PlannedBatchIterator(grain.DatasetIterator):
    """Its state is the number of global batches served and the padding counters: the
    same in every process, so it restores onto any process count or worker count."""

    def __init__(self, ds: _PlannedBatchDataset):
        super().__init__()
        self._ds = ds
        self._it: Optional[grain.DatasetIterator] = None
        self._next = 0
        self._real_tokens = self._computed_tokens = 0
        self._skips_in_a_row = 0
        self.last_length = 0

    def __next__(self):
        if self._it is None:
            self._it = self._ds.batches_from(self._next)
        batch = next(self._it)
        info = batch.pop("_plan")
        if info["global_batch"] != self._next:
            raise RuntimeError(f"the pipeline served global batch {info['global_batch']}, expected {self._next}")
        self._next += 1
        self._real_tokens += info["real_tokens"]
        self._computed_tokens += info["computed_tokens"]
        self.last_length = int(batch["input_ids"].shape[1])
        if info["skipped_rows"] and not batch["valid"].any():
            self._skips_in_a_row += info["skipped_rows"]
            if self._skips_in_a_row >= self._ds.max_consecutive_skips:
                reasons = sorted({e[0] for e in batch["_events"]})
                raise src_lib.BrokenDataError(f"{self._skips_in_a_row} bad records in a row (reasons {reasons}; last: "
                                   f"{batch['_events'][-1][2]}): the data or its configuration is broken")
        elif batch["valid"].any():
            self._skips_in_a_row = 0
        return batch

    def stats(self) -> Dict[str, float]:
        """global_batches, padding_efficiency (real / computed text tokens over all global
        batches so far, from the plan's lengths), length (the last batch's text length)."""
        return {"global_batches": self._next, "length": self.last_length,
                "padding_efficiency": self._real_tokens / max(self._computed_tokens, 1)}

    def get_state(self):
        return {"global_batch": self._next, "real_tokens": self._real_tokens,
                "computed_tokens": self._computed_tokens}

    def set_state(self, state):
        if "global_batch" not in state:
            raise ValueError(f"data-iterator state {sorted(state)} is not a batch-plan position (saved by an "
                             f"older version of the pipeline?)")
        self._close_batches()
        self._next = int(state["global_batch"])
        self._real_tokens, self._computed_tokens = int(state["real_tokens"]), int(state["computed_tokens"])
        self._skips_in_a_row = 0

    def _close_batches(self):
        if self._it is not None:
            self._it.close()
        self._it = None

    def close(self):
        self._close_batches()
        super().close()

    def __str__(self):
        return "PlannedBatchIterator"


# ----------------------------------------------------------------------------- bad-record log


class BadRecordLog:
    """Counts of skipped (and truncated) records by reason, with their ids (the first
    `max_ids` distinct ids per reason) and the first message per reason. Counts are
    occurrences: a bad record is counted again in every epoch that meets it."""

    def __init__(self, max_ids: int = 1000):
        self.max_ids = int(max_ids)
        self.counts: Dict[str, int] = {}
        self.ids: Dict[str, List[str]] = {}
        self.examples: Dict[str, str] = {}
        self._seen: Dict[str, set] = {}

    def add(self, reason: str, rid: str, message: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        seen = self._seen.setdefault(reason, set())
        if rid not in seen:
            seen.add(rid)
            ids = self.ids.setdefault(reason, [])
            if len(ids) < self.max_ids:
                ids.append(rid)
            if reason != src_lib.TRUNCATED:
                log.warning("skipping bad record %s (%s): %s", rid, reason, message)
        self.examples.setdefault(reason, message)

    @property
    def skipped(self) -> int:
        return sum(n for r, n in self.counts.items() if r != src_lib.TRUNCATED)

    def summary(self) -> Dict[str, Any]:
        """{"skipped": total skips, "truncated": n, "counts": {reason: n},
        "ids": {reason: [ids]}, "examples": {reason: first message}}"""
        return {"skipped": self.skipped, "truncated": self.counts.get(src_lib.TRUNCATED, 0),
                "counts": dict(sorted(self.counts.items())),
                "ids": {k: list(v) for k, v in sorted(self.ids.items())},
                "examples": dict(sorted(self.examples.items()))}

    def get_state(self) -> Dict[str, Any]:
        return {"counts": dict(self.counts), "ids": {k: list(v) for k, v in self.ids.items()},
                "examples": dict(self.examples)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self.ids = {str(k): [str(i) for i in v] for k, v in state.get("ids", {}).items()}
        self.examples = {str(k): str(v) for k, v in state.get("examples", {}).items()}
        self._seen = {k: set(v) for k, v in self.ids.items()}


class _AccountingDataset(grain.IterDataset):
    """Outermost step, in the training process: moves the batches' events into a log."""

    def __init__(self, parent, max_ids: int):
        super().__init__(parent)
        self.max_ids = max_ids

    def __iter__(self):
        return PipelineIterator(self._parent.__iter__(), self.max_ids)

    def __str__(self):
        return "BadRecordAccounting"


class PipelineIterator(grain.DatasetIterator):
    """The training iterator: numpy batches; `bad_records` (a BadRecordLog) and
    `last_ids` (record ids of the last batch's real rows). Its state holds the pipeline
    position and the bad-record log."""

    # Every process's iterator serves the same global batch plan, so all of them run out
    # at the same batch: the trainer needs no agreement between processes on who has data.
    same_batches_on_every_process = True

    def __init__(self, parent, max_ids: int = 1000):
        super().__init__(parent)
        self.bad_records = BadRecordLog(max_ids)
        self.last_ids: List[str] = []

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        for reason, rid, message in batch.pop("_events"):
            self.bad_records.add(reason, rid, message)
        self.last_ids = list(batch.pop("_ids"))
        return batch

    def stats(self) -> Dict[str, int]:
        """Flat counts for metric logs: skipped, truncated, skipped_<reason>."""
        out = {"skipped": self.bad_records.skipped,
               "truncated": self.bad_records.counts.get(src_lib.TRUNCATED, 0)}
        for reason in src_lib.SKIP_REASONS:
            out[f"skipped_{reason}"] = self.bad_records.counts.get(reason, 0)
        out.update(self._parent.stats())  # the batch plan's: padding_efficiency, length, global_batches
        return out

    def get_state(self) -> Dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "bad_records": self.bad_records.get_state()}

    def set_state(self, state: Dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.bad_records.set_state(state.get("bad_records", {}))
        self.last_ids = []

    def __str__(self):
        return "PipelineIterator"


def pipeline_stats(iterator) -> Dict[str, Any]:
    """Bad-record statistics of a `make_train_iterator` iterator so far (see
    BadRecordLog.summary): exact with worker processes, restored with the iterator."""
    if not isinstance(iterator, PipelineIterator):
        raise TypeError(f"pipeline_stats needs the iterator returned by make_train_iterator, got {type(iterator)}")
    return iterator.bad_records.summary()


# ----------------------------------------------------------------------------- entry points


def _tokenizer(cfg, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if not cfg.tokenizer_path:
        raise ValueError("no tokenizer passed and data.tokenizer_path is not set")
    from gamma_mod_jax.data.tokenizer import load_tokenizer
    return load_tokenizer(cfg.tokenizer_path)


def _image_size(cfg, image_size) -> int:
    size = image_size if image_size is not None else cfg.image_size
    if size is None or int(size) < 1:
        raise ValueError("the image size is not set (pass image_size = the model's input_image_size)")
    return int(size)


def _ensure_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; a program that is not an absl app (tests,
    # notebooks, argparse launchers) has not parsed them: use their defaults.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def global_batch_size(data_cfg, process_count: int) -> int:
    """The plan's global batch: data.global_batch_size, else data.batch_size x processes."""
    cfg = _cfg(data_cfg)
    size = int(cfg.global_batch_size or int(cfg.batch_size) * int(process_count))
    if size % int(process_count):
        raise ValueError(f"data.global_batch_size {size} is not divisible by the {process_count} processes")
    return size


def make_batch_plan(data_cfg, *, tokenizer=None, seed: int = 0, process_count: int = 1, source=None) -> BatchPlan:
    """The global batch plan of a data config (the same on every process): lengths from
    the (cached) length index, global batch size from `global_batch_size`."""
    cfg = _cfg(data_cfg)
    tokenizer = _tokenizer(cfg, tokenizer)
    source = make_source(cfg) if source is None else source
    n = len(source) if cfg.max_records is None else min(len(source), int(cfg.max_records))
    shuffle_seed = int(cfg.shuffle_seed if cfg.shuffle_seed is not None else seed) % (2 ** 32)
    return BatchPlan(length_index(source, n, tokenizer, cfg), global_batch_size=global_batch_size(cfg, process_count),
                     buckets=cfg.buckets, seed=shuffle_seed, num_epochs=cfg.num_epochs,
                     drop_remainder=bool(cfg.drop_remainder), truncation=cfg.truncation,
                     group_by_modality=bool(cfg.group_by_modality))


def make_train_dataset(data_cfg, *, tokenizer=None, image_size: Optional[int] = None, seed: int = 0,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       source=None) -> grain.IterDataset:
    """The Grain IterDataset behind `make_train_iterator` (same arguments; `source`
    replaces the configured one)."""
    cfg = _cfg(data_cfg)
    tokenizer = _tokenizer(cfg, tokenizer)
    size = _image_size(cfg, image_size)
    if process_index is None or process_count is None:
        shard = grain.sharding.ShardByJaxProcess()
        process_index = shard.shard_index if process_index is None else process_index
        process_count = shard.shard_count if process_count is None else process_count
    if not 0 <= int(process_index) < int(process_count):
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    source = make_source(cfg) if source is None else source
    plan = make_batch_plan(cfg, tokenizer=tokenizer, seed=seed, process_count=int(process_count), source=source)
    encoder = ExampleEncoder(tokenizer=tokenizer, image_size=size, max_len=cfg.buckets[-1],
                             truncation=cfg.truncation, move_image_to_front=bool(cfg.move_image_to_front),
                             template=cfg.template, image_token_index=int(cfg.image_token_index),
                             uint8_pixels=bool(cfg.uint8_pixels))
    batches = _PlannedBatchEncoder(plan, source, encoder, process_index=int(process_index),
                                   process_count=int(process_count), image_size=size,
                                   pad_token_id=int(cfg.pad_token_id))
    ds = _PlannedBatchDataset(batches, read_options=grain.ReadOptions(num_threads=int(cfg.read_threads),
                                                                      prefetch_buffer_size=int(cfg.read_buffer_size)),
                              worker_count=int(cfg.worker_count), worker_buffer_size=int(cfg.worker_buffer_size),
                              max_consecutive_skips=int(cfg.max_consecutive_skips))
    return _AccountingDataset(ds, int(cfg.max_logged_ids))


def make_train_iterator(data_cfg, *, tokenizer=None, image_size: Optional[int] = None, seed: int = 0,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        source=None) -> PipelineIterator:
    """A checkpointable Grain iterator of padded training batches (module docstring).

    data_cfg: a `data_config_defaults()` ConfigDict (or a mapping of its fields);
    tokenizer: the tokenizer object (None: load data_cfg.tokenizer_path);
    image_size: the model's input_image_size (None: data_cfg.image_size);
    seed: the shuffle seed unless data_cfg.shuffle_seed is set;
    process_index / process_count: this process's shard (None: grain.sharding.
    ShardByJaxProcess, i.e. jax.process_index() / jax.process_count()).
    Bad-record counts: `pipeline_stats(iterator)`."""
    ds = make_train_dataset(data_cfg, tokenizer=tokenizer, image_size=image_size, seed=seed,
                            process_index=process_index, process_count=process_count, source=source)
    return ds.__iter__()


def make_train_iterator_from_config(config, model_cfg=None, *, tokenizer=None, process_index: Optional[int] = None,
                                    process_count: Optional[int] = None) -> PipelineIterator:
    """`make_train_iterator` for a training config: config.data (data_config_defaults
    fields), config.seed; from the model config (an MLLMConfig, read by attribute):
    input_image_size (unless data.image_size is set), image_token_index and
    llm.pad_token_id. The tokenizer is loaded from data.tokenizer_path when not given."""
    data = _cfg(config.data)
    image_size = data.image_size
    if model_cfg is not None:
        image_size = image_size or getattr(model_cfg, "input_image_size", None)
        with data.ignore_type():
            data.image_token_index = int(getattr(model_cfg, "image_token_index", data.image_token_index))
            llm = getattr(model_cfg, "llm", None)
            if llm is not None and getattr(llm, "pad_token_id", None) is not None:
                data.pad_token_id = int(llm.pad_token_id)
    seed = config.get("seed", 0) if hasattr(config, "get") else getattr(config, "seed", 0)
    return make_train_iterator(data, tokenizer=tokenizer, image_size=image_size, seed=int(seed or 0),
                               process_index=process_index, process_count=process_count)


def _first_exchange(conversations):
    """(question, answer) of the first human turn and the assistant turn after it."""
    question = answer = None
    for turn in conversations:
        role = turn.get("from")
        if question is None and role in ("human", "user"):
            question = turn.get("value", "")
        elif question is not None and role in ("gpt", "assistant"):
            answer = turn.get("value", "")
            break
    return question, answer


def make_eval_examples(data_cfg, *, tokenizer=None, image_size: Optional[int] = None, limit: Optional[int] = None,
                       bad_records: Optional[BadRecordLog] = None, source=None) -> Iterator[Dict[str, Any]]:
    """Evaluation prompts in source order (data_cfg.split; no shuffle, no sharding):
    yields {"id", "question" (the first human turn), "answer" (the reference: the
    assistant's reply to it), "input_ids", "token_types" (int32, unpadded, ending with
    "ASSISTANT:"), "pixel_values" (float32 [S, S, 3], zeros for text-only), "has_image"}.
    Bad records are skipped and, when `bad_records` is given, counted there.
    `limit`: at most that many examples."""
    from gamma_mod_jax.data import conversation as conv
    from gamma_mod_jax.data.image import preprocess_image

    cfg = _cfg(data_cfg)
    tokenizer = _tokenizer(cfg, tokenizer)
    size = _image_size(cfg, image_size)
    source = make_source(cfg) if source is None else source
    n = len(source) if cfg.max_records is None else min(len(source), int(cfg.max_records))
    yielded = 0
    for i in range(n):
        if limit is not None and yielded >= limit:
            return
        record = source[i]
        rid = str(record.get("id", i))
        try:
            if record.get("error"):
                raise _Skip(*record["error"])
            if cfg.move_image_to_front:
                record = conv.move_image_to_front(record)
            question, answer = _first_exchange(record["conversations"])
            if question is None or not (answer or "").strip():
                raise _Skip(src_lib.NO_ASSISTANT_TURN, f"record {rid} has no human turn answered by the assistant")
            has_image = record.get("image") is not None
            try:
                enc = conv.encode_prompt(question, tokenizer, has_image=has_image,
                                         image_token_index=int(cfg.image_token_index), template=cfg.template)
            except conv.BadRecord as e:
                raise _Skip(src_lib.BAD_CONVERSATION, f"record {rid}: {e}") from None
            if len(enc["input_ids"]) > cfg.buckets[-1]:
                raise _Skip(src_lib.OVER_LONG, f"record {rid}: prompt of {len(enc['input_ids'])} tokens > "
                                               f"{cfg.buckets[-1]}")
            pixels = np.zeros((size, size, 3), np.float32)
            if has_image:
                pixels = np.asarray(preprocess_image(_decode_image(record), size), np.float32)
        except _Skip as s:
            if bad_records is not None:
                bad_records.add(s.reason, rid, str(s))
            else:
                log.warning("skipping bad eval record %s (%s): %s", rid, s.reason, s)
            continue
        yielded += 1
        yield {"id": rid, "question": question.replace("<image>", "").strip(), "answer": answer.strip(),
               "input_ids": np.asarray(enc["input_ids"], np.int32),
               "token_types": np.asarray(enc["token_types"], np.int32),
               "pixel_values": pixels, "has_image": has_image}


def collate_prompts(examples: Sequence[Dict[str, Any]], *, batch_size: Optional[int] = None,
                    buckets: Optional[Sequence[int]] = None, pad_token_id: int = 0) -> Dict[str, np.ndarray]:
    """Eval examples -> a right-padded generation batch {"input_ids", "attention_mask",
    "token_types", "pixel_values", "valid"}; padded to the smallest bucket that fits
    (or the longest prompt) and to `batch_size` rows with filler rows (valid 0, one
    attended pad token so no row is fully masked)."""
    b = batch_size or len(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    t = pick_bucket(longest, buckets) if buckets else longest
    size = examples[0]["pixel_values"].shape[0]
    out = {"input_ids": np.full((b, t), pad_token_id, np.int32), "attention_mask": np.zeros((b, t), np.int32),
           "token_types": np.full((b, t), tt.PADDING, np.int32),
           "pixel_values": np.zeros((b, size, size, 3), np.float32), "valid": np.zeros((b,), np.int32)}
    for i in range(b):
        if i >= len(examples):
            out["attention_mask"][i, 0] = 1
            continue
        e = examples[i]
        n = len(e["input_ids"])
        out["input_ids"][i, :n] = e["input_ids"]
        out["attention_mask"][i, :n] = 1
        out["token_types"][i, :n] = e["token_types"]
        out["pixel_values"][i] = e["pixel_values"]
        out["valid"][i] = 1
    return out
