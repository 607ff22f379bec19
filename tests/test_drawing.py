"""Canvas drawing -> 28x28 MNIST-style preprocessing (engine/data/drawing.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data import images
from engine.data.drawing import (
    BOX,
    DrawingError,
    bounding_box,
    center_of_mass,
    to_canvas_rgba,
    to_gray,
    to_mnist,
)


def stroke_canvas(top: int, left: int, h: int, w: int, size: int = 280, alpha_bg: int = 255):
    """RGBA canvas with a white 'L'-shaped stroke (vertical + horizontal bar), black background."""
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 3] = alpha_bg
    bar = max(2, min(h, w) // 6)
    rgba[top : top + h, left : left + bar, :] = 255
    rgba[top + h - bar : top + h, left : left + w, :] = 255
    return rgba


def test_blank_canvas_gives_none():
    assert to_mnist(np.zeros((280, 280, 4), dtype=np.uint8)) is None
    opaque_black = np.zeros((280, 280, 4), dtype=np.uint8)
    opaque_black[..., 3] = 255
    assert to_mnist(opaque_black) is None


def test_transparent_and_painted_background_agree():
    a = stroke_canvas(50, 60, 150, 90, alpha_bg=0)
    b = stroke_canvas(50, 60, 150, 90, alpha_bg=255)
    np.testing.assert_array_equal(to_mnist(a), to_mnist(b))


def test_output_is_mnist_like():
    out = to_mnist(stroke_canvas(40, 100, 200, 80))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255
    top, bottom, left, right = bounding_box(out.astype(np.float32))
    assert max(bottom - top, right - left) <= BOX
    cy, cx = center_of_mass(out.astype(np.float64))
    assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6


def test_translation_invariant():
    """The same drawing anywhere on the canvas gives the same 28x28 image."""
    a = to_mnist(stroke_canvas(10, 10, 120, 70))
    b = to_mnist(stroke_canvas(150, 190, 120, 70))
    np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    top=st.integers(0, 200),
    left=st.integers(0, 200),
    h=st.integers(12, 80),
    w=st.integers(12, 80),
)
def test_any_stroke_is_boxed_and_centred(top, left, h, w):
    out = to_mnist(stroke_canvas(top, left, h, w))
    assert out is not None and out.shape == (28, 28)
    t, b, lft, r = bounding_box(out.astype(np.float32))
    assert max(b - t, r - lft) <= BOX  # the longer side is scaled to 20 px
    cy, cx = center_of_mass(out.astype(np.float64))
    # centre of mass at (14, 14), up to the integer placement (or the clamp into the field)
    assert abs(cy - 14) <= 4 and abs(cx - 14) <= 4


def test_test_digits_round_trip_through_the_canvas_format():
    """A test digit rendered as the canvas returns it comes back close to itself."""
    try:
        data = images.load("mnist", "test")
    except images.DatasetUnavailable:
        pytest.skip("MNIST is not installed")
    diffs = []
    for img in data.images[:200]:
        rgba = to_canvas_rgba(img)
        assert rgba.shape == (280, 280, 4) and rgba.dtype == np.uint8
        assert (rgba[..., 3] == 255).all()
        back = to_mnist(rgba)
        diffs.append(np.abs(back.astype(int) - img.astype(int)).mean())
    assert np.mean(diffs) < 10  # of 255: blur from the two resamplings, not a different digit


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 5), dtype=np.uint8),
        np.zeros((10,), dtype=np.uint8),
        np.zeros((10, 10), dtype=bool),
        np.array([["a", "b"]]),
        np.full((10, 10), np.nan),
        np.zeros((5000, 2), dtype=np.uint8),
    ],
)
def test_bad_input_raises_a_clear_error(bad):
    with pytest.raises(DrawingError):
        to_gray(bad)


def test_grey_and_rgb_inputs():
    g = np.zeros((100, 100), dtype=np.uint8)
    g[20:80, 45:55] = 255
    rgb = np.stack([g, g, g], axis=-1)
    np.testing.assert_array_equal(to_mnist(g), to_mnist(rgb))
