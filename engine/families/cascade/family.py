"""A cascade of a small and a large CNN: the large one runs only when the small is unsure."""

from __future__ import annotations

from engine.families.cascade import model as cascade
from engine.families.common import TraceFamily
from engine.run.trace_build import build_trace_for_card


class Cascade(TraceFamily):
    name = "cascade"
    kind = "cascade"
    title = "cascade"
    paper = "Viola–Jones style model cascades"
    about = "A sequence of ever larger models; an input stops at the first confident one."

    def build(self, config: dict):
        return cascade.build(config)

    def trace(self, card, split: str = "test"):
        return build_trace_for_card(card.model_id, split)

    def trace_on(self, card, split: str, dataset: str):
        return build_trace_for_card(card.model_id, split, dataset)

    def live_input(self, card) -> str:
        return "image"


FAMILY = Cascade()
