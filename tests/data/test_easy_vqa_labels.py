"""easy-VQA image labels read off the questions, checked against the pictures themselves."""

import numpy as np
import pytest
from PIL import Image

from gamma_mod_jax.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, easy_vqa_image_labels, easy_vqa_image_paths

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
       "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}


def _shape_pixels(path):
    img = np.asarray(Image.open(path).convert("RGB"), np.float64)
    background = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    return img, np.abs(img - background).sum(-1) > 60


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_match_the_pixels(rng, split):
    labels = easy_vqa_image_labels(split)
    paths = easy_vqa_image_paths(split)
    assert len(labels) == len(paths)
    known = [i for i, (c, s) in labels.items() if c and s]
    assert len(known) > 0.8 * len(labels)  # most images have both attributes settled
    colour_ok, shape_ok = [], []
    for image_id in rng.choice(known, 150, replace=False):
        colour, shape = labels[int(image_id)]
        img, mask = _shape_pixels(paths[int(image_id)])
        mean = np.median(img[mask], axis=0)
        colour_ok.append(min(RGB, key=lambda c: np.sum((np.asarray(RGB[c]) - mean) ** 2)) == colour)
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # share of the bounding box covered
        guessed = "rectangle" if fill > 0.9 else ("circle" if fill > 0.66 else "triangle")
        shape_ok.append(guessed == shape)
    assert np.mean(colour_ok) > 0.97 and np.mean(shape_ok) > 0.95, (np.mean(colour_ok), np.mean(shape_ok))
    assert {c for c, _ in labels.values()} - {None} == set(EASY_VQA_COLORS)
    assert {s for _, s in labels.values()} - {None} == set(EASY_VQA_SHAPES)


def test_balanced_selection_has_as_many_false_statements_as_true_ones():
    from gamma_mod_jax.data.easy_vqa import _split_data, _statement, _words, easy_vqa_records

    texts, answers, image_ids, _ = _split_data("test")
    labels = easy_vqa_image_labels("test")
    records = easy_vqa_records("test", questions="balanced")
    index = [int(r["id"].rsplit("/", 1)[1]) for r in records]
    assert len(set(index)) == len(index)
    counts = {}
    for i in index:
        if answers[i] in ("yes", "no"):
            kind, holds = _statement(texts[i], answers[i])
            counts[kind, holds] = counts.get((kind, holds), 0) + 1
            # The statement agrees with the image's label (checked against pixels above).
            value = labels[image_ids[i]][0 if kind == "color" else 1]
            named = [w for w in (EASY_VQA_COLORS if kind == "color" else EASY_VQA_SHAPES) if w in _words(texts[i])]
            if value is not None:
                assert (value in named) == holds, (texts[i], answers[i], value)
    assert counts["color", True] == counts["color", False] and counts["shape", True] == counts["shape", False]
    open_ = sum(a not in ("yes", "no") for a in answers)
    assert sum(answers[i] not in ("yes", "no") for i in index) == open_
    assert len(index) == open_ + 2 * counts["color", True] + 2 * counts["shape", True]
