"""Image loading and LLaVA's CLIP preprocessing (`image_aspect_ratio "pad"`), in numpy + PIL.

LLaVA opens an image with `Image.open(path).convert("RGB")`, pads it to a centred square
filled with the CLIP mean colour as integers (`expand2square` with
`tuple(int(x * 255) for x in image_mean)` = (122, 116, 104): truncated, not rounded),
then runs CLIPImageProcessor: PIL bicubic resize of the shortest edge to the input size,
centre crop, scale 1/255, normalise with the CLIP mean / std. `preprocess_image` does the
same and returns NHWC without the batch axis (our models' layout); the test compares it
with transformers' PIL-backend CLIP processor. Training batches may carry the resized uint8
pixels instead (`resize_and_crop`, data.uint8_pixels), normalised on the device by
`normalise_on_device` to the same values.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image

from gamma_mod_jax.data.conversation import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[Image.Image, np.ndarray]


def pad_color(mean: Sequence[float] = CLIP_MEAN) -> Tuple[int, ...]:
    """LLaVA's padding colour: each mean channel times 255, truncated to an integer."""
    return tuple(int(m * 255) for m in mean)


def expand_to_square(image: Image.Image, color) -> Image.Image:
    """`image` centred on a square canvas of side max(w, h) filled with `color`; the offset
    of the short side is floor((long - short) / 2). A square image is returned as is."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _as_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"numpy images must be uint8 [h, w] or [h, w, 1|3|4], got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_crop(image: ImageLike, size: int, *, mean: Sequence[float] = CLIP_MEAN,
                    pad_to_square: bool = True) -> np.ndarray:
    """uint8 [size, size, 3]: RGB, padded to a centred square with the integer mean colour
    (pad_to_square), shortest edge resized to `size` (PIL bicubic; the long edge to
    int(size * long / short)), centre crop. `normalise` of it is `preprocess_image`."""
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    image = _as_rgb(image)
    if pad_to_square:
        image = expand_to_square(image, pad_color(mean))
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(np.asarray(image)[top:top + size, left:left + size])


def normalise(pixels: np.ndarray, *, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32: x / 255, (x - mean) / std (CLIPImageProcessor's rescale
    and normalise)."""
    x = (np.asarray(pixels).astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_image(image: ImageLike, size: int, *, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD, pad_to_square: bool = True) -> np.ndarray:
    """float32 [size, size, 3]: `resize_and_crop`, then `normalise`."""
    return normalise(resize_and_crop(image, size, mean=mean, pad_to_square=pad_to_square), mean=mean, std=std)


def normalisation_table(mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """float32 [256, 3]: `normalise` of every uint8 value in every channel, so that a
    device-side lookup gives the host path's values bit for bit."""
    return normalise(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1), mean=mean, std=std)


def normalise_on_device(pixels_bhwc, has_image_b, table: np.ndarray = None):
    """uint8 [b, h, w, 3] (jax) -> float32 CLIP-normalised pixels, exactly `normalise`'s values
    (a lookup in `normalisation_table`); rows whose `has_image_b` is False become zeros, as
    the host path's text-only rows. Pixels then travel to the device as uint8 (4x fewer bytes)."""
    import jax.numpy as jnp

    table = jnp.asarray(normalisation_table() if table is None else table)
    values = table[pixels_bhwc.astype(jnp.int32), jnp.arange(3)]
    return jnp.where(has_image_b[:, None, None, None], values, jnp.zeros((), values.dtype))


def load_image(path: str) -> Image.Image:
    """The image file at `path` in RGB (alpha dropped, as LLaVA's `.convert("RGB")`);
    BadRecord naming the path when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise BadRecord(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise BadRecord(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
