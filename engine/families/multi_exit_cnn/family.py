"""Multi-exit residual CNN (SDN / BranchyNet): an exit classifier after every stage."""

from __future__ import annotations

from engine.families.common import TraceFamily
from engine.families.multi_exit_cnn import model as multi_exit_cnn
from engine.run.trace_build import build_trace_for_card


class MultiExitCNN(TraceFamily):
    name = "multi_exit_cnn"
    title = "early exit (CNN)"
    paper = "Teerapittayanon 2016 (BranchyNet); Kaya 2019 (SDN)"
    about = "An exit classifier after every stage; an input leaves at the first confident exit."

    def build(self, config: dict):
        return multi_exit_cnn.build(config)

    def trace(self, card, split: str = "test"):
        return build_trace_for_card(card.model_id, split)

    def trace_on(self, card, split: str, dataset: str):
        return build_trace_for_card(card.model_id, split, dataset)

    def live_input(self, card) -> str:
        return "image"


FAMILY = MultiExitCNN()
