"""Adaptive computation time (Graves 2016) on parity strings, as a family."""

from __future__ import annotations

import numpy as np
import torch

from engine.core.family import Family, LiveRun, Timed
from engine.core.results import Results
from engine.families.act import model as act
from engine.families.act import records as halting


def live_act(model, x: np.ndarray, eps: float) -> LiveRun:
    out = act.run_act(model, x, eps=eps)
    steps, rem = int(out["steps"][0]), float(out["remainder"][0])
    m = model.config.max_steps
    return LiveRun(
        prediction=int(out["pred"][0]),
        confidence=float(out["probs"][0].max()),
        cost=float(out["flops"][0]),
        full_cost=float("nan"),
        decision=f"halted after {steps} of {m} steps (remainder R = {rem:.3f})",
        steps=out["h"][0],  # NaN after the halting step: never computed
        ran=np.arange(m) < steps,
        detail={"cumulative": out["cum_halt"][0], "halt_at": steps, "threshold": 1.0 - eps},
    )


class ParityFamily(Family):
    """What the families that read parity strings share (ACT, PonderNet): the live input is a
    typed string of the card's length, the timing inputs strings from the generator."""

    def live_input(self, card) -> str:
        return "bits"

    def parse_live(self, card, text: str) -> np.ndarray:
        return act.parse_bits(text, int(card.config["num_bits"]))

    def timing_inputs(self, card, batch: int) -> torch.Tensor:
        """``batch`` parity strings of the card's length (the generator at seed 0)."""
        x, _, _ = act.parity_data(batch, int(card.config["num_bits"]), seed=0)
        return torch.as_tensor(np.asarray(x, dtype=np.float32))


class ACT(ParityFamily):
    name = "act"
    kind = "halt"
    title = "pondering (ACT)"
    paper = "Graves 2016, adaptive computation time"
    setting = "eps"
    step_name = "step"
    about = (
        "Graves' ACT (2016): a network is applied again and again to the same input; after each "
        "ponder step n a halting unit outputs h^n. It stops at the first step N where the "
        "cumulative halting reaches 1 − ε (or at the maximum), the last step gets the remainder "
        "R = 1 − Σ_{n<N} h^n, and the answer is the mix Σ p^n y^n. Training adds τ·(N + R)."
    )
    setting_help = "ε: halt when the cumulative halting score ≥ 1 − ε"

    def build(self, config: dict):
        return act.build(config)

    def results(self, card) -> Results:
        """ACT over its eps grid, from the stored unroll (any eps, no model run)."""
        rec = halting.load_records(card.model_id)
        runs = [halting.at_eps(rec, e) for e in halting.EPS_GRID]
        images = rec.image_index is not None
        extra = {"difficulty": rec.difficulty} if rec.has_difficulty else {}
        if images:
            extra["image_index"] = rec.image_index
        if rec.bits is not None:
            extra["bits"] = rec.bits
        return Results.from_runs(
            self.label(card),
            "eps",
            halting.EPS_GRID,
            rec.image_index if images else rec.sample_id,  # images: ids shared with other models
            rec.label,
            runs,
            rec.full_flops,
            ("steps", "ponder_cost"),
            extra,
            {
                "model_id": card.model_id,
                "family": self.name,
                "dataset": card.dataset,
                "split": "test",
                "cost_unit": "FLOPs",
                "max_steps": rec.max_steps,
                "difficulty": rec.meta.get("difficulty_label", rec.meta.get("difficulty")),
                "trained_with": "" if rec.meta.get("tau") is None else f"τ = {rec.meta['tau']:g}",
            },
        )

    def record(self, card, i: int, value: float) -> LiveRun:
        """Stored sample ``i`` at eps ``value``, in the same form as a live run."""
        rec = halting.load_records(card.model_id)
        r = halting.at_eps(rec, value)
        cum, steps, rem = halting.cumulative_halting(rec, i, value)
        return LiveRun(
            prediction=int(r.pred[i]),
            confidence=float(r.probs[i].max()),
            cost=float(r.flops[i]),
            full_cost=rec.full_flops,
            decision=f"halted after {steps} of {rec.max_steps} steps (remainder R = {rem:.3f})",
            steps=rec.h[i],
            ran=np.arange(rec.max_steps) < steps,
            detail={"cumulative": cum, "halt_at": steps, "threshold": 1.0 - value},
        )

    def run_one(self, model, card, x, value: float) -> LiveRun:
        return live_act(model, x, value)

    def default_setting(self, card) -> float:
        return float(card.config.get("eps", 0.01))

    def timed(self, card, model, batch: int) -> Timed:
        """A real ponder run (halted inputs leave the batch) at each eps of the results."""
        x = self.timing_inputs(card, batch)
        eps = halting.EPS_GRID
        return Timed("setting", eps, lambda i: act.infer(model, x, float(eps[i])), batch)

    def sort_key(self, card) -> float:
        return card.raw.get("training", {}).get("ponder_cost_weight_tau") or 0.0


FAMILY = ACT()
