"""What the families whose results are a multi-exit ``Trace`` (early exit, cascades) share.

Their per-sample results are the trace itself: every exit's probabilities, from which the
tuning page evaluates any exit policy; ``results`` views the trace over its max-probability
threshold for the pages that compare families.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.core.family import Family, FamilyError, LiveRun, Timed
from engine.core.policies import Policy
from engine.core.progress import Progress
from engine.core.results import Results, from_trace
from engine.core.trace import Trace
from engine.data import images
from engine.data.images import to_model_input
from engine.registry import ModelCard
from engine.run.runtime import EarlyExitRunner
from engine.run.trace_build import TraceInputs, build_trace_for_card, trace_inputs_for_card
from engine.trace_store import cached_trace_file, load_trace


class TraceFamily(Family):
    """A family whose results are a multi-exit trace; by default an image model with the
    multi-exit contract (``stages`` and ``heads``), traced by ``engine.run.trace_build``."""

    kind = "exit"
    setting = "max_prob threshold"
    traces = True  # the tuning page and the inspector read its trace
    not_on_ray = None

    def trace(
        self,
        card: ModelCard,
        split: str = "test",
        dataset: str | None = None,
        progress: Progress | None = None,
    ) -> Trace:
        """Run the model over ``split`` of ``dataset`` (default: the data set it was trained on)."""
        return build_trace_for_card(card.model_id, split, dataset, progress=progress)

    def checked_trace(
        self,
        card: ModelCard,
        split: str = "test",
        dataset: str | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ) -> Trace:
        """``trace``, refusing a data set the model was not trained on unless ``force``."""
        if dataset not in (None, card.dataset) and not force:
            raise FamilyError(
                f"{card.model_id} was trained on {card.dataset}; its exits on {dataset} would "
                "measure a model on data it never saw (add --force to build it anyway)"
            )
        return self.trace(card, split, dataset, progress=progress)

    def trace_inputs(
        self, card: ModelCard, split: str = "test", dataset: str | None = None
    ) -> TraceInputs:
        """The inputs ``trace`` gives ``run_exits``; refused for a family that builds its trace
        another way and has not said how to shard it."""
        own_trace = type(self).trace is not TraceFamily.trace
        if self.not_on_ray or (own_trace and type(self).trace_inputs is TraceFamily.trace_inputs):
            reason = self.not_on_ray or "it builds its trace its own way"
            raise FamilyError(f"{card.model_id} cannot be built on Ray: {reason}")
        return trace_inputs_for_card(card.model_id, split, dataset)

    def results(self, card: ModelCard) -> Results:
        return from_trace(load_trace(card.model_id, build_if_missing=False), self.label(card))

    def build_results(self, card: ModelCard, progress: Progress | None = None) -> Path:
        """The test trace, written where ``load_trace`` finds it."""
        path = cached_trace_file(card.model_id, "test")
        self.trace(card, progress=progress).write_parquet(path)
        return path

    def live_input(self, card: ModelCard) -> str:
        return "image"

    def timing_inputs(self, card: ModelCard, batch: int) -> torch.Tensor:
        """``batch`` test inputs of the model's data set, prepared for it."""
        return tile(to_model_input(images.load(card.dataset, "test").images[:batch]), batch)

    def timed(self, card: ModelCard, model: nn.Module, batch: int) -> Timed:
        """Point k: stages and heads 0..k on one batch (the work of deciding at exit k)."""
        x = self.timing_inputs(card, batch)
        pairs = list(zip(model.stages, model.heads, strict=True))

        @torch.no_grad()
        def run(k: int):
            h = x
            for stage, head in pairs[: k + 1]:
                h = stage(h)
                z = head(h)
            return z

        return Timed("exit", np.arange(len(pairs), dtype=np.float64), run, batch)

    def default_setting(self, card: ModelCard) -> float:
        return 0.9

    def run_one(self, model: nn.Module, card: ModelCard, x: np.ndarray, value: float) -> LiveRun:
        """One prepared uint8 [28, 28] image through the real early-exit runtime at max-prob
        threshold ``value`` (the stages after the exit are not run)."""
        policy = Policy("max_prob", threshold=float(value))
        runner = EarlyExitRunner(model, backend="torch", device="cpu")
        out = runner.run(to_model_input(np.asarray(x, dtype=np.uint8)[None]), policy)
        k, n = int(out.exit[0]), len(model.stages)
        return LiveRun(
            prediction=int(out.pred[0]),
            confidence=float(out.probs[0].max()),
            cost=float(out.flops[0]),
            full_cost=float(runner.costs.cumulative[-1]),
            decision=f"left at exit {k + 1} of {n}",
            steps=np.arange(n) == k,
            ran=np.arange(n) <= k,
            probs=None,
            detail={"exit": k},
        )


def tile(x, batch: int):
    """The first ``batch`` rows of ``x``, repeated when it has fewer."""
    reps = -(-batch // max(1, len(x)))
    return (x if reps == 1 else torch.cat([x] * reps))[:batch]
