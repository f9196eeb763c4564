"""A progress line around work that takes more than a few seconds (compiles, loading)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Optional


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress(what: str, log: Optional[Callable[[str], None]] = None):
    """`what ...` before the block and `... done in 12.3 s` after it (nothing on an error:
    the error says what happened), through `log` (default: stderr, so stdout stays the
    launcher's result)."""
    emit = log or _stderr
    emit(f"{what} ...")
    start = time.perf_counter()
    yield
    emit(f"... done in {time.perf_counter() - start:.1f} s")
