"""Trains a model from an ml-collections config.

    python -m launch.train --config configs/train.py:llava_hr_7b_mod0.34 --workdir /runs/gmod \
        [--config.init_checkpoint=/ckpt/stage1] [--config.optim.learning_rate=2e-5]

Resumes automatically from the newest checkpoint in `<workdir>/checkpoints`; writes
`<workdir>/metrics.jsonl`, TensorBoard files in `<workdir>/tensorboard` and the resolved
config as `<workdir>/config.json`. SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); resumed if it holds any")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from gamma_mod_jax.train.trainer import TrainingError, train

    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    try:
        summary = train(config, workdir)
    except (ValueError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}))


if __name__ == "__main__":
    app.run(main)
