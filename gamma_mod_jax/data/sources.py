"""Random-access sources of raw LLaVA-format records for the Grain pipeline.

Every source has `len(src)` and `src[i]` -> a raw record, a plain dict:

    id             str (the record's "id"; "#<index>" when it has none; "line <n>" for a
                   JSON-lines line that is not a record)
    image          str path of the image file, or None (text-only record)
    conversations  list of {"from": "human" | "gpt", "value": str}
    image_bytes    (TFDS sources only) the encoded image file as uint8 [n]
    error          (only on a record that cannot be used) (reason, message)

Sources never raise for one bad record: it comes back with "error" set, and the
pipeline's map step turns it into a counted, skipped marker. They raise (ValueError
naming the file) only when the whole file cannot be used.

    LlavaJsonSource   a LLaVA JSON list file (llava_v1_5_mix665k.json, LCS-558K's
                      blip_laion_cc_sbu_558k.json) or JSON lines (.jsonl), plus an image
                      folder; records are read from the file on access (byte offsets
                      found by one scan), so the source pickles small for worker processes
    RecordListSource  records held in memory (easy-VQA from the installed package)
    TfdsSource        a prepared TFDS dataset (`tfds_builders.py`) read through
                      `tfds.data_source` (ArrayRecord, no TensorFlow)
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# Reasons a record is skipped (keys of the bad-record counts).
BAD_JSON = "bad_json"                    # a JSON-lines line that does not parse
MALFORMED = "malformed_record"           # parses, but is not a LLaVA record
MISSING_IMAGE = "missing_image"          # the image file does not exist (or was not stored)
UNREADABLE_IMAGE = "unreadable_image"    # the image cannot be decoded
NO_ASSISTANT_TURN = "no_assistant_turn"  # nothing to supervise
BAD_CONVERSATION = "bad_conversation"    # the conversation encoder refused it otherwise
OVER_LONG = "over_long"                  # longer than the largest bucket (truncation "drop")
IMAGE_OUTSIDE_DIR = "image_outside_image_dir"  # an absolute or ../ image path leaving image_dir
# Not a skip: an example cut to the largest bucket (truncation "truncate_right").
TRUNCATED = "truncated"

SKIP_REASONS = (BAD_JSON, MALFORMED, MISSING_IMAGE, UNREADABLE_IMAGE, NO_ASSISTANT_TURN,
                BAD_CONVERSATION, OVER_LONG, IMAGE_OUTSIDE_DIR)
# What a record's JSON may fail with: JSONDecodeError and UnicodeDecodeError are
# ValueErrors; a deeply nested value ([[[[...) exhausts the parser's recursion.
JSON_ERRORS = (ValueError, RecursionError)

Record = Dict[str, Any]


class BrokenDataError(RuntimeError, ValueError):
    """So many bad records in a row that the data (or its configuration) must be broken;
    a ValueError, so launchers report it as bad input (exit status 2)."""


def image_path_in(image_dir: str, image: str, allow_outside: bool = False) -> Optional[str]:
    """`image` (as a record writes it) joined to `image_dir`, or None when it leaves
    `image_dir`: an absolute path elsewhere, or `..` climbing out (decided on the path's
    text; symbolic links inside image_dir are followed, as the folder's owner set them up).
    With `allow_outside`, absolute paths are taken as they are (the official loader's
    os.path.join behaviour)."""
    joined = os.path.normpath(os.path.join(image_dir, image))
    if allow_outside:
        return joined
    root = os.path.normpath(os.path.abspath(image_dir))
    if os.path.commonpath([root, os.path.abspath(joined)]) != root:
        return None
    return joined


def canonical_record(obj: Any, fallback_id: str, image_dir: Optional[str],
                     allow_paths_outside_image_dir: bool = False) -> Record:
    """A parsed JSON value -> a raw record (with "error" set when it is not a usable
    LLaVA record). Image paths are resolved inside `image_dir` (see image_path_in); one
    leaving it is a bad record unless `allow_paths_outside_image_dir`."""
    if not isinstance(obj, dict):
        return bad_record(fallback_id, MALFORMED, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    rid = fallback_id if rid is None or rid == "" else str(rid)
    image = obj.get("image")
    conversations = obj.get("conversations")
    if image is not None and not isinstance(image, str):
        kind = "a list (several images)" if isinstance(image, list) else type(image).__name__
        return bad_record(rid, MALFORMED, f"'image' must be one path, got {kind}")
    if not isinstance(conversations, list) or not conversations:
        return bad_record(rid, MALFORMED, "'conversations' must be a non-empty list of turns")
    for k, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            return bad_record(rid, MALFORMED, f"turn {k} is not {{'from': str, 'value': str}}")
    if image and image_dir is not None:
        resolved = image_path_in(image_dir, image, allow_paths_outside_image_dir)
        if resolved is None:
            return bad_record(rid, IMAGE_OUTSIDE_DIR, f"image path {image!r} leaves the image folder {image_dir} "
                                                      "(set data.allow_paths_outside_image_dir to allow it)")
        image = resolved
    elif not image:
        image = None
    return {"id": rid, "image": image, "conversations": conversations}


def bad_record(rid: str, reason: str, message: str) -> Record:
    return {"id": rid, "image": None, "conversations": [], "error": (reason, message)}


class LlavaJsonSource:
    """LLaVA conversation records from `json_path` (a JSON list, or JSON lines: one record
    per line) with images under `image_dir` (paths in the records are relative to it).

    A JSON-lines line that does not parse (deep nesting included) becomes a bad record
    with id "line <n>" (1-based line number); blank lines are not records. A file that
    is empty, not UTF-8 (a UTF-16 / UTF-32 byte-order mark or NUL bytes), holds no
    parseable record, or (JSON list) does not parse raises ValueError naming the file.
    Image paths must stay inside `image_dir` unless `allow_paths_outside_image_dir`.
    """

    def __init__(self, json_path: str, image_dir: Optional[str] = None, *,
                 allow_paths_outside_image_dir: bool = False):
        self.json_path = os.fspath(json_path)
        self.image_dir = None if image_dir is None else os.fspath(image_dir)
        self.allow_paths_outside_image_dir = bool(allow_paths_outside_image_dir)
        if not os.path.isfile(self.json_path):
            raise ValueError(f"{self.json_path}: conversation file not found")
        with open(self.json_path, "rb") as f:
            data = f.read()
        stripped = data.lstrip()
        if stripped.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            stripped = stripped[3:].lstrip()
        if not stripped.strip():
            raise ValueError(f"{self.json_path}: the conversation file is empty")
        if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") or data[:2] in (b"\xff\xfe", b"\xfe\xff") \
                or b"\x00" in data[:4096]:
            raise ValueError(f"{self.json_path}: not UTF-8 text (a UTF-16/UTF-32 byte-order mark or NUL bytes); "
                             "convert it to UTF-8")
        # Record i is bytes [starts[i], ends[i]) of the file; JSON lines keep line numbers
        # and the messages of lines that do not parse (those are read back as bad records).
        self._line_numbers: Optional[np.ndarray] = None
        self._line_errors: Dict[int, str] = {}
        if stripped[:1] == b"[":
            self.format = "json"
            self._starts, self._ends = self._scan_json_list(data)
        else:
            self.format = "jsonl"
            self._starts, self._ends = self._scan_json_lines(data)
        if len(self._starts) == 0:
            raise ValueError(f"{self.json_path}: holds no records (an empty JSON list)")
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None
        self._lock = threading.Lock()

    def _scan_json_list(self, data: bytes) -> Tuple[np.ndarray, np.ndarray]:
        # Decoding as latin-1 maps byte i to character i, so character offsets found by
        # the decoder are byte offsets; JSON syntax is ASCII, and UTF-8 multi-byte
        # sequences only occur inside strings, copied through unchanged.
        text = data.decode("latin-1")
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        starts: List[int] = []
        ends: List[int] = []
        n = len(text)

        def skip_ws(p):
            while p < n and text[p] in " \t\r\n":
                p += 1
            return p

        try:
            pos = skip_ws(pos)
            if pos < n and text[pos] == "]":
                end = skip_ws(pos + 1)
            else:
                while True:
                    _, end = decoder.raw_decode(text, pos)
                    starts.append(pos)
                    ends.append(end)
                    pos = skip_ws(end)
                    if pos < n and text[pos] == ",":
                        pos = skip_ws(pos + 1)
                        continue
                    if pos < n and text[pos] == "]":
                        end = skip_ws(pos + 1)
                        break
                    raise json.JSONDecodeError("expected ',' or ']' after a record", text, pos)
            if end != n:
                raise json.JSONDecodeError("extra data after the JSON list", text, end)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.json_path}: not a valid JSON list of LLaVA records: {e.msg} at line "
                             f"{e.lineno} column {e.colno} (use JSON lines, one record per line, to have "
                             f"bad records skipped instead)") from None
        except RecursionError:
            raise ValueError(f"{self.json_path}: record {len(starts)} of the JSON list is nested too deeply to "
                             f"parse (use JSON lines to have such records skipped instead)") from None
        return np.asarray(starts, np.int64), np.asarray(ends, np.int64)

    def _scan_json_lines(self, data: bytes) -> Tuple[np.ndarray, np.ndarray]:
        starts: List[int] = []
        ends: List[int] = []
        line_numbers: List[int] = []
        good = 0
        first_error = None
        pos = 0
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            start, end = pos, pos + len(line)
            pos = end + 1
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                start += 3
                line = line[3:]
            if not line.strip():
                continue
            index = len(starts)
            starts.append(start)
            ends.append(end)
            line_numbers.append(lineno)
            try:
                json.loads(line)
                good += 1
            except JSON_ERRORS as e:
                detail = "nested too deeply to parse" if isinstance(e, RecursionError) else str(e)
                message = f"line {lineno} of {self.json_path} is not valid JSON: {detail}"
                self._line_errors[index] = message
                first_error = first_error or message
        if starts and not good:
            raise ValueError(f"{self.json_path}: no line holds a JSON record (expected a JSON list or JSON "
                             f"lines); first problem: {first_error}")
        self._line_numbers = np.asarray(line_numbers, np.int64)
        return np.asarray(starts, np.int64), np.asarray(ends, np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def _read(self, start: int, end: int) -> bytes:
        # One descriptor per process, positioned reads (safe from reader threads).
        if self._fd is None or self._fd_pid != os.getpid():
            with self._lock:
                if self._fd is None or self._fd_pid != os.getpid():
                    self._fd = os.open(self.json_path, os.O_RDONLY)
                    self._fd_pid = os.getpid()
        return os.pread(self._fd, end - start, start)

    def record_id_fallback(self, index: int) -> str:
        if self._line_numbers is not None:
            return f"line {int(self._line_numbers[index])}"
        return f"#{index}"

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        fallback = self.record_id_fallback(index)
        if index in self._line_errors:
            return bad_record(fallback, BAD_JSON, self._line_errors[index])
        raw = self._read(int(self._starts[index]), int(self._ends[index]))
        try:
            obj = json.loads(raw)
        except JSON_ERRORS as e:  # the file changed since the scan, or deep nesting
            detail = "nested too deeply to parse" if isinstance(e, RecursionError) else str(e)
            return bad_record(fallback, BAD_JSON, f"{self.json_path} record {index}: {detail}")
        return canonical_record(obj, fallback, self.image_dir, self.allow_paths_outside_image_dir)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_fd_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        fd = getattr(self, "_fd", None)
        try:
            if fd is not None and self._fd_pid == os.getpid():
                os.close(fd)
        except Exception:  # OSError, or interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.json_path!r}, {self.image_dir!r}, {len(self)} records, {self.format})"


class RecordListSource:
    """Raw records held in memory (each passed through `canonical_record`)."""

    def __init__(self, records: Sequence[Any], image_dir: Optional[str] = None, name: str = "records", *,
                 allow_paths_outside_image_dir: bool = False):
        self._records = [canonical_record(r, f"#{i}", image_dir, allow_paths_outside_image_dir)
                         for i, r in enumerate(records)]
        self.name = name
        if not self._records:
            raise ValueError(f"{name}: no records")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return dict(self._records[int(index)])

    def __repr__(self) -> str:
        return f"RecordListSource({self.name!r}, {len(self)} records)"


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return _text(value.item())
    return str(value)


class TfdsSource:
    """A prepared TFDS dataset built by `tfds_builders.py` (LLaVA-format or easy-VQA
    features), read with `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

    `name` is the registered builder name ("llava_conversations", "easy_vqa") or a
    dataset directory name under `data_dir` (read back from its own metadata)."""

    def __init__(self, name: str, *, split: str = "train", data_dir: Optional[str] = None):
        # Lazily: only TFDS sources pay for the import. The prepared directory's own
        # metadata describes the dataset: reading needs no builder class.
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # not prepared, unknown name, unknown split
            raise ValueError(f"TFDS dataset {name!r} (split {split!r}, data_dir {data_dir!r}) cannot be read: "
                             f"{type(e).__name__}: {e}. Build it first (gamma_mod_jax/data/tfds_builders.py)") from None
        features = set(self._source.dataset_info.features.keys())
        if {"conversations", "image", "image_path"} <= features:
            self.kind = "llava"
        elif {"question", "answer", "image"} <= features:
            self.kind = "easy_vqa"
        else:
            raise ValueError(f"TFDS dataset {name!r} has features {sorted(features)}: neither the LLaVA-format "
                             f"builder's nor easy-VQA's (see gamma_mod_jax/data/tfds_builders.py)")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        ex = self._source[int(index)]
        rid = _text(ex["id"])
        image_bytes = np.asarray(ex["image"], np.uint8)
        if self.kind == "easy_vqa":
            from gamma_mod_jax.data.easy_vqa import easy_vqa_conversation
            return {"id": rid, "image": f"tfds {self.name}/{self.split}[{int(index)}]", "image_bytes": image_bytes,
                    "conversations": easy_vqa_conversation(_text(ex["question"]), _text(ex["answer"]))}
        error = _text(ex["error"]) if "error" in ex else ""
        if error:
            reason, _, message = error.partition(":")
            return bad_record(rid, reason, message.strip())
        try:
            conversations = json.loads(_text(ex["conversations"]))
        except json.JSONDecodeError as e:
            return bad_record(rid, MALFORMED, f"stored conversations are not JSON: {e}")
        image_path = _text(ex["image_path"]) or None
        record = canonical_record({"id": rid, "image": image_path, "conversations": conversations}, rid, None)
        if "error" not in record and image_path:
            record["image_bytes"] = image_bytes
        return record

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, {len(self)} records)"
