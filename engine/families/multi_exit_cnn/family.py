"""Multi-exit residual CNN (SDN / BranchyNet): an exit classifier after every stage."""

from __future__ import annotations

from engine.families.common import TraceFamily
from engine.families.multi_exit_cnn import model as multi_exit_cnn


class MultiExitCNN(TraceFamily):
    name = "multi_exit_cnn"
    title = "early exit (CNN)"
    paper = "Teerapittayanon 2016 (BranchyNet); Kaya 2019 (SDN)"
    about = "An exit classifier after every stage; an input leaves at the first confident exit."

    def build(self, config: dict):
        return multi_exit_cnn.build(config)


FAMILY = MultiExitCNN()
