"""Uploaded images (photos, scans, drawings) -> the 28x28 image a model was trained on.

One function, ``prepare_image``, serves every page that takes an image upload, with one error
type, ``ImageInputError``, whose message is for the user. A photo of a digit is not a canvas:
the paper is grey rather than black, lit unevenly, noisy, and the digit is small and anywhere
in the frame. So the background is estimated (a smooth quadratic surface fitted robustly to the
whole image, which follows a lighting gradient and ignores the few ink pixels), subtracted, the
polarity decided (dark ink on light paper is inverted to MNIST's white on black), noise
thresholded away, and the image cropped to the ink around its largest connected stroke. From
there digits take the canvas's last steps (``drawing.fit_to_field``: 20x20, centre of mass at
the centre of 28x28), and Fashion-MNIST's items are padded square and scaled to 28x28, as that
data set was made.

Pure numpy + Pillow + scipy.ndimage: no streamlit; decoded with Pillow only (never unpickled).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from engine.data.drawing import fit_to_field

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 25_000_000  # e.g. 5000 x 5000
MAX_SIDE = 10_000
FIT_SIDE = 96  # the background surface is fitted on a copy this size (it is smooth anyway)
MIN_CONTRAST = 20.0  # grey levels: ink must stand out at least this much from the background
NOISE_SIGMAS = 5.0  # ...and at least this many noise standard deviations
KEEP_FRACTION = 0.05  # strokes kept besides the largest: at least this fraction of its area


class ImageInputError(ValueError):
    """An uploaded file is not an image the app can use; the message says why."""


@dataclass(frozen=True)
class PreparedImage:
    original: np.ndarray  # uint8 [H, W, 3] as decoded (for display)
    ink: np.ndarray  # uint8 [h, w]: the cropped ink, background removed, white on black
    model_input: np.ndarray  # uint8 [28, 28], what the model sees
    format: str
    inverted: bool  # the background was lighter than the ink (so the image was inverted)
    box: tuple[int, int, int, int]  # (top, bottom, left, right) of the crop in the original


# --- decoding ------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str = "upload") -> tuple[Image.Image, str]:
    """Decode with Pillow after checking size; raise ImageInputError with a clear reason."""
    if not data:
        raise ImageInputError(f"{name} is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageInputError(
            f"{name} is {len(data) / 2**20:.1f} MB; images up to "
            f"{MAX_UPLOAD_BYTES // 2**20} MB are accepted"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                raise ImageInputError(
                    f"{name} is {w}x{h} pixels; at most {MAX_PIXELS // 1_000_000} megapixels "
                    f"and {MAX_SIDE} pixels a side are accepted"
                )
            fmt = img.format or "unknown"
            img.load()  # decode now, so a truncated or corrupt file fails here
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(
            f"{name} is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"{name} is too large (decompression bomb check)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageInputError(f"{name} is corrupt or truncated ({e})") from None
    if w < 1 or h < 1:
        raise ImageInputError(f"{name} has no pixels")
    return img, fmt


def to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3]; transparency is composited onto white (paper)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("RGB"))


# --- finding the ink -----------------------------------------------------------------------------


def _centres(n: int) -> np.ndarray:
    """Pixel centres of n pixels spanning [-1, 1] (the same coordinates at any resolution)."""
    return (np.arange(n) + 0.5) / n * 2 - 1


def background(gray: np.ndarray) -> np.ndarray:
    """float32 [H, W]: the paper's (or board's) brightness, a quadratic surface in x and y.

    Fitted by least squares on a FIT_SIDE copy, starting from the median and refitting on the
    pixels within 2.5 robust standard deviations, so ink (a minority of pixels) does not pull it.
    """
    h, w = gray.shape
    scale = min(1.0, FIT_SIDE / max(h, w))
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(
        Image.fromarray(gray.astype(np.float32), mode="F").resize((sw, sh), Image.Resampling.BOX)
    ).ravel()
    y, x = np.meshgrid(_centres(sh), _centres(sw), indexing="ij")
    y, x = y.ravel(), x.ravel()
    a = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    coef = np.array([np.median(small), 0, 0, 0, 0, 0], dtype=np.float64)
    for _ in range(6):
        res = small - a @ coef
        sigma = 1.4826 * float(np.median(np.abs(res - np.median(res)))) + 1.0
        keep = np.abs(res) < 2.5 * sigma
        if keep.sum() < a.shape[1] * 4:
            break
        ak = a[keep]  # normal equations: 6 unknowns, a few thousand pixels
        coef = np.linalg.solve(ak.T @ ak + 1e-9 * np.eye(6), ak.T @ small[keep])
    c0, cx, cy, cxx, cxy, cyy = coef
    yy, xx = _centres(h)[:, None], _centres(w)[None, :]
    return (c0 + cx * xx + cy * yy + cxx * xx**2 + cxy * xx * yy + cyy * yy**2).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample (between-class variance maximised over 256 bins)."""
    hist, edges = np.histogram(values, bins=256)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(mids[int(np.nanargmax(between))])


