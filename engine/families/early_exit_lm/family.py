"""A small character decoder with a shared head at every layer (LayerSkip loss, CALM exits)."""

from __future__ import annotations

from engine.core.family import Family, FamilyError
from engine.families.early_exit_lm import model as lm


class EarlyExitLM(Family):
    name = "early_exit_lm"
    kind = "lm"
    title = "per-token early exit (character LM)"
    paper = "Schuster 2022 (CALM); Elhoushi 2024 (LayerSkip)"
    setting = "confidence threshold"
    step_name = "layer"
    about = "Per generated token, stop at the first layer whose confidence passes a threshold."

    def build(self, config: dict):
        return lm.build(config)

    def results(self, card):
        return None  # per-token exits: the language page evaluates them from its card

    def build_results(self, card, force: bool = False, **_):
        raise FamilyError(
            f"{card.model_id}: a language model exits per token, not per sample; its per-layer "
            "metrics are in its card and the language page runs it live"
        )

    def live_input(self, card) -> str:
        return "text"


FAMILY = EarlyExitLM()
