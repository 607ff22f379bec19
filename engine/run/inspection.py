"""The sample inspector's engine side: uploads, attributions at one exit, difficulty galleries.

Every exit's probabilities for one input come from ``engine.run.exits.image_exits`` (the trace
builder's code) and the exit from ``engine.core.policies.exit_index`` (the traces' rule). The
model contract is the runtime's (``engine.run.runtime``): ``model.stages`` and ``model.heads``.

Uploaded images are decoded here with Pillow only (never unpickled), checked for size, turned
into white-on-black grey and prepared as the data set was (MNIST-style centring for digits,
square padding for Fashion-MNIST) so the model sees what it was trained on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.core.policies import oracle_correct
from engine.core.trace import Trace
from engine.data.images import to_model_input

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 25_000_000  # e.g. 5000 x 5000
MAX_SIDE = 10_000


class ImageInputError(ValueError):
    """An uploaded file is not an image this page can use; the message says why."""


# --- uploads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedImage:
    original: np.ndarray  # uint8 [H, W, 3] or [H, W] as decoded (for display)
    gray: np.ndarray  # uint8 [H, W], white ink on black
    model_input: np.ndarray  # uint8 [28, 28], what the model sees
    format: str
    inverted: bool


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


def _square_resize(gray: np.ndarray, size: int = 28) -> np.ndarray:
    """Pad to a square (background 0) and resize to size x size, anti-aliased."""
    h, w = gray.shape
    side = max(h, w)
    canvas = np.zeros((side, side), dtype=np.float32)
    canvas[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = gray
    img = Image.fromarray(canvas, mode="F").resize((size, size), Image.Resampling.BOX)
    return np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)


def prepare_image(data: bytes, dataset: str, name: str = "upload") -> PreparedImage:
    """Bytes of any image Pillow reads -> the 28x28 uint8 input for a model of ``dataset``.

    Dark-on-light images (a pen drawing, a photo of a garment on white) are inverted to the
    white-on-black of MNIST and Fashion-MNIST, judged by the border pixels.
    """
    from engine.data.drawing import to_mnist

    img, fmt = decode_image(data, name)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    rgb = np.asarray(img.convert("RGB"))
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    border = np.r_[gray[0], gray[-1], gray[:, 0], gray[:, -1]]
    inverted = bool(border.mean() > 127)
    if inverted:
        gray = 255 - gray
    if int(gray.max()) - int(gray.min()) < 8:
        raise ImageInputError(f"{name} is blank (a single flat colour)")
    if dataset in ("mnist", "digits"):
        x = to_mnist(gray)
        if x is None:
            raise ImageInputError(f"{name} is blank")
    else:
        x = _square_resize(gray.astype(np.float32))
    return PreparedImage(rgb, gray, x, fmt, inverted)


# --- attributions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    exit: int
    target: int  # class explained (the prediction at that exit)
    integrated_gradients: np.ndarray  # [28, 28] signed
    ig_delta: float  # convergence delta of the IG approximation (completeness error)
    saliency: np.ndarray  # [28, 28] |d logit / d pixel|


def _exit_forward(model: torch.nn.Module, k: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x
        for stage in model.stages[: k + 1]:
            h = stage(h)
        return model.heads[k](h)

    return forward


def attribute(
    model: torch.nn.Module, image: np.ndarray, k: int, target: int | None = None, steps: int = 64
) -> Attribution:
    """Integrated Gradients (black-image baseline) and Saliency for exit k's logit of target.

    Runs in plain autograd mode (Captum fails under ``torch.inference_mode``). The model is
    shared and never modified: only the input requires gradients.
    """
    from captum.attr import IntegratedGradients, Saliency

    x = to_model_input(np.asarray(image, dtype=np.uint8)[None]).requires_grad_(True)
    baseline = to_model_input(np.zeros((1, 28, 28), dtype=np.uint8))
    forward = _exit_forward(model, k)
    if target is None:
        with torch.no_grad():
            target = int(forward(x).argmax(dim=-1)[0])
    ig, delta = IntegratedGradients(forward).attribute(
        x, baselines=baseline, target=target, n_steps=steps, return_convergence_delta=True
    )
    sal = Saliency(forward).attribute(x, target=target, abs=True)
    return Attribution(
        exit=k,
        target=int(target),
        integrated_gradients=ig[0, 0].detach().numpy().astype(np.float64),
        ig_delta=float(delta.abs().max()),
        saliency=sal[0, 0].detach().numpy().astype(np.float64),
    )


# --- galleries ---------------------------------------------------------------------------------


def difficulty_order(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(easiest, hardest): row indices of labelled samples ranked by the oracle's exit.

    Easiest: the earliest correct exit is early, ties broken by higher confidence there.
    Hardest: never correct (or correct only at the last exit) first, then by lower
    probability of the true label at the last exit.
    """
    lab = np.flatnonzero(trace.label != -1)
    if lab.size == 0:
        return lab, lab
    oracle = oracle_correct(trace, fallback="last")[lab]
    never = ~trace.correct[lab].any(axis=1)
    conf_at_oracle = trace.max_prob[lab, oracle]
    p_true_last = trace.probs[lab, -1, trace.label[lab]]
    easiest = lab[np.lexsort((-conf_at_oracle, never, oracle))]
    hardest = lab[np.lexsort((p_true_last, -oracle, ~never))]
    return easiest, hardest
