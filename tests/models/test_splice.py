"""Static-shape image splicing vs a naive per-example reference (LLaVA's list concat)."""

import jax.numpy as jnp
import numpy as np

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.models.splice import IGNORE_INDEX, default_text_types, splice_layout

IMG = -200


def naive_splice(ids, mask, labels, types, image_feats, pad_to):
    """LLaVA's way, one example at a time: cut the text at the placeholder, concatenate the
    image features, then right-pad everything to `pad_to`."""
    rows = []
    for b in range(ids.shape[0]):
        n_valid = int(mask[b].sum())
        row_ids, row_labels, row_types = list(ids[b, :n_valid]), list(labels[b, :n_valid]), list(types[b, :n_valid])
        feats = [("text", int(i)) for i in row_ids]
        out_labels, out_types, out_src = [], [], []
        if IMG in row_ids:
            p = row_ids.index(IMG)
            for j in range(p):
                out_src.append(("text", j)); out_labels.append(row_labels[j]); out_types.append(row_types[j])
            for k in range(image_feats.shape[1]):
                out_src.append(("image", k)); out_labels.append(IGNORE_INDEX); out_types.append(tt.IMAGE)
            for j in range(p + 1, n_valid):
                out_src.append(("text", j)); out_labels.append(row_labels[j]); out_types.append(row_types[j])
        else:
            for j in range(n_valid):
                out_src.append(("text", j)); out_labels.append(row_labels[j]); out_types.append(row_types[j])
        del feats
        valid = [True] * len(out_src) + [False] * (pad_to - len(out_src))
        out_labels += [IGNORE_INDEX] * (pad_to - len(out_labels))
        out_types += [tt.PADDING] * (pad_to - len(out_types))
        rows.append((out_src, valid, out_labels, out_types))
    return rows


def test_splice_matches_naive_reference(rng):
    b, t, n = 5, 12, 6
    ids = rng.integers(3, 50, size=(b, t))
    lengths = [12, 9, 7, 12, 5]
    image_pos = [0, 4, 6, None, 2]  # at the start, middle, last valid token, text-only, ...
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.int32)
    for row, p in enumerate(image_pos):
        if p is not None:
            ids[row, p] = IMG
    ids = np.where(mask == 1, ids, 0)
    labels = np.where(mask == 1, rng.integers(3, 50, size=(b, t)), IGNORE_INDEX)
    types = np.where(mask == 1, rng.integers(tt.SYSTEM, tt.ANSWER + 1, size=(b, t)), tt.PADDING)
    feats = rng.standard_normal((b, n, 4))
    layout = splice_layout(jnp.asarray(ids), jnp.asarray(mask), IMG, n)
    L = t - 1 + n
    assert layout.valid.shape == (b, L)
    for row, (src, valid, exp_labels, exp_types) in enumerate(naive_splice(ids, mask, labels, types, feats, L)):
        assert list(np.asarray(layout.valid[row])) == valid
        for j, (kind, k) in enumerate(src):
            assert bool(layout.is_image[row, j]) == (kind == "image")
            index = layout.image_index if kind == "image" else layout.text_index
            assert int(index[row, j]) == k, (row, j)
        # Labels and types through the same gathers the model uses.
        got_labels = np.take_along_axis(labels, np.asarray(layout.text_index), 1)
        got_labels = np.where(np.asarray(layout.is_image) | ~np.asarray(layout.valid), IGNORE_INDEX, got_labels)
        assert list(got_labels[row]) == exp_labels


def test_default_text_types():
    ids = jnp.asarray([[5, 6, IMG, 7, 0], [5, 6, 7, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    got = np.asarray(default_text_types(ids, mask, IMG))
    S, Q, P = tt.SYSTEM, tt.QUESTION, tt.PADDING
    assert got.tolist() == [[S, S, Q, Q, P], [Q, Q, Q, P, P]]
