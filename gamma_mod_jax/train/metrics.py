"""Where training metrics go: `<workdir>/metrics.jsonl` (one JSON object per logged step),
TensorBoard event files (tensorboardX) and a console progress bar (tqdm). Only process 0
writes; other processes get a writer that does nothing."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional

import numpy as np


# Peak dense bf16 FLOP/s per device (vendor datasheets, no sparsity), by jax's device_kind
# (first match wins): what `mfu` divides by unless train.peak_flops_per_device says otherwise.
PEAK_BF16_FLOPS = (
    (r"A100", 312e12),
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100|H800", 989e12),
    (r"H200", 989e12),
    (r"TPU v4", 275e12),
    (r"TPU v5 ?lite|TPU v5e", 197e12),
    (r"TPU v5p?$", 459e12),
    (r"TPU v6 ?lite|TPU v6e", 918e12),
)


def peak_bf16_flops(device_kind: str) -> Optional[float]:
    """The table's peak for a jax `device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite"), or None."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return flops
    return None


def _scalar(value):
    value = np.asarray(value)
    if value.ndim == 0:
        v = value.item()
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)
    return [_scalar(v) for v in value]


class MetricsWriter:
    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Dict[str, object]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/{i}", v, step)
        if self._bar is not None:
            shown = {k: record[k] for k in ("loss", "skip_ratio", "tokens_per_sec", "model_tflops_per_device", "mfu")
                     if isinstance(record.get(k), float)}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for item in (self._bar, self._tb, self._jsonl):
            if item is not None:
                item.close()
        self._jsonl = self._tb = self._bar = None


def read_metrics(workdir: str) -> list:
    """The records of `<workdir>/metrics.jsonl`, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_step(records: list) -> Optional[int]:
    return records[-1]["step"] if records else None
