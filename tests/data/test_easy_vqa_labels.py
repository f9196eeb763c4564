"""easy-VQA image labels read off the questions, checked against the pictures themselves."""

import numpy as np
import pytest
from PIL import Image

from gamma_mod_jax.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, _split_data, easy_vqa_image_labels

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
       "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}


def _shape_pixels(path):
    img = np.asarray(Image.open(path).convert("RGB"), np.float64)
    background = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    return img, np.abs(img - background).sum(-1) > 60


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_match_the_pixels(rng, split):
    labels = easy_vqa_image_labels(split)
    paths = _split_data(split)[3]
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
