"""Pixels sent as uint8 and normalised on the device give the float path's values exactly."""

import jax.numpy as jnp
import numpy as np
from PIL import Image

from gamma_mod_jax.data.image import (CLIP_MEAN, CLIP_STD, normalise_on_device, preprocess_image,
                                      resize_and_crop)


def _float_path(pixels_u8):
    """The float path's rescale and normalise, written out: float64 x / 255 to float32,
    then (x - mean) / std in float32."""
    x = (pixels_u8.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def test_device_normalisation_equals_the_float_path_on_random_images(rng):
    size = 28
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((28, 28), (40, 17), (13, 61))]
    host = np.stack([preprocess_image(im, size) for im in images])                 # float32, the host path
    sent = np.stack([resize_and_crop(im, size) for im in images])                  # what travels: uint8
    assert sent.dtype == np.uint8 and sent.nbytes * 4 == host.nbytes
    got = np.asarray(normalise_on_device(jnp.asarray(sent), jnp.ones(3, bool)))
    np.testing.assert_array_equal(got, host)
    np.testing.assert_array_equal(got, _float_path(sent))


def test_every_uint8_value_in_every_channel_and_text_only_rows_are_zeros():
    every = np.stack(np.meshgrid(np.arange(256), np.arange(3), indexing="ij"), -1)[..., 0]  # [256, 3]
    pixels = np.broadcast_to(every[None, :, None, :], (2, 256, 1, 3)).astype(np.uint8)
    got = np.asarray(normalise_on_device(jnp.asarray(pixels), jnp.asarray([True, False])))
    np.testing.assert_array_equal(got[0], _float_path(pixels[0]))
    assert not got[1].any()  # a row without an image: zeros, as the host path's collate
