"""A multi-exit model's per-exit costs and outputs, computed one way for every caller.

The trace builder, the real runtime, the sample inspector and the tour all need "what does
each exit cost" and "what does each exit say"; they take them from here, so the FLOPs in a
trace, the runtime's FLOP table and the tour's cost bar are the same numbers, and the
inspector's probabilities are the trace's.

Model contract: ``stages`` and ``heads`` (``nn.ModuleList`` of equal, non-zero length K);
stage k maps h_{k-1} to h_k (h_{-1} = the input), head k maps h_k to the logits of exit k.
The input of one sample is 1×28×28 (the bundled image models) unless the model says otherwise
with an ``input_shape`` attribute (the user's own models, ``engine.families.torch_protocol``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.core.costs import count_flops
from engine.core.progress import Progress, track
from engine.data.images import to_model_input

IMAGE_SHAPE = (1, 28, 28)


def model_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The shape of one sample's input: the model's ``input_shape`` if it has one, else 1×28×28."""
    return tuple(int(d) for d in getattr(model, "input_shape", IMAGE_SHAPE))


def check_contract(model: nn.Module) -> int:
    """The number of exits K; TypeError when the model lacks the multi-exit contract."""
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(heads, nn.ModuleList):
        raise TypeError("a multi-exit model needs `stages` and `heads` nn.ModuleLists")
    if len(stages) != len(heads) or len(stages) == 0:
        raise TypeError("`stages` and `heads` must have the same, non-zero length")
    return len(stages)


@dataclass(frozen=True)
class ExitCosts:
    """FLOPs per sample of each stage and head, counted by torch (``engine.core.costs.count_flops``)."""

    stage: np.ndarray  # [K] float64 (whole numbers)
    head: np.ndarray  # [K] float64 (whole numbers)

    @property
    def cumulative(self) -> np.ndarray:
        """[K] FLOPs of reaching exit k: sum over j <= k of stage_j + head_j (the trace's cost)."""
        return np.cumsum(self.stage + self.head)

    @property
    def full(self) -> float:
        """FLOPs of running the whole model (every stage and head)."""
        return float(self.cumulative[-1])


@torch.no_grad()
def exit_costs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ExitCosts:
    """Count each stage's and head's FLOPs on one (zero) input, on the CPU (default shape:
    ``model_input_shape``)."""
    check_contract(model)
    stages, heads = [], []
    h = torch.zeros((1, *(input_shape or model_input_shape(model))))
    for stage, head in zip(model.stages, model.heads, strict=True):
        f, h = count_flops(stage, h)
        stages.append(f)
        heads.append(count_flops(head, h)[0])
    return ExitCosts(np.asarray(stages, dtype=np.float64), np.asarray(heads, dtype=np.float64))


@torch.no_grad()
def run_exits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, K, C] float32, latency_ms [N, K] cumulative, per sample) of ``model`` on x.

    Probabilities are the float32 softmax of each head's logits. Latency is measured per batch,
    piece by piece (stage k, then head k), divided by the batch size: the amortised per-sample
    wall-clock of reaching exit k at this batch size. ``progress`` hears of every batch.
    """
    k = check_contract(model)
    model.eval()
    n = len(x)
    probs, lat = None, np.zeros((n, k), dtype=np.float64)
    for i in track(range(0, n, batch_size), "trace", progress):
        h = x[i : i + batch_size]
        b = len(h)
        spent = 0.0
        for e, (stage, head) in enumerate(zip(model.stages, model.heads, strict=True)):
            t0 = time.perf_counter()
            h = stage(h)
            z = head(h)
            spent += time.perf_counter() - t0
            p = torch.softmax(z.float(), dim=1).numpy()
            if probs is None:
                probs = np.zeros((n, k, p.shape[1]), dtype=np.float32)
            probs[i : i + b, e] = p
            lat[i : i + b, e] = spent * 1e3 / b
    return probs, lat


def input_exits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """One model input (float [*input_shape]) -> float32 [K, C]: every exit's probabilities
    (``run_exits``)."""
    return run_exits(model, torch.as_tensor(np.asarray(x, dtype=np.float32))[None])[0][0]


def image_exits(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """uint8 [28, 28] -> float32 [K, C]: every exit's probabilities for one image (``run_exits``)."""
    x = to_model_input(np.asarray(image, dtype=np.uint8)[None])
    return run_exits(model, x)[0][0]
