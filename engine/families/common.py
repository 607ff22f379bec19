"""What the families whose results are a multi-exit ``Trace`` (early exit, cascades) share.

Their per-sample results are the trace itself: every exit's probabilities, from which the
tuning page evaluates any exit policy; ``results`` views the trace over its max-probability
threshold for the pages that compare families.
"""

from __future__ import annotations

from pathlib import Path

from engine.core.family import Family, FamilyError
from engine.core.results import Results, from_trace
from engine.core.trace import Trace
from engine.registry import ModelCard
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
