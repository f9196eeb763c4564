"""LLaVA image preprocessing against transformers' CLIP image processor (PIL backend, the
one LLaVA ran) and a naive pad-to-square; image loading errors."""

import numpy as np
import pytest
from PIL import Image

from gamma_mod_jax.data.conversation import BadRecord
from gamma_mod_jax.data.image import (CLIP_MEAN, CLIP_STD, expand_to_square, load_image, pad_color,
                                      preprocess_image)


def clip_processor(size):
    """transformers' CLIPImageProcessor with LLaVA's settings. transformers 5 runs the class
    named CLIPImageProcessor on torchvision (not importable beside the tests' torch) and
    falls back to this PIL backend, which is the processor LLaVA used."""
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return CLIPImageProcessorPil(do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BICUBIC,
                                 do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                                 rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                                 image_std=list(CLIP_STD), do_convert_rgb=True)


def naive_pad(pixels, color):
    """Centred square canvas of `color`, the image pasted at floor((long - short) / 2)."""
    h, w, _ = pixels.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:, :] = color
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    return canvas


SHAPES = [(37, 53), (53, 37), (120, 200), (201, 64), (48, 48), (17, 90)]  # (height, width), both orientations


def random_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_pad_colour_is_llava_integer_mean():
    assert pad_color() == (122, 116, 104)  # int(x * 255), truncated as expand2square's caller does
    assert pad_color((0.5, 0.999, 0.0)) == (127, 254, 0)


@pytest.mark.parametrize("h, w", SHAPES)
def test_pad_to_square_matches_naive(rng, h, w):
    pixels = random_image(rng, h, w)
    padded = np.asarray(expand_to_square(Image.fromarray(pixels), pad_color()))
    np.testing.assert_array_equal(padded, naive_pad(pixels, pad_color()))
    if h != w:  # the pad really has the mean colour, on both sides of the short edge
        np.testing.assert_array_equal(padded[0, 0], (122, 116, 104))
        np.testing.assert_array_equal(padded[-1, -1], (122, 116, 104))


@pytest.mark.parametrize("size", [24, 33, 64])
@pytest.mark.parametrize("h, w", SHAPES)
def test_matches_clip_image_processor_after_padding(rng, h, w, size):
    pixels = random_image(rng, h, w)
    ours = preprocess_image(Image.fromarray(pixels), size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    padded = Image.fromarray(naive_pad(pixels, pad_color()))
    ref = clip_processor(size)(padded, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("size", [24, 33])
@pytest.mark.parametrize("h, w", SHAPES)
def test_matches_clip_image_processor_without_padding(rng, h, w, size):
    """pad_to_square=False: the processor's own shortest-edge resize and centre crop."""
    pixels = random_image(rng, h, w)
    ours = preprocess_image(pixels, size, pad_to_square=False)  # numpy input too
    ref = clip_processor(size)(Image.fromarray(pixels), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert ours.shape == (size, size, 3)
    assert np.abs(ours - ref).max() < 1e-5


def test_other_modes_become_rgb(rng):
    grey = Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), mode="L")
    np.testing.assert_array_equal(preprocess_image(grey, 16), preprocess_image(grey.convert("RGB"), 16))
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), mode="RGBA")
    np.testing.assert_array_equal(preprocess_image(rgba, 16), preprocess_image(rgba.convert("RGB"), 16))


def test_mean_colour_pad_normalises_to_near_zero():
    black = Image.new("RGB", (10, 40), (0, 0, 0))
    x = preprocess_image(black, 40)
    pad = x[20, 0]  # left border: pad (the image is 10 wide, centred in 40)
    expected = (np.array(pad_color(), np.float32) / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pad, expected, atol=1e-6)
    assert np.abs(pad).max() < 0.02


def test_bad_arguments(rng):
    with pytest.raises(ValueError):
        preprocess_image(rng.random((8, 8, 3)), 8)  # floats are not an image
    with pytest.raises(ValueError):
        preprocess_image(Image.new("RGB", (8, 8)), 0)


def test_load_image(tmp_path, rng):
    pixels = random_image(rng, 12, 20)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "b.png")
    Image.fromarray(pixels[..., 0], mode="L").save(tmp_path / "c.jpg")
    image = load_image(str(tmp_path / "a.png"))
    assert image.mode == "RGB" and image.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(image), pixels)
    assert load_image(str(tmp_path / "b.png")).mode == "RGB"
    assert load_image(str(tmp_path / "c.jpg")).mode == "RGB"


def test_load_image_errors(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(BadRecord, match=f"{missing}: image file not found"):
        load_image(str(missing))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(BadRecord, match=f"{garbage}: unreadable image"):
        load_image(str(garbage))
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(BadRecord, match="unreadable image"):
        load_image(str(truncated))
    with pytest.raises(BadRecord, match="not found"):
        load_image(str(tmp_path))  # a folder
