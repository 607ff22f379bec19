"""From a drawing (the tour's canvas) to the 28x28 image a model was trained on.

MNIST was made this way (LeCun et al.): each digit was cropped to its bounding box, scaled with
anti-aliasing so its longer side is 20 pixels (aspect ratio kept), and placed in a 28x28 field
so that its centre of mass lies at the centre. A freehand drawing on a 280x280 canvas goes
through the same steps here, so the model sees the drawing as it saw its training data; the
result is a uint8 [28, 28] image that then goes through ``engine.data.images.to_model_input``
like every other image. Uploaded photos find their digit another way (engine/data/photo.py)
and then share the last steps, ``fit_to_field``.

Pure numpy + Pillow: no streamlit, so it is tested on its own (tests/test_drawing.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 28  # the field
BOX = 20  # the longer side of the digit after scaling
INK_LEVEL = 0.2  # a pixel is ink when brighter than this fraction of the brightest pixel
MAX_SIDE = 4096  # refuse absurdly large inputs instead of allocating for them


class DrawingError(ValueError):
    """The input is not an image this module can read (wrong shape or type)."""


def to_gray(image: np.ndarray) -> np.ndarray:
    """Canvas pixels -> float32 [H, W] ink intensity in [0, 255] (white ink on black).

    Accepts RGBA (the canvas's ``image_data``), RGB, or grey [H, W]. Transparent pixels count
    as background, so it does not matter whether the canvas background was painted in.
    """
    a = np.asarray(image)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise DrawingError(f"expected a numeric image array, got dtype {a.dtype}")
    if a.ndim == 2:
        gray = a.astype(np.float32)
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = a[..., :3].astype(np.float32)
        gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if a.shape[2] == 4:
            gray = gray * (a[..., 3].astype(np.float32) / 255.0)
    else:
        raise DrawingError(f"expected [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if min(gray.shape) < 1 or max(gray.shape) > MAX_SIDE:
        raise DrawingError(f"image size {gray.shape} is outside 1..{MAX_SIDE} pixels")
    if not np.isfinite(gray).all():
        raise DrawingError("image contains NaN or infinity")
    return np.clip(gray, 0, 255)


def bounding_box(gray: np.ndarray, level: float = INK_LEVEL) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom/right exclusive, of the ink; None for a blank image."""
    peak = float(gray.max())
    if peak <= 0:
        return None
    ink = gray > level * peak
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _resize(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased resize of a float image: box filter when shrinking, bilinear when growing."""
    shrinking = height <= crop.shape[0] and width <= crop.shape[1]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    img = Image.fromarray(crop.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), method), dtype=np.float32)


def center_of_mass(img: np.ndarray) -> tuple[float, float]:
    """(row, column) of the intensity-weighted mean pixel index."""
    total = float(img.sum())
    ys, xs = np.indices(img.shape)
    return float((img * ys).sum() / total), float((img * xs).sum() / total)


def to_mnist(image: np.ndarray) -> np.ndarray | None:
    """A drawing -> uint8 [28, 28] prepared as MNIST was; None when nothing is drawn.

    1. ink intensity (``to_gray``); 2. crop to the ink's bounding box; 3.-5. ``fit_to_field``.
    Photos take another way to the crop (``engine.data.photo``) and then the same ``fit_to_field``.
    """
    gray = to_gray(image)
    box = bounding_box(gray)
    if box is None:
        return None
    top, bottom, left, right = box
    return fit_to_field(gray[top:bottom, left:right])


def fit_to_field(crop: np.ndarray) -> np.ndarray | None:
    """Cropped ink (white on black, float) -> uint8 [28, 28] as MNIST was made; None if no ink.

    3. scale so the longer side is 20 px, aspect ratio kept, with anti-aliasing; 4. stretch to
    a peak of 255; 5. place in a 28x28 field with the centre of mass at (14, 14) (the index
    mean of MNIST's test images is 14.0 on both axes), kept inside the field.
    """
    crop = np.asarray(crop, dtype=np.float32)
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = _resize(crop, nh, nw)
    peak = float(small.max())
    if peak <= 0:
        return None
    small = np.clip(small * (255.0 / peak), 0, 255)

    cy, cx = center_of_mass(small)
    # offset of the small image's top-left corner in the 28x28 field, clamped so it fits
    oy = int(np.clip(round(SIZE / 2 - cy), 0, SIZE - nh))
    ox = int(np.clip(round(SIZE / 2 - cx), 0, SIZE - nw))
    field = np.zeros((SIZE, SIZE), dtype=np.float32)
    field[oy : oy + nh, ox : ox + nw] = small
    return np.rint(field).astype(np.uint8)


def to_canvas_rgba(img28: np.ndarray, size: int = 280) -> np.ndarray:
    """A uint8 [28, 28] image rendered as the canvas returns a drawing: uint8 [size, size, 4].

    White ink on an opaque black background, upscaled bilinearly. Used to send a test-set
    digit down the same path as a drawing (the tour's "try a test digit" and the tests).
    """
    a = np.asarray(img28)
    if a.ndim != 2:
        raise DrawingError(f"expected a [H, W] image, got shape {a.shape}")
    big = Image.fromarray(a.astype(np.uint8), mode="L").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    g = np.asarray(big, dtype=np.uint8)
    return np.stack([g, g, g, np.full_like(g, 255)], axis=-1)
