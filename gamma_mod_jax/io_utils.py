"""Writing files atomically: the one way this project writes a file that must never be
seen half-written (results, reports, manifests, metrics, caches)."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str = "utf-8"):
    """Yields a file open on a temporary sibling of `path` ("w": text, "wb": binary); when the
    block succeeds the file is flushed, fsynced and renamed onto `path` (os.replace, so
    readers see the old file or the new one, never a part); on any error, Ctrl-C included,
    the temporary file is removed and `path` is left as it was. Creates missing parent
    folders."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, doc, indent=2) -> None:
    """`doc` as JSON (and a newline) at `path`, through atomic_write."""
    import json

    with atomic_write(path) as f:
        json.dump(doc, f, indent=indent)
        f.write("\n")
