"""Vision-tower pre-training: learns a labelling the pictures determine, changes nothing
outside the tower, and refuses mis-shaped labels."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import train as train_configs
from gamma_mod_jax import api as gm
from gamma_mod_jax.train.vision_pretrain import pretrain_vision


def _data(rng, n, size):
    """Kind 1: the colour channel that is bright in a square at a random place; kind 2: whether
    the square is small or large. Some kind-1 labels unknown (-1)."""
    images = rng.normal(0, 0.3, (n, size, size, 3)).astype(np.float32)
    labels = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], axis=1)
    for i, (channel, large) in enumerate(labels):
        side = size // 3 if large else size // 6
        y0, x0 = rng.integers(0, size - side, 2)
        images[i, y0:y0 + side, x0:x0 + side, channel] += 2.0
    labels[rng.random(n) < 0.1, 0] = -1
    return images, labels


@pytest.mark.slow  # 70 s on 2 cores
def test_learns_the_labels_and_changes_only_the_vision_tower(rng):
    config = train_configs.get_config("llava_hr_7b_mod0.5,tiny").model
    config.mod = None
    model = gm.build_model(config, seed=int(rng.integers(1 << 30)))
    size = gm.model_config(config).input_image_size
    before = nnx.state(model, nnx.Param)
    before = jax.tree.map(np.array, before)
    images, labels = _data(rng, 512, size)
    eval_images, eval_labels = _data(rng, 128, size)
    report = pretrain_vision(model, images, labels, (3, 2), steps=120, batch_size=32, learning_rate=3e-3,
                             seed=int(rng.integers(1 << 30)), eval_images=eval_images, eval_labels=eval_labels,
                             log=lambda *_: None)
    assert report["accuracy"][0] > 0.9 and report["accuracy"][1] > 0.9, report
    after = nnx.state(model, nnx.Param)
    changed = jax.tree_util.tree_map_with_path(lambda p, a, b: (jax.tree_util.keystr(p), not np.array_equal(a, b)),
                                               before, jax.tree.map(np.array, after))
    flags = jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple))
    assert all(name.startswith("['vision']") for name, c in flags if c)
    assert any(c for name, c in flags if name.startswith("['vision']"))


def test_mis_shaped_labels(rng):
    config = train_configs.get_config("llava_hr_7b_mod0.5,tiny").model
    config.mod = None
    model = gm.build_model(config)
    with pytest.raises(ValueError, match=r"labels must be \[4, 2\]"):
        pretrain_vision(model, np.zeros((4, 8, 8, 3), np.float32), np.zeros((4, 3), np.int32), (3, 2), steps=1)