@dataclass(frozen=True)
class Ink:
    ink: np.ndarray  # float32 [h, w] in [0, 255], white on black, noise removed (the crop)
    box: tuple[int, int, int, int]  # (top, bottom, left, right) in the input
    inverted: bool


def find_ink(gray: np.ndarray, name: str = "the image", peak_q: float = 90) -> Ink:
    """Grey [H, W] photo -> the ink around its largest stroke, background removed.

    The ink is stretched so its ``peak_q`` percentile is 255 (digit strokes are saturated in
    MNIST; a garment's texture needs a higher percentile). Raises ImageInputError when nothing stands out from the background (a blank or flat image,
    a pure gradient, or noise only).
    """
    gray = np.asarray(gray, dtype=np.float32)
    if float(gray.max()) - float(gray.min()) < MIN_CONTRAST / 2:
        raise ImageInputError(f"{name} is blank (a single flat colour): there is nothing to read")
    smooth = max(0.7, max(gray.shape) / 700)  # about one pixel of a 640x480 photo
    res = ndimage.gaussian_filter(gray - background(gray), smooth)
    sample = res[::3, ::3]  # enough pixels for a robust noise level, at a ninth of the cost
    noise = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    floor = max(MIN_CONTRAST, NOISE_SIGMAS * noise)
    dark = float(np.clip(-res - floor, 0, None).sum())
    light = float(np.clip(res - floor, 0, None).sum())
    if dark == 0 and light == 0:
        raise ImageInputError(
            f"{name} looks blank: nothing stands out from its background (a flat colour, a "
            "smooth gradient or only noise)"
        )
    inverted = dark > light
    ink = np.clip(-res if inverted else res, 0, None)
    strong = ink[ink > floor]
    level = max(floor, _otsu(strong) * 0.5 if strong.size > 16 else floor)
    mask = ink > level
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        raise ImageInputError(f"{name} looks blank: nothing stands out from its background")
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    big = int(np.argmax(areas))
    slices = ndimage.find_objects(labels)
    ys, xs = slices[big]
    reach = 0.5 * max(ys.stop - ys.start, xs.stop - xs.start)
    keep = np.zeros(n + 1, dtype=bool)
    for i, (sy, sx) in enumerate(slices):
        gap_y = max(0, ys.start - sy.stop, sy.start - ys.stop)
        gap_x = max(0, xs.start - sx.stop, sx.start - xs.stop)
        keep[i + 1] = areas[i] >= KEEP_FRACTION * areas[big] and max(gap_y, gap_x) <= reach
    kept = keep[labels]
    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    # the strokes' soft edges (a pixel or two around the mask) stay; noise elsewhere goes
    near = ndimage.binary_dilation(kept, iterations=max(1, round(2 * smooth)))
    peak = float(np.percentile(ink[kept], peak_q))
    clean = np.clip(np.where(near, ink, 0) * (255.0 / peak), 0, 255)
    top, bottom, left, right = box
    return Ink(clean[top:bottom, left:right].astype(np.float32), box, inverted)


def fit_square(crop: np.ndarray, size: int = 28) -> np.ndarray:
    """Fashion-MNIST's way: pad to a square (background 0), resize to size x size, anti-aliased."""
    h, w = crop.shape
    side = max(h, w)
    canvas = np.zeros((side, side), dtype=np.float32)
    canvas[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
    img = Image.fromarray(canvas, mode="F").resize((size, size), Image.Resampling.BOX)
    return np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)


def prepare_array(rgb: np.ndarray, dataset: str, name: str = "the image") -> tuple[np.ndarray, Ink]:
    """uint8 [H, W, 3] (or grey [H, W]) -> (uint8 [28, 28] model input, the ink found)."""
    a = np.asarray(rgb, dtype=np.float32)
    gray = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if a.ndim == 3 else a
    digits = dataset in ("mnist", "digits")
    found = find_ink(gray, name, peak_q=90 if digits else 99.5)
    x = fit_to_field(found.ink) if digits else fit_square(found.ink)
    if x is None:
        raise ImageInputError(f"{name} looks blank: nothing stands out from its background")
    return x, found


def prepare_image(data: bytes, dataset: str, name: str = "upload") -> PreparedImage:
    """Bytes of any image Pillow reads -> the 28x28 uint8 input for a model of ``dataset``."""
    img, fmt = decode_image(data, name)
    rgb = to_rgb(img)
    x, found = prepare_array(rgb, dataset, name)
    return PreparedImage(
        rgb, np.rint(found.ink).astype(np.uint8), x, fmt, found.inverted, found.box
    )
