"""Running a bundled model live on one image for the tour (pure: no streamlit here).

The preprocessing is the engine's (``engine.data.drawing.to_mnist`` for drawings, then
``engine.data.images.to_model_input``), every exit's probabilities and FLOPs are
``engine.run.exits``' (the trace builder's), and the stop is decided by the engine's runtime
(``engine.run.runtime.EarlyExitRunner``, which uses the traces' own rule,
``engine.core.policies.stop_mask``), so what the tour shows for a drawing is what the rest of
the app computes for a test image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.core.policies import Policy
from engine.data.images import to_model_input
from engine.run.exits import image_exits
from engine.run.runtime import EarlyExitRunner


@dataclass(frozen=True)
class ExitRun:
    """One image through every exit of a multi-exit model, and where a threshold stops it."""

    probs: np.ndarray  # [K, C] softmax of each exit
    cost: np.ndarray  # [K] cumulative FLOPs to reach exit k (all earlier heads included)
    threshold: float
    exit: int  # first exit whose max probability >= threshold (the last one otherwise)
    answer: int  # the class predicted at that exit

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1).astype(np.float64)

    @property
    def cost_fraction(self) -> float:
        """Compute spent relative to running every exit of the full network."""
        return float(self.cost[self.exit] / self.cost[-1]) if self.cost[-1] > 0 else 1.0


def make_runner(model: torch.nn.Module) -> EarlyExitRunner:
    """The engine's real early-exit runtime for ``model`` on the CPU (its FLOP table included)."""
    return EarlyExitRunner(model, backend="torch", device="cpu")


def run_multi_exit(runner: EarlyExitRunner, img28: np.ndarray, threshold: float) -> ExitRun:
    """Where the engine's runtime stops ``img28`` under max-prob ``threshold``, plus every
    exit's guess (the exits after the stop are computed only to show what they would say)."""
    policy = Policy("max_prob", threshold=float(threshold))
    result = run(runner, img28, policy)
    probs = image_exits(runner.model, img28)
    return ExitRun(
        probs=probs,
        cost=runner.costs.cumulative,
        threshold=float(threshold),
        exit=int(result.exit[0]),
        answer=int(result.pred[0]),
    )


def run(runner: EarlyExitRunner, img28: np.ndarray, policy: Policy):
    """The engine's runtime on one uint8 [28, 28] image (``engine.run.runtime.RuntimeResult``)."""
    return runner.run(to_model_input(np.asarray(img28)[None]), policy)
