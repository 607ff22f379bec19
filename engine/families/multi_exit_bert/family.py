"""all-MiniLM-L6-v2 (frozen, from its package) with an exit head after every layer (DeeBERT)."""

from __future__ import annotations

from engine.families.common import TraceFamily
from engine.families.multi_exit_bert import model as meb
from engine.families.multi_exit_bert.train import trace_for


class MultiExitBert(TraceFamily):
    name = "multi_exit_bert"
    title = "early exit (MiniLM)"
    paper = "Xin 2020 (DeeBERT)"
    about = "A frozen pretrained encoder with a classifier after every layer."

    def build(self, config: dict):
        return meb.build(config)

    def trace(self, card, split: str = "test"):
        return trace_for(card.model_id, split)

    def live_input(self, card) -> str:
        return "text"


FAMILY = MultiExitBert()
