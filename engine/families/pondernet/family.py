"""PonderNet (Banino et al. 2021) on parity, as a family: per-step halting probability λ_n,
a geometric prior with its KL regulariser, halting by thresholding the cumulative probability."""

from __future__ import annotations

import numpy as np

from engine.core.family import LiveRun, Timed
from engine.core.results import Results
from engine.families.act.family import ParityFamily
from engine.families.pondernet import model as pn
from engine.families.pondernet import records

# how the halting page's chart names the parts of PonderNet's rule (ACT's are the default)
CHART_NAMES = {
    "before": "steps before N (halting probability λ_n)",
    "last": "halting step N: P(N ≤ n) first reaches q",
    "after": "after N: not computed when halting at this q (stored unroll)",
    "line": "q",
    "title": "Halting probability λ_n per ponder step",
}


class PonderNet(ParityFamily):
    name = "pondernet"
    kind = "halt"
    title = "pondering (PonderNet)"
    paper = "Banino et al. 2021, PonderNet"
    setting = "q"
    step_name = "step"
    about = (
        "PonderNet (2021): after each step n a halting unit gives λ_n, the probability of "
        "stopping there if not stopped before, so P(N = n) = λ_n ∏_{j<n}(1 − λ_j). Training "
        "minimises the expected loss over halting steps plus β·KL to a geometric prior; here "
        "the model halts at the first step where P(N ≤ n) reaches q, and answers with that "
        "step's output."
    )
    setting_help = "q: halt at the first step where the cumulative halting probability ≥ q"

    def build(self, config: dict):
        return pn.build(config)

    def timed(self, card, model, batch: int) -> Timed:
        """A real ponder run (halted inputs leave the batch) at each q of the results."""
        x = self.timing_inputs(card, batch)
        q = records.Q_GRID
        return Timed("setting", q, lambda i: pn.infer(model, x, float(q[i])), batch)

    def results(self, card) -> Results:
        rec = records.load_records(card.model_id)
        runs = [records.at_q(rec, q) for q in records.Q_GRID]
        m = rec.max_steps
        lp, beta = (
            card.raw.get("training", {}).get("lambda_p"),
            card.raw.get("training", {}).get("beta"),
        )
        return Results.from_runs(
            self.label(card),
            "q",
            records.Q_GRID,
            rec.sample_id,
            rec.label,
            runs,
            rec.full_flops,
            ("steps",),
            {"difficulty": rec.difficulty, "bits": rec.bits},
            {
                "model_id": card.model_id,
                "family": self.name,
                "dataset": card.dataset,
                "split": "test",
                "cost_unit": "FLOPs",
                "max_steps": m,
                "difficulty": "string length (non-zero entries)",
                "trained_with": "" if lp is None else f"λ_p = {lp:g}, β = {beta:g}",
            },
        )

    def record(self, card, i: int, value: float) -> LiveRun:
        rec = records.load_records(card.model_id)
        r = records.at_q(rec, value)
        p = rec.p[i]
        steps = int(r.steps[i])
        m = rec.max_steps
        return LiveRun(
            prediction=int(r.pred[i]),
            confidence=float(r.probs[i].max()),
            cost=float(r.flops[i]),
            full_cost=rec.full_flops,
            decision=f"halted after {steps} of {m} steps (P(N ≤ {steps}) = {p[:steps].sum():.3f})",
            steps=rec.lam[i],
            ran=np.arange(m) < steps,
            detail={
                "cumulative": np.cumsum(p),
                "halt_at": steps,
                "threshold": float(value),
                "names": CHART_NAMES,
            },
        )

    def run_one(self, model, card, x, value: float) -> LiveRun:
        out = pn.run(model, x, q=value)
        steps = int(out.steps[0])
        m = model.config.max_steps
        return LiveRun(
            prediction=int(out.pred[0]),
            confidence=float(out.probs[0].max()),
            cost=float(out.flops[0]),
            full_cost=float("nan"),
            decision=f"halted after {steps} of {m} steps (P(N ≤ {steps}) = {out.p[0].sum():.3f})",
            steps=out.lam[0],  # NaN after the halting step: never computed
            ran=np.arange(m) < steps,
            detail={
                "cumulative": np.cumsum(out.p[0]),
                "halt_at": steps,
                "threshold": float(value),
                "names": CHART_NAMES,
            },
        )

    def default_setting(self, card) -> float:
        return float(card.config.get("q", 0.5))


FAMILY = PonderNet()
