"""Checkpoint integrity: a manifest of per-file sizes and SHA-256 digests written next to a
finished checkpoint, verified before it is restored.

Orbax 0.12 has no content verification of its own (its tensorstore files carry no
checksums it checks on read, and a truncated or bit-flipped file restores silently or
fails deep inside tensorstore), so every checkpoint this project writes, training
(`checkpoints/<step>/`) and model (`<dir>/`), gets `MANIFEST_FILE` once the save has
completed. A directory without one (written before manifests existed, or a save killed
between its last file and the manifest) is reported as unverified by `verify_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

from gamma_mod_jax.io_utils import atomic_write

MANIFEST_FILE = "gamma_mod_jax_manifest.json"
_CHUNK = 8 * 2**20


class CheckpointIntegrityError(ValueError):
    """A checkpoint's files do not match its manifest (the message names checkpoint and file)."""


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> Dict[str, str]:
    """{path relative to directory: absolute path} of every regular file below it, the manifest excepted."""
    out = {}
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel != MANIFEST_FILE and os.path.isfile(full):
                out[rel] = full
    return out


def write_manifest(directory: str) -> str:
    """Hashes every file of the finished checkpoint `directory` and writes the manifest
    (atomically: a temporary file renamed into place, fsynced). Returns its path."""
    entries = {rel: {"bytes": os.path.getsize(full), "sha256": _digest(full)}
               for rel, full in _files(directory).items()}
    path = os.path.join(directory, MANIFEST_FILE)
    with atomic_write(path) as f:
        json.dump({"format": 1, "files": entries}, f, indent=1, sort_keys=True)
    return path


def verify_manifest(directory: str) -> Optional[str]:
    """Checks every file the manifest of `directory` lists: present, same size, same digest.
    Raises CheckpointIntegrityError naming the checkpoint and the first bad file. Returns
    None when verified, or a sentence saying why the directory is unverified (no manifest)."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return f"{directory}: no {MANIFEST_FILE} (written without checksums, or killed before they were written)"
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
        items = [(str(rel), int(e["bytes"]), str(e["sha256"])) for rel, e in entries.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointIntegrityError(f"checkpoint {directory}: unreadable manifest {path} "
                                       f"({type(e).__name__}: {e})") from None
    for rel, size, digest in items:
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            raise CheckpointIntegrityError(f"checkpoint {directory}: file {rel} is missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointIntegrityError(f"checkpoint {directory}: file {rel} has {actual} bytes, "
                                           f"the manifest says {size} (truncated or overwritten)")
        if _digest(full) != digest:
            raise CheckpointIntegrityError(f"checkpoint {directory}: file {rel} does not match its SHA-256 "
                                           "in the manifest (corrupted)")
    return None
