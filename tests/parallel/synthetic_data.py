"""A deterministic synthetic data source for the parallelism tests: the global batch of
step n is the same whatever the number of processes; each process serves its rows.

`make_iterator(config, model_cfg)` is a trainer `make_data_iterator`
(`python -m launch.train --data-iterator tests.parallel.synthetic_data:make_iterator`):
global batch = config.data.batch_size x jax.process_count(), process p serving rows
[p * batch_size, (p + 1) * batch_size). Checkpointable (get_state / set_state).

For the failure test: with GMJ_TEST_DIE_PROCESS=p and GMJ_TEST_DIE_AT=n in the
environment, process p exits (status 3) when asked for its n-th batch.
"""

from __future__ import annotations

import os

import numpy as np

from gamma_mod_jax import token_types as tt

T = 24


def example(index: int, image_size: int, seed: int = 0) -> dict:
    """One right-padded sample: BOS, 2 system tokens, the image, a question, an answer."""
    rng = np.random.default_rng([seed, index])
    length = int(rng.integers(14, T + 1))
    ids = rng.integers(3, 250, size=T).astype(np.int32)
    ids[0], ids[3] = 1, -200
    types = np.full(T, tt.QUESTION, np.int32)
    types[:3], types[3] = tt.SYSTEM, tt.IMAGE
    answer = length - 4
    types[answer:length] = tt.ANSWER
    labels = np.where((np.arange(T) >= answer) & (np.arange(T) < length), ids, -100).astype(np.int32)
    mask = (np.arange(T) < length).astype(np.int32)
    ids, types = np.where(mask == 1, ids, 0), np.where(mask == 1, types, tt.PADDING)
    pixels = rng.standard_normal((image_size, image_size, 3)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_types": types,
            "pixel_values": pixels}


def batch(first: int, size: int, image_size: int, seed: int = 0) -> dict:
    rows = [example(first + i, image_size, seed) for i in range(size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class SyntheticIterator:
    same_batches_on_every_process = True  # endless on every process: no agreement on data needed

    def __init__(self, per_process: int, process_index: int, process_count: int, image_size: int, seed: int = 0):
        self.per_process, self.index, self.count = per_process, process_index, process_count
        self.image_size, self.seed, self.step = image_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.step += 1
        if (os.environ.get("GMJ_TEST_DIE_PROCESS") == str(self.index)
                and os.environ.get("GMJ_TEST_DIE_AT") == str(self.step)):
            print(f"process {self.index}: exiting on purpose at batch {self.step}", flush=True)
            os._exit(3)
        global_size = self.per_process * self.count
        first = (self.step - 1) * global_size + self.index * self.per_process
        return batch(first, self.per_process, self.image_size, self.seed)

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def make_iterator(config, model_cfg):
    import jax

    return SyntheticIterator(int(config.data.batch_size), jax.process_index(), jax.process_count(),
                             model_cfg.input_image_size, int(config.get("seed", 0)))
