"""Reading and writing HF-style checkpoint directories without trusting their pickles.

A directory holds `config.json` and weights as `model.safetensors` /
`pytorch_model.bin`, or shards named by an index file (`*.index.json`, `weight_map`).
Tensors are opened lazily: shapes come from headers, values are read one at a time.
safetensors files are read with no torch at all; `.bin` files only through
`torch.load(weights_only=True)`, which refuses any pickle that would run code.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Mapping, Tuple

import ml_dtypes
import numpy as np

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be read; the message names the file."""


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _inside(directory: str, relative: str) -> bool:
    """Whether `relative` (a path written in an index) names a file inside `directory`:
    not absolute, no `..` climbing out (decided on the text; the directory's own
    symbolic links are followed)."""
    if os.path.isabs(relative):
        return False
    root = os.path.normpath(os.path.abspath(directory))
    return os.path.commonpath([root, os.path.normpath(os.path.join(root, relative))]) == root


def weight_files(src: str) -> Dict[str, str]:
    """{tensor key: shard path} for a checkpoint directory (sharded or single file)."""
    for name in INDEX_FILES:
        index_path = os.path.join(src, name)
        if os.path.exists(index_path):
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' naming the shards")
            for key, shard in weight_map.items():
                if not isinstance(shard, str) or not shard:
                    raise CheckpointError(f"{index_path}: weight_map[{key!r}] is {json.dumps(shard)}; expected the "
                                          "file name of a shard")
                if not _inside(src, shard):
                    raise CheckpointError(f"{index_path}: weight_map[{key!r}] = {shard!r} lies outside {src}; "
                                          "shards must be files in the checkpoint directory")
            missing = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(src, s))})
            if missing:
                raise CheckpointError(f"{index_path}: shard(s) named in the index do not exist: {', '.join(missing)}")
            return {key: os.path.join(src, shard) for key, shard in weight_map.items()}
    for name in SINGLE_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            return {key: path for key in _open_file(path).keys()}
    raise CheckpointError(f"{src}: no weights found (expected one of {', '.join(INDEX_FILES + SINGLE_FILES)})")


class _SafetensorsFile:
    """A safetensors file read with positioned reads (no memory map, no torch): only the
    tensor being converted is resident, whatever the shard size."""

    def __init__(self, path: str):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="numpy"):  # validates the header
                pass
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
        except Exception as e:  # truncated or corrupt header
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        self.path = path
        self._data_start = 8 + header_len
        self._header = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in self._header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header promises "
                                  f"{self._data_start + end})")

    def keys(self):
        return list(self._header)

    def shape(self, key) -> Tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key) -> str:
        name = self._header[key]["dtype"]
        return SAFETENSORS_DTYPES.get(name, name.lower())

    def load(self, key) -> np.ndarray:
        info = self._header[key]
        begin, end = info["data_offsets"]
        try:
            dtype = np.dtype(ml_dtypes.bfloat16) if info["dtype"] == "BF16" else np.dtype(
                {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U8": "u1", "BOOL": "?"}[info["dtype"]])
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}") from None
        count = (end - begin) // dtype.itemsize
        if count != int(np.prod(info["shape"], dtype=np.int64)):
            raise CheckpointError(f"{self.path}: tensor {key!r} holds {end - begin} bytes, not a "
                                  f"{info['dtype']} array of shape {tuple(info['shape'])}")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            value = np.fromfile(f, dtype=dtype, count=count)
        if value.size != count:
            raise CheckpointError(f"{self.path}: tensor {key!r} is cut short")
        return value.reshape(info["shape"])


class _TorchBinFile:
    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading .bin checkpoints needs torch (pip install torch); "
                                  "safetensors checkpoints need no torch") from None
        try:
            # weights_only=True: a pickle that tries to build anything but tensors is refused.
            # mmap: tensors are paged in when read (legacy non-zip files cannot be mapped).
            try:
                self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                self._tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: refused or unreadable .bin file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(self._tensors, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(self._tensors).__name__}")
        self.path = path

    def keys(self):
        return list(self._tensors.keys())

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key) -> str:
        return str(self._tensors[key].dtype).replace("torch.", "")

    def load(self, key):
        from gamma_mod_jax.convert.keymap import to_numpy
        return to_numpy(self._tensors[key])


def _open_file(path: str):
    if path.endswith(".safetensors"):
        return _SafetensorsFile(path)
    if path.endswith(".bin"):
        return _TorchBinFile(path)
    raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


class LazyTensor:
    """A tensor in a checkpoint file: `.shape` from the header, values on `np.asarray`."""

    def __init__(self, source: "LazyStateDict", key: str):
        self._source, self.key = source, key

    @property
    def shape(self):
        return self._source.file(self.key).shape(self.key)

    @property
    def dtype(self) -> str:
        """The stored dtype's name ('float32', 'bfloat16', ...)."""
        return self._source.file(self.key).dtype(self.key)

    def __array__(self, dtype=None, copy=None):
        value = self._source.file(self.key).load(self.key)
        return value if dtype is None else value.astype(dtype)


class LazyStateDict(Mapping):
    """{key: LazyTensor} over a checkpoint directory; files are opened once, lazily."""

    def __init__(self, src: str):
        self.src = src
        self._files_by_key = weight_files(src)
        self._open: Dict[str, object] = {}

    def file(self, key: str):
        path = self._files_by_key[key]
        if path not in self._open:
            self._open[path] = _open_file(path)
            if key not in self._open[path].keys():
                raise CheckpointError(f"{path}: tensor {key!r} named in the index is not in this shard")
        return self._open[path]

    def shard_of(self, key: str) -> str:
        return self._files_by_key[key]

    def close(self, path: str) -> None:
        """Forgets an opened file (its memory map / tensors), e.g. once a shard is converted."""
        self._open.pop(path, None)

    def __getitem__(self, key):
        if key not in self._files_by_key:
            raise KeyError(key)
        return LazyTensor(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files_by_key)

    def __len__(self):
        return len(self._files_by_key)


class SafetensorsShardWriter:
    """Writes an HF-style weights directory one shard at a time: `write(tensors)` per shard,
    then `finish(config)` writes the index (when sharded) and config.json."""

    def __init__(self, directory: str, num_shards: int):
        self.directory, self.num_shards = directory, num_shards
        self.weight_map: Dict[str, str] = {}
        self.total_size = 0
        self._written = 0

    def write(self, tensors: Mapping[str, np.ndarray]) -> str:
        from safetensors.numpy import save_file

        self._written += 1
        if self._written > self.num_shards:
            raise ValueError(f"more than the announced {self.num_shards} shards written")
        name = ("model.safetensors" if self.num_shards == 1
                else f"model-{self._written:05d}-of-{self.num_shards:05d}.safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(self.directory, name))
        self.weight_map.update({k: name for k in tensors})
        self.total_size += sum(v.nbytes for v in tensors.values())
        return name

    def finish(self, config: dict) -> None:
        if self._written != self.num_shards:
            raise ValueError(f"{self._written} of {self.num_shards} shards written")
        if self.num_shards > 1:
            with open(os.path.join(self.directory, INDEX_FILES[0]), "w") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}, f, indent=2)
        with open(os.path.join(self.directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
