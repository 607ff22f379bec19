"""Do dynamic methods agree on which inputs are hard?

Each method (early exit, cascade, layer skipping, dynamic-k MoE, halting) is summarised as a
``Results`` (engine.core.results): the per-sample compute it spends, as a fraction of its own full
model, at every setting of its knob. Matching all methods to one mean budget makes their per-sample compute
comparable; rank correlations (Spearman, Kendall's tau-b, both tie-aware because early-exit costs
take only K values), top-k overlaps and agreement with the oracle exit then answer the question.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from scipy import stats

from engine.core.policies import NeverCorrect, oracle_correct
from engine.core.results import Results
from engine.core.trace import Trace


def oracle_fraction(trace: Trace, never_correct: NeverCorrect = "last") -> np.ndarray:
    """[N] cost fraction of the oracle exit.

    By default never-correct samples count as needing everything ("last"): here the oracle is a
    difficulty ranking, and a sample no exit gets right is the hardest there is.
    """
    exits = oracle_correct(trace, fallback=never_correct)
    rows = np.arange(trace.num_samples)
    return trace.cost[rows, exits] / trace.cost[:, -1]


def align(sweeps: list[Results]) -> list[Results]:
    """Restrict every method's results to the samples all of them share, in one common order."""
    common = sweeps[0].sample_id
    for s in sweeps[1:]:
        common = np.intersect1d(common, s.sample_id)
    out = []
    for s in sweeps:
        pos = {v: i for i, v in enumerate(s.sample_id.tolist())}
        out.append(s.take(np.array([pos[v] for v in common.tolist()], dtype=np.int64)))
    return out


@dataclass(frozen=True)
class Matched:
    name: str
    index: int  # the chosen knob setting
    param: float
    mean_fraction: float
    accuracy: float
    compute: np.ndarray  # [N] per-sample cost fraction at that setting
    correct: np.ndarray  # [N]
    mean_cost: float = float("nan")  # in the results' cost unit (FLOPs or ms per sample)


def match_budget(sweep: Results, target: float, absolute: bool = False) -> Matched:
    """The setting whose mean compute fraction is closest to ``target`` (ties: more accurate);
    ``absolute``: whose mean cost is (a time budget in ms, the same for every method)."""
    gap = np.abs((sweep.mean_cost if absolute else sweep.mean_fraction) - target)
    best = np.flatnonzero(gap <= gap.min() + 1e-12)
    i = int(best[np.argmax(sweep.accuracy[best])])
    return Matched(
        sweep.name,
        i,
        float(sweep.settings[i]),
        float(sweep.mean_fraction[i]),
        float(sweep.accuracy[i]),
        sweep.cost_fraction[i],
        sweep.correct[i],
        float(sweep.mean_cost[i]),
    )


def rank_correlations(compute: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Spearman and Kendall tau-b matrices between every pair of per-sample compute vectors.

    A constant vector (a method that spends the same on everything) has no ranking: NaN.
    """
    names = list(compute)
    m = len(names)
    rho = np.eye(m)
    tau = np.eye(m)
    for a in range(m):
        for b in range(a + 1, m):
            x, y = compute[names[a]], compute[names[b]]
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                rho[a, b] = rho[b, a] = tau[a, b] = tau[b, a] = np.nan
                continue
            rho[a, b] = rho[b, a] = stats.spearmanr(x, y).statistic
            tau[a, b] = tau[b, a] = stats.kendalltau(x, y).statistic
    for a in range(m):
        if np.ptp(compute[names[a]]) == 0:
            rho[a, a] = tau[a, a] = np.nan
    return names, rho, tau


def top_k_overlap(
    x: np.ndarray, y: np.ndarray, fraction: float = 0.1, hardest: bool = True
) -> float:
    """Overlap (|A ∩ B| / k) of the k most (or least) compute-hungry samples of two methods.

    Ties at the cut are broken by sample order, so heavily tied methods are compared fairly only
    on the expected overlap; the chance level is ``fraction``.
    """
    k = max(1, int(round(fraction * len(x))))
    sign = -1 if hardest else 1
    a = set(np.argsort(sign * x, kind="stable")[:k].tolist())
    b = set(np.argsort(sign * y, kind="stable")[:k].tolist())
    return len(a & b) / k


def per_sample_table(
    matched: list[Matched], sample_id: np.ndarray, label: np.ndarray
) -> pl.DataFrame:
    """One row per sample: every method's compute fraction and correctness at the matched budget."""
    cols = {"sample_id": sample_id, "label": label}
    for m in matched:
        cols[f"{m.name}.compute"] = m.compute
        cols[f"{m.name}.correct"] = m.correct
    return pl.DataFrame(cols)


# --- activation sparsity ---------------------------------------------------------------------


class _ReluRecorder(torch.overrides.TorchFunctionMode):
    """Sees every ReLU as executed (functional or nn.ReLU) and records, per sample, the fraction
    of its outputs that are exactly zero, in execution order."""

    FUNCS = {torch.relu, torch.nn.functional.relu, torch.Tensor.relu}

    def __init__(self):
        super().__init__()
        self.fractions: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FUNCS and isinstance(out, torch.Tensor) and out.ndim >= 2:
            self.fractions.append((out == 0).flatten(1).float().mean(dim=1))
        return out


def relu_zero_fraction(fn, x: torch.Tensor, batch_size: int = 512) -> tuple[list[str], np.ndarray]:
    """Per input and per ReLU call, the fraction of activations that are exactly zero.

    ``fn`` is a model (or any callable) taking a batch; ReLUs are caught at the torch-function
    level, so functional ``torch.relu`` inside blocks counts as well as ``nn.ReLU`` modules.
    Returns names in execution order and an [N, L] array.
    """
    out: list[np.ndarray] = []
    for start in range(0, len(x), batch_size):
        rec = _ReluRecorder()
        with torch.no_grad(), rec:
            fn(x[start : start + batch_size])
        if not rec.fractions:
            raise ValueError("the model ran no ReLU")
        out.append(torch.stack(rec.fractions, dim=1).numpy())
    if len({o.shape[1] for o in out}) != 1:
        raise ValueError("the number of ReLU calls changed between batches (dynamic model?)")
    z = np.concatenate(out)
    return [f"ReLU {i + 1}" for i in range(z.shape[1])], z
