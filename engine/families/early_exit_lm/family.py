"""A small character decoder with a shared head at every layer (LayerSkip loss, CALM exits)."""

from __future__ import annotations

import numpy as np

from engine.core.family import Family, FamilyError, LiveRun
from engine.families.early_exit_lm import model as lm


class EarlyExitLM(Family):
    name = "early_exit_lm"
    kind = "lm"
    title = "per-token early exit (character LM)"
    paper = "Schuster 2022 (CALM); Elhoushi 2024 (LayerSkip)"
    setting = "confidence threshold"
    step_name = "layer"
    profile_batch = 64  # sequences decoded together
    about = "Per generated token, stop at the first layer whose confidence passes a threshold."
    not_on_ray = "a language model exits per token, in generation; there are no per-sample results"

    def build(self, config: dict):
        return lm.build(config)

    def results(self, card) -> None:
        return None  # per-token exits: the language page evaluates them from its card

    def build_results(self, card, progress=None):
        raise FamilyError(
            f"{card.model_id}: a language model exits per token, not per sample; its per-layer "
            "metrics are in its card and the language page runs it live"
        )

    def timed(self, card, model, batch: int):
        """A KV-cached decode step per layer count (``timing``): the time axis of its page."""
        from engine.families.early_exit_lm.timing import decode_timed

        return decode_timed(model, batch)

    def live_input(self, card) -> str:
        return "text"

    def default_setting(self, card) -> float:
        return 0.9

    def run_one(self, model, card, x: str, value: float, n: int = 40) -> LiveRun:
        """``n`` characters after prompt ``x``, each leaving at the first layer whose softmax
        confidence reaches ``value``; the layers above a character's exit are not run for it."""
        g = lm.generate(model, x, n, lm.ExitPolicy(measure="max_prob", threshold=float(value)))
        depth = model.config.n_layer
        layers = np.asarray(g.layers_run, dtype=np.float64)
        return LiveRun(
            prediction=-1,  # a generation, not a class
            confidence=float(np.mean(g.prob)) if g.prob else float("nan"),
            cost=float(layers.sum()),
            full_cost=float(depth * len(layers)),
            decision=f"{layers.mean():.2f} of {depth} layers per character on average",
            steps=np.asarray(g.exit_layer, dtype=np.float64),
            ran=layers > 0,
            detail={"text": g.text, "cost_unit": "layer runs"},
        )


FAMILY = EarlyExitLM()
