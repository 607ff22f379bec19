"""One architecture trained three ways on Fashion-MNIST, compared on one accuracy–cost chart.

The same 4-stage residual CNN (``engine.families.multi_exit_cnn``), same data, seed and budget:

* ``fashion_multi_exit_cnn``: joint training of backbone and exits (SDN / BranchyNet), exits
  chosen by max-probability thresholds;
* ``fashion_multi_exit_cnn_sd``: the same, with FastBERT's self-distillation of the early exits
  from the last one (``--distill``), max-probability thresholds;
* ``fashion_multi_exit_cnn_jei``: the first model's frozen backbone with new heads and gates
  trained jointly (JEI-DNN, ``--mode jei``), exits chosen by its gates.

Each curve is the policy's whole threshold sweep on the bundled test trace, with each model's
oracle (earliest correct exit) beside it; ``within_budget`` is the table under the chart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core import tradeoff
from engine.core.trace import Trace

VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("fashion_multi_exit_cnn", "joint (SDN), max-prob", "max_prob"),
    ("fashion_multi_exit_cnn_sd", "self-distilled (FastBERT), max-prob", "max_prob"),
    ("fashion_multi_exit_cnn_jei", "JEI-DNN joint gates", "gate"),
)
BUDGETS = (0.3, 0.4, 0.5, 0.6)


def is_variant(model_id: str) -> bool:
    return any(model_id == m for m, _, _ in VARIANTS)


@dataclass(frozen=True)
class VariantCurve:
    """One training variant's threshold sweep (thinned to its Pareto front) and its oracle."""

    model_id: str
    label: str
    kind: str
    cost_fraction: np.ndarray  # [M] Pareto-front points, cheapest first
    accuracy: np.ndarray  # [M]
    oracle_accuracy: float
    oracle_cost_fraction: float
    last_accuracy: float
    within_budget: dict[str, float | None]  # best accuracy within each budget fraction


def variant_curve(model_id: str, label: str, kind: str, trace: Trace) -> VariantCurve:
    c = tradeoff.curve(trace, kind)
    full = float(trace.cost[:, -1].mean())
    front = tradeoff.pareto_front(c.mean_cost, c.accuracy)
    oracle = tradeoff.oracle_stats(trace)
    within = {}
    for b in BUDGETS:
        i = tradeoff.best_within_budget(c, b * full)
        within[f"{b:g}"] = None if i is None else float(c.accuracy[i])
    return VariantCurve(
        model_id=model_id,
        label=label,
        kind=kind,
        cost_fraction=c.mean_cost[front] / full,
        accuracy=c.accuracy[front],
        oracle_accuracy=oracle.accuracy,
        oracle_cost_fraction=oracle.cost_fraction,
        last_accuracy=tradeoff.last_exit_stats(trace).accuracy,
        within_budget=within,
    )


def variant_curves() -> list[VariantCurve]:
    """The variants whose bundled test trace is present (the others are left out)."""
    from engine.trace_store import load_trace

    out = []
    for model_id, label, kind in VARIANTS:
        try:
            trace = load_trace(model_id, "test", build_if_missing=False)
        except FileNotFoundError:
            continue
        if kind == "gate" and trace.gate is None:
            continue
        out.append(variant_curve(model_id, label, kind, trace))
    return out
