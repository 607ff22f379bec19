"""What the families whose results are a multi-exit ``Trace`` (early exit, cascades) share.

Their per-sample results are the trace itself: every exit's probabilities, from which the
tuning page evaluates any exit policy; ``results`` views the trace over its max-probability
threshold for the pages that compare families.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.core.family import Family, FamilyError, LiveRun
from engine.core.policies import Policy
from engine.core.results import Results, from_trace
from engine.core.trace import Trace
from engine.data.images import to_model_input
from engine.registry import ModelCard
from engine.run.runtime import EarlyExitRunner
from engine.trace_store import cached_trace_file, load_trace


class TraceFamily(Family):
    """A family whose results are a multi-exit trace."""

    kind = "exit"
    setting = "max_prob threshold"
    traces = True  # the tuning page and the inspector read its trace

    def trace(self, card: ModelCard, split: str = "test") -> Trace:
        """Run the model over its data split (the data set it was trained on)."""
        raise NotImplementedError

    def results(self, card: ModelCard) -> Results:
        return from_trace(load_trace(card.model_id, build_if_missing=False), self.label(card))

    def build_results(
        self, card: ModelCard, force: bool = False, split: str = "test", dataset: str | None = None
    ) -> Path:
        if dataset is not None and dataset != card.dataset and not force:
            raise FamilyError(
                f"{card.model_id} was trained on {card.dataset}; its exits on {dataset} would "
                "measure a model on data it never saw (add --force to build it anyway)"
            )
        trace = self.trace(card, split) if dataset in (None, card.dataset) else None
        if trace is None:
            trace = self.trace_on(card, split, dataset)
        path = cached_trace_file(card.model_id, split)
        trace.write_parquet(path)
        return path

    def trace_on(self, card: ModelCard, split: str, dataset: str) -> Trace:
        raise FamilyError(f"{card.model_id}: this family reads one data set only")

    def default_setting(self, card: ModelCard) -> float:
        return 0.9

    def run_one(self, model, card: ModelCard, x: np.ndarray, value: float) -> LiveRun:
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
