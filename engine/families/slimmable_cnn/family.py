"""Slimmable CNN (width-adaptive, DynaBERT's width axis): one set of weights at several widths;
an input runs the narrowest width first and a wider one only when the narrow one is unsure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch import nn

from engine.core.family import LiveRun
from engine.core.trace import Trace
from engine.families.common import TraceFamily
from engine.families.slimmable_cnn import model as slimmable_cnn
from engine.families.slimmable_cnn import records
from engine.registry import ModelCard


class SlimmableCNN(TraceFamily):
    name = "slimmable_cnn"
    kind = "cascade"
    title = "width cascade (slimmable CNN)"
    paper = "Yu 2019 (Slimmable Networks); Yu & Huang 2019 (sandwich rule); Hou 2020 (DynaBERT)"
    step_name = "width"
    about = (
        "One network that runs at 0.25, 0.5, 0.75 or the full width (the first channels of "
        "every layer, one batch norm per width). An input runs the narrowest width and moves "
        "to the next wider one only while the prediction's confidence is below the threshold; "
        "the wider networks never run for the inputs that stopped."
    )
    setting_help = "max-probability a width must reach for the input to stop there"

    def build(self, config: dict):
        return slimmable_cnn.build(config)

    def trace(self, card: ModelCard, split: str = "test", dataset: str | None = None) -> Trace:
        """The width cascade on ``split``; split ``width_depth``: the width × depth trace of the
        test split (``records.width_depth_trace``)."""
        if split == records.WIDTH_DEPTH:
            model = self.load(card)
            return records.width_depth_trace(model, card.model_id, dataset or card.dataset)
        return super().trace(card, split, dataset)

    def run_one(self, model: nn.Module, card: ModelCard, x: np.ndarray, value: float) -> LiveRun:
        """The early-exit run of ``TraceFamily`` (the real width cascade: the widths above the
        one it stops at are not run), told in widths."""
        run = super().run_one(model, card, x, value)
        k, n = run.detail["exit"], model.num_widths
        mult = model.config.width_mults[k]
        return replace(
            run,
            decision=f"stopped at width {mult:g} ({k + 1} of {n} widths run)",
            detail={"exit": k, "width_mult": mult},
        )


FAMILY = SlimmableCNN()
