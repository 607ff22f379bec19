"""SkipNet (Wang 2018): a gate per residual block decides, per input, whether it runs."""

from __future__ import annotations

import numpy as np

from engine.core.family import Family, LiveRun, Timed
from engine.core.results import Results
from engine.data import images
from engine.data.images import to_model_input
from engine.families.common import tile
from engine.families.skipnet import model as skipnet
from engine.families.skipnet import records as skipping


class SkipNet(Family):
    name = "skipnet"
    kind = "skip"
    title = "skip gates (SkipNet)"
    paper = "Wang et al. 2018, SkipNet"
    setting = "gate threshold"
    step_name = "block"
    about = "A gate per residual block decides, per input, whether the block runs."
    setting_help = "a block runs when its gate's execute probability ≥ this"

    def build(self, config: dict):
        return skipnet.build(config)

    def results(self, card) -> Results:
        rec = skipping.load_records(card.model_id)
        full = float(rec.meta.get("full_flops", rec.flops.max()))
        return Results(
            self.label(card),
            "gate threshold",
            rec.thresholds,
            rec.sample_id,
            rec.label,
            rec.flops,
            np.full(len(rec.label), full),
            rec.correct,
            rec.pred,
            None,
            {"blocks run": rec.executed.sum(axis=2)},
            {},
            {
                "model_id": card.model_id,
                "family": self.name,
                "dataset": card.dataset,
                "split": rec.meta.get("split", "test"),
                "cost_unit": "FLOPs",
            },
        )

    def default_setting(self, card) -> float:
        return skipping.DEFAULT_THRESHOLD

    def timed(self, card, model, batch: int) -> Timed:
        """A real skipping run (skipped blocks not computed) at each gate threshold."""
        x = tile(to_model_input(images.load(card.dataset, "test").images[:batch]), batch)
        t = skipping.THRESHOLDS
        return Timed("setting", t, lambda i: skipnet.infer(model, x, float(t[i])), batch)

    def live_input(self, card) -> str:
        return "image"

    def run_one(self, model, card, x: np.ndarray, value: float) -> LiveRun:
        """x: the prepared uint8 [28, 28] image; a block runs when its gate score >= value."""
        rec = skipnet.run_skipnet(model, to_model_input(x[None]), value)
        ran = rec["executed"][0].astype(bool)
        return LiveRun(
            prediction=int(rec["pred"][0]),
            confidence=float(rec["probs"][0].max()),
            cost=float(rec["flops"][0]),
            full_cost=skipnet.full_flops(model),
            decision=f"ran {int(ran.sum())} of {ran.size} blocks",
            steps=rec["gate"][0],
            ran=ran,
        )


FAMILY = SkipNet()
