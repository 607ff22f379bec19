"""The sample inspector's engine side: uploads, attributions at one exit, difficulty galleries.

Every exit's probabilities for one input come from ``engine.run.exits.image_exits`` (the trace
builder's code) and the exit from ``engine.core.policies.exit_index`` (the traces' rule). The
model contract is the runtime's (``engine.run.runtime``): ``model.stages`` and ``model.heads``.

Uploaded images are prepared by ``engine.data.photo.prepare_image`` (shared by every page).
Attributions work on a model input of any shape (the user's own models,
``engine.families.torch_protocol``) and are drawn as an image where the input is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.core.policies import oracle_correct
from engine.core.trace import Trace
from engine.data.images import to_model_input

# --- attributions ----------------------------------------------------------------------------------


def embedding_attributions(forward, embedding, ids, mask, pad_id: int, target, steps: int):
    """Layer Integrated Gradients of ``forward(ids, mask)``'s logits on a token embedding layer,
    per token (summed over the embedding), and (target class, convergence delta). The baseline
    keeps the first and last token (the special ones) and pads every other; gradients on, as
    Captum cannot differentiate under inference_mode. Shared by every text classifier's exits."""
    from captum.attr import LayerIntegratedGradients

    with torch.no_grad():
        logits = forward(ids, mask)
    if target is None:
        target = int(logits.argmax(-1))
    baseline = torch.full_like(ids, pad_id)
    baseline[0, 0], baseline[0, -1] = ids[0, 0], ids[0, -1]
    lig = LayerIntegratedGradients(forward, embedding)
    with torch.enable_grad():
        attr, delta = lig.attribute(
            ids,
            baselines=baseline,
            additional_forward_args=(mask,),
            target=target,
            n_steps=steps,
            return_convergence_delta=True,
        )
    scores = attr.sum(-1)[0].detach().numpy().astype(np.float64)
    return scores, target, float(delta.abs().max())


@dataclass(frozen=True)
class Attribution:
    exit: int
    target: int  # class explained (the prediction at that exit)
    integrated_gradients: np.ndarray  # signed, drawable: [H, W] (``attribution_map``)
    ig_delta: float  # convergence delta of the IG approximation (completeness error)
    saliency: np.ndarray  # |d logit / d input|, drawable like integrated_gradients


def _exit_forward(model: torch.nn.Module, k: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x
        for stage in model.stages[: k + 1]:
            h = stage(h)
        return model.heads[k](h)

    return forward


def image_like(shape: tuple[int, ...]) -> bool:
    """Whether one input of this shape can be drawn: [H, W], or [C, H, W] with 1, 3 or 4
    channels (channels first, as torch's convolutions take them)."""
    return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3, 4))


def attribution_map(a: np.ndarray, signed: bool) -> np.ndarray:
    """One input's attribution [*input_shape] as a 2-D map: over an image's channels the sum
    (signed IG: the channels' contributions add up) or the maximum (saliency, as Simonyan et al.
    draw it); any other shape flattened to one row of features."""
    a = np.asarray(a, dtype=np.float64)
    if image_like(a.shape):
        if a.ndim == 2:
            return a
        return a.sum(axis=0) if signed else a.max(axis=0)
    return a.reshape(1, -1)


def picture(x: np.ndarray) -> np.ndarray | None:
    """A float model input [C, H, W] or [H, W] as a uint8 picture ([H, W] or [H, W, C]),
    stretched to its own min..max (the user's normalisation is not known); None when the shape
    is not image-like."""
    x = np.asarray(x, dtype=np.float64)
    if not image_like(x.shape):
        return None
    lo, hi = float(x.min()), float(x.max())
    u = np.zeros(x.shape, np.uint8) if hi <= lo else np.round((x - lo) / (hi - lo) * 255)
    u = u.astype(np.uint8)
    if u.ndim == 3:
        u = u[0] if u.shape[0] == 1 else np.moveaxis(u, 0, -1)
    return u


def enlarged(pic: np.ndarray, size: int = 168) -> np.ndarray:
    """A small picture ([H, W] or [H, W, C]) repeated pixel by pixel to about ``size`` wide."""
    f = max(1, size // max(pic.shape[:2]))
    return np.repeat(np.repeat(pic, f, axis=0), f, axis=1)


def black_image() -> np.ndarray:
    """The bundled image models' baseline: a black 28×28 image as the model sees it."""
    return to_model_input(np.zeros((1, 28, 28), dtype=np.uint8))[0].numpy()


def attribute(
    model: torch.nn.Module,
    x: np.ndarray,
    k: int,
    target: int | None = None,
    steps: int = 64,
    baseline: np.ndarray | None = None,
) -> Attribution:
    """Integrated Gradients and Saliency for exit k's logit of target, for one model input
    ``x`` [*input_shape] of any shape (float, as the model takes it). The IG baseline is
    ``baseline`` (default zeros; the bundled image models pass ``black_image()``).

    Runs in plain autograd mode (Captum fails under ``torch.inference_mode``). The model is
    shared and never modified: only the input requires gradients.
    """
    from captum.attr import IntegratedGradients, Saliency

    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))[None].requires_grad_(True)
    base = torch.zeros_like(xt) if baseline is None else torch.as_tensor(baseline)[None].float()
    forward = _exit_forward(model, k)
    if target is None:
        with torch.no_grad():
            target = int(forward(xt).argmax(dim=-1)[0])
    ig, delta = IntegratedGradients(forward).attribute(
        xt, baselines=base, target=target, n_steps=steps, return_convergence_delta=True
    )
    sal = Saliency(forward).attribute(xt, target=target, abs=True)
    return Attribution(
        exit=k,
        target=int(target),
        integrated_gradients=attribution_map(ig[0].detach().numpy(), signed=True),
        ig_delta=float(delta.abs().max()),
        saliency=attribution_map(sal[0].detach().numpy(), signed=False),
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
