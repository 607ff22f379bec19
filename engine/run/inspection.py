"""The sample inspector's engine side: uploads, attributions at one exit, difficulty galleries.

Every exit's probabilities for one input come from ``engine.run.exits.image_exits`` (the trace
builder's code) and the exit from ``engine.core.policies.exit_index`` (the traces' rule). The
model contract is the runtime's (``engine.run.runtime``): ``model.stages`` and ``model.heads``.

Uploaded images are prepared by ``engine.data.photo.prepare_image`` (shared by every page).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.core.policies import oracle_correct
from engine.core.trace import Trace
from engine.data.images import to_model_input

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
