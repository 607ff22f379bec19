"""Photos of digits -> the 28x28 the model was trained on (engine/data/photo.py).

Test-set digits are rendered into photo-like images (several sizes, off-centre at varying
scales, dark ink on light paper and light chalk on a dark board, a lighting gradient, optics
blur, Gaussian noise, JPEG) and sent through the upload path; the bundled multi-exit CNN must
classify them as it classifies the clean digit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from engine.data import images
from engine.data.drawing import center_of_mass, to_mnist
from engine.data.photo import ImageInputError, find_ink, prepare_array, prepare_image
from engine.families import load_model
from engine.registry import RegistryError

SIZES = ((640, 480), (320, 240), (1000, 800), (480, 640))
N_DIGITS = 200


def render_photo(digit: np.ndarray, rng: np.random.Generator, light_paper: bool) -> bytes:
    """A uint8 [28, 28] MNIST digit as a JPEG photo of a digit on paper or on a board."""
    w, h = SIZES[rng.integers(len(SIZES))]
    side = int(rng.uniform(0.35, 0.8) * min(w, h))  # the 28x28 field's side in the photo
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    alpha = np.zeros((h, w), np.float32)
    big = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    alpha[top : top + side, left : left + side] = np.asarray(big, np.float32) / 255
    alpha = np.clip(alpha, 0, 1)
    # lighting: a linear ramp in a random direction, up to +-35 grey levels across the frame
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (x / w - 0.5) + np.sin(angle) * (y / h - 0.5)) * rng.uniform(20, 70)
    if light_paper:
        paper, ink = rng.uniform(150, 225), rng.uniform(15, 70)
    else:
        paper, ink = rng.uniform(25, 80), rng.uniform(180, 240)
    gray = (paper + ramp) * (1 - alpha) + ink * alpha
    tint = np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.85, 1.0)], np.float32)
    rgb = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(3, 10), (h, w, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=int(rng.integers(60, 90))
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def model():
    try:
        return load_model("mnist_multi_exit_cnn")
    except (RegistryError, FileNotFoundError, KeyError) as e:
        pytest.skip(f"bundled mnist_multi_exit_cnn not available: {e}")


@pytest.fixture(scope="module")
def digits():
    ts = images.load("mnist", "test")
    idx = np.random.default_rng(14).choice(len(ts), N_DIGITS, replace=False)
    return ts.images[idx]


def last_exit(model, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        h = images.to_model_input(batch)
        for stage in model.stages:
            h = stage(h)
        return model.heads[-1](h).argmax(-1).numpy()


def photos(digits: np.ndarray) -> list[bytes]:
    rng = np.random.default_rng(2024)
    return [render_photo(d, rng, light_paper=bool(i % 2 == 0)) for i, d in enumerate(digits)]


def test_photos_are_read_as_the_clean_digit(model, digits):
    shots = photos(digits)
    prepared = np.stack([prepare_image(p, "mnist", "photo.jpg").model_input for p in shots])
    clean, seen = last_exit(model, digits), last_exit(model, prepared)
    agree = float((clean == seen).mean())
    paper, board = (float((clean == seen)[k::2].mean()) for k in (0, 1))
    print(f"agreement {agree:.1%} (light paper {paper:.1%}, dark board {board:.1%})")
    assert agree >= 0.9, f"only {agree:.1%} of photos read as the clean digit"
    assert min(paper, board) >= 0.85
    # the canvas path alone (no background removal, no inversion, no denoising) fails them:
    # these photos are not trivially easy
    naive = np.stack([to_mnist(np.asarray(Image.open(io.BytesIO(p)).convert("L"))) for p in shots])
    assert float((last_exit(model, naive) == clean).mean()) < 0.5


def test_prepared_photo_is_mnist_like(digits):
    rng = np.random.default_rng(7)
    for light in (True, False):
        prep = prepare_image(render_photo(digits[0], rng, light), "mnist")
        x = prep.model_input
        assert x.shape == (28, 28) and x.dtype == np.uint8 and x.max() == 255
        assert prep.inverted is light
        cy, cx = center_of_mass(x.astype(np.float64))
        assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1
        rows, cols = np.flatnonzero((x > 30).any(1)), np.flatnonzero((x > 30).any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 21
        assert (x[:2] < 30).all() and (x[-2:] < 30).all()  # the background is black
        top, bottom, left, right = prep.box
        assert prep.ink.shape == (bottom - top, right - left)
        assert prep.original.shape[2] == 3


def test_crop_finds_the_digit_off_centre():
    """A digit in the corner of a gradient-lit page is found there, and specks are dropped."""
    page = np.tile(np.linspace(160, 230, 800, dtype=np.float32), (600, 1))
    page[420:540, 610:640] = 30  # a "1" near the bottom-right corner
    page[50, 50] = page[300, 100] = 0  # specks of dust
    found = find_ink(page)
    assert found.inverted
    top, bottom, left, right = found.box
    assert 415 <= top <= 422 and 538 <= bottom <= 545 and 605 <= left <= 612
    assert 638 <= right <= 645


def test_same_digit_anywhere_gives_about_the_same_input():
    page = np.full((480, 640), 200, np.float32)
    a, b = page.copy(), page.copy()
    a[40:200, 60:90] = 20
    b[300:460, 500:530] = 20
    xa, _ = prepare_array(a, "mnist")
    xb, _ = prepare_array(b, "mnist")
    assert np.abs(xa.astype(int) - xb.astype(int)).max() <= 2


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "arr",
    [
        np.full((480, 640), 255, np.uint8),  # white paper
        np.zeros((40, 40), np.uint8),  # black
        np.full((100, 100, 3), (30, 120, 200), np.uint8),  # one colour
        np.tile(np.linspace(40, 220, 640).astype(np.uint8), (480, 1)),  # a smooth gradient
        np.clip(np.random.default_rng(0).normal(128, 4, (240, 320)), 0, 255).astype(np.uint8),
    ],
    ids=["white", "black", "colour", "gradient", "noise"],
)
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_blank_images_raise_one_error_with_a_clear_message(arr, dataset):
    with pytest.raises(ImageInputError, match="blank"):
        prepare_image(_png(arr), dataset, "empty.png")


def test_fashion_item_is_cropped_and_fills_the_field():
    """Fashion-MNIST's items were trimmed to the object and fill the 28x28 field."""
    page = np.full((400, 600), 235, np.uint8)
    page[100:300, 260:340] = 60  # a dark trouser-ish block, off-centre, on white
    prep = prepare_image(_png(page), "fashion_mnist")
    x = prep.model_input
    assert prep.inverted and x[14, 14] > 200 and x[14, 0] < 30
    rows = np.flatnonzero((x > 100).any(1))
    assert rows[0] <= 1 and rows[-1] >= 26  # the longer side spans the field


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image Pillow can read"),
        (_png(np.random.default_rng(1).integers(0, 255, (64, 64), np.uint8))[:900], "corrupt"),
        (b"\x89PNG" + bytes(10 * 2**20), "images up to 10 MB"),
        (_png(np.zeros((4000, 7000), np.uint8)), "megapixels"),
    ],
    ids=["empty", "text", "truncated", "too-many-bytes", "too-many-pixels"],
)
def test_unreadable_files_raise_the_same_error(data, message):
    with pytest.raises(ImageInputError, match=message):
        prepare_image(data, "mnist", "x.png")
