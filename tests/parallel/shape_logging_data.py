"""The real Grain pipeline for the multi-process tests, logging what each process gets:
`make_iterator(config, model_cfg)` is a trainer `make_data_iterator`
(`python -m launch.train --data-iterator tests.parallel.shape_logging_data:make_iterator`)
returning `make_train_iterator_from_config`'s iterator wrapped so that every batch
appends one JSON line {"global_batch", "shapes", "ids"} to
$GMJ_TEST_SHAPES_DIR/shapes.process_<i>-of-<n>.jsonl."""

from __future__ import annotations

import json
import os

import grain


class ShapeLoggingIterator(grain.DatasetIterator):
    same_batches_on_every_process = True  # the pipeline's global batch plan, as the iterator it wraps

    def __init__(self, parent, path: str):
        super().__init__(parent)
        self.path = path

    def __next__(self):
        batch = next(self._parent)
        line = {"global_batch": self._parent.stats()["global_batches"] - 1,
                "shapes": {k: list(v.shape) for k, v in sorted(batch.items())}, "ids": list(self._parent.last_ids)}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return batch

    def stats(self):
        return self._parent.stats()

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def make_iterator(config, model_cfg):
    import jax

    from gamma_mod_jax.data.pipeline import make_train_iterator_from_config

    name = f"shapes.process_{jax.process_index()}-of-{jax.process_count()}.jsonl"
    return ShapeLoggingIterator(make_train_iterator_from_config(config, model_cfg),
                                os.path.join(os.environ["GMJ_TEST_SHAPES_DIR"], name))
