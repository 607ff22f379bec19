"""A cascade of a small and a large CNN: the large one runs only when the small is unsure."""

from __future__ import annotations

from engine.families.cascade import model as cascade
from engine.families.common import TraceFamily


class Cascade(TraceFamily):
    name = "cascade"
    kind = "cascade"
    title = "cascade"
    paper = "Viola–Jones style model cascades"
    about = "A sequence of ever larger models; an input stops at the first confident one."

    def build(self, config: dict):
        return cascade.build(config)


FAMILY = Cascade()
