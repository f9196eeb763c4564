"""Image and grid resampling that equals PyTorch's `F.interpolate` exactly.

`jax.image.resize` uses half-pixel centres (and antialiasing when shrinking), so it
does not reproduce `align_corners=True` bilinear nor torch's antialiased bicubic.
Both are separable linear maps: we build their [out, in] matrices in numpy (float64,
static shapes at trace time) and apply them with einsum.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def bilinear_align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of `F.interpolate(mode='bilinear', align_corners=True)` on one axis."""
    m = np.zeros((out_size, in_size))
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    for i in range(out_size):
        src = i * scale
        lo = min(int(math.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


def _cubic_aa(x: float, a: float = -0.5) -> float:
    # torch's antialiased bicubic uses a = -0.5 (PIL's kernel), not the -0.75 of plain bicubic.
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=None)
def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of `F.interpolate(mode='bicubic', align_corners=False,
    antialias=True)` on one axis: the kernel widens by the scale when shrinking and the
    taps inside the image are renormalised (no edge clamping)."""
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / scale if scale > 1.0 else 1.0
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = np.array([_cubic_aa((j - center + 0.5) * inv) for j in range(lo, hi)])
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def _apply_separable(x_bhwc, mat_h: np.ndarray, mat_w: np.ndarray):
    dtype = x_bhwc.dtype
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(mat_h, jnp.float32), x_bhwc.astype(jnp.float32))
    x = jnp.einsum("pw,bowc->bopc", jnp.asarray(mat_w, jnp.float32), x)
    return x.astype(dtype)


def resize_bilinear_align_corners(x_bhwc, out_h: int, out_w: int):
    """[b, h, w, c] -> [b, out_h, out_w, c], as torch bilinear with align_corners=True."""
    _, h, w, _ = x_bhwc.shape
    if (h, w) == (out_h, out_w):
        return x_bhwc
    return _apply_separable(x_bhwc, bilinear_align_corners_matrix(h, out_h), bilinear_align_corners_matrix(w, out_w))


def resample_grid_bicubic_aa(grid_bhwc, out_h: int, out_w: int):
    """[b, h, w, c] -> [b, out_h, out_w, c], as torch bicubic with antialias=True."""
    _, h, w, _ = grid_bhwc.shape
    if (h, w) == (out_h, out_w):
        return grid_bhwc
    return _apply_separable(grid_bhwc, bicubic_aa_matrix(h, out_h), bicubic_aa_matrix(w, out_w))


def resize_bilinear_half_pixel(x_bhwc, out_h: int, out_w: int):
    """[b, h, w, c] -> [b, out_h, out_w, c], as torch bilinear with align_corners=False and
    no antialiasing (Mini-Gemini's views and feature maps), computed in float32 and cast back.
    `jax.image.resize` samples at the same half-pixel centres; its edge renormalisation
    equals torch's clamping of source coordinates."""
    b, h, w, c = x_bhwc.shape
    if (h, w) == (out_h, out_w):
        return x_bhwc
    out = jax.image.resize(x_bhwc.astype(jnp.float32), (b, out_h, out_w, c), method="linear", antialias=False)
    return out.astype(x_bhwc.dtype)
