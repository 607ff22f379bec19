"""Accuracy–compute trade-off: statistics of one policy, whole curves, Pareto fronts, solvers.

``curve`` computes accuracy and mean cost at *every distinct threshold* in one sort-based pass:
for a score-threshold policy ("exit at the first exit whose score >= t") a sample can only leave
at a *record* exit, one whose score beats every earlier exit's. Lowering t past a record's score
moves the sample from the next record (or the last-exit fallback) to that record, so each record
is one event with a change in cost and correctness; sorting the events by score and taking
cumulative sums gives the whole curve, with no loop over thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.policies import (
    SCORE_KINDS,
    NeverCorrect,
    Policy,
    PolicyError,
    exit_index,
    oracle_correct,
    score,
)
from engine.core.trace import Trace, pick

# Slack of the solvers' constraints: absolute on accuracy, relative on a cost budget. Accuracies
# and mean costs are sums divided by counts, so a target typed as the same number can miss by
# rounding; tests import this so that they check exactly what the solvers allow.
TOL = 1e-12
CURVE_KINDS = SCORE_KINDS + ("patience", "fixed")


@dataclass(frozen=True)
class PolicyStats:
    """What one policy does on one trace (accuracy is over labelled samples only)."""

    accuracy: float
    mean_cost: float
    p95_cost: float
    full_cost: float  # mean cost of running every sample to the last exit
    speedup: float  # full_cost / mean_cost
    exit_counts: np.ndarray  # [K] samples leaving at each exit
    n: int
    n_labelled: int

    @property
    def exit_fraction(self) -> np.ndarray:
        return self.exit_counts / max(1, self.n)

    @property
    def cost_fraction(self) -> float:
        return self.mean_cost / self.full_cost if self.full_cost > 0 else 1.0


def chosen(trace: Trace, exits: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Pick ``values[n, exits[n]]`` for every sample of an [N, K] array."""
    return pick(values, exits)


def evaluate(
    trace: Trace, exits: np.ndarray, labelled_correct: np.ndarray | None = None
) -> PolicyStats:
    """Statistics of a per-sample exit assignment (from any policy or oracle).

    ``labelled_correct``: whether each labelled sample is right at its exit, when already
    gathered (``calibration.PolicyOutputs.correct``): a million-row gather saved."""
    exits = np.asarray(exits)
    if exits.shape != (trace.num_samples,):
        raise PolicyError(
            f"need one exit per sample ({trace.num_samples}), got shape {exits.shape}"
        )
    return evaluate_slice(trace, exits, None, labelled_correct)


def evaluate_slice(
    trace: Trace,
    exits: np.ndarray,
    mask: np.ndarray | None,
    labelled_correct: np.ndarray | None = None,
) -> PolicyStats:
    """``evaluate(trace.subset(mask), exits[mask])``, the same numbers, without copying the
    trace (a slice of a million-sample trace would copy hundreds of MB on every rerun)."""
    exits = np.asarray(exits)
    uniform = trace.uniform_cost
    cost = uniform[exits] if uniform is not None else chosen(trace, exits, trace.cost)
    if mask is None:
        full, n_lab = trace.full_cost, trace.num_labelled
        if labelled_correct is not None:
            if len(labelled_correct) != n_lab:
                raise PolicyError(f"need one value per labelled sample ({n_lab})")
            correct = labelled_correct
        else:
            correct = chosen(trace, exits, trace.correct)
            if n_lab < len(exits):
                correct = correct[trace.labelled]
    else:
        labelled = trace.labelled[mask]
        correct = chosen(trace, exits, trace.correct)[mask][labelled]
        cost, exits = cost[mask], exits[mask]
        full = float(trace.cost[:, -1][mask].mean())
        n_lab = int(labelled.sum())
    n = len(exits)
    mean = float(cost.mean())
    counts = np.bincount(exits, minlength=trace.num_exits)
    return PolicyStats(
        accuracy=float(correct.mean()) if n_lab else float("nan"),
        mean_cost=mean,
        p95_cost=percentile_of_levels(cost, 95, uniform, counts),
        full_cost=full,
        speedup=full / mean if mean > 0 else float("inf"),
        exit_counts=counts,
        n=n,
        n_labelled=n_lab,
    )


def percentile_of_levels(
    values: np.ndarray, q: float, levels: np.ndarray | None, counts: np.ndarray
) -> float:
    """``np.percentile(values, q)``, read off ``counts`` when ``values`` is ``levels[exits]``
    (every sample at exit k costs ``levels[k]``, non-decreasing over k) and ``counts`` counts
    the exits: the sorted values are each level repeated its count, so the order statistics
    that np.percentile interpolates between are known without sorting a million values.
    When they are one level (almost always) that level is the answer exactly; when they
    straddle two levels np.percentile itself interpolates, so the number is always its own."""
    n = int(counts.sum())
    if levels is None or n == 0:
        return float(np.percentile(values, q))
    pos = (n - 1) * q / 100
    lo, hi = max(0, int(pos) - 1), min(n - 1, int(pos) + 2)  # a margin around its rounding
    ends = np.cumsum(counts)  # order statistics ends[k-1] .. ends[k]-1 are levels[k]
    a, b = np.searchsorted(ends, [lo, hi], side="right")
    if levels[a] == levels[b]:
        return float(levels[a])
    return float(np.percentile(values, q))


def evaluate_policy(trace: Trace, policy: Policy) -> PolicyStats:
    return evaluate(trace, exit_index(trace, policy))


def per_class_exit_rates(trace: Trace, exits: np.ndarray) -> np.ndarray:
    """[C, K]: fraction of each (labelled) class's samples leaving at each exit."""
    c, k = trace.num_classes, trace.num_exits
    exits = np.asarray(exits)
    # one bincount over (class, exit) pairs: np.add.at takes ~100x longer on a million samples
    if trace.num_labelled == trace.num_samples:  # no mask to copy through
        pairs = trace.label * k + exits
    else:
        lab = trace.labelled
        pairs = trace.label[lab] * k + exits[lab]
    counts = np.bincount(pairs, minlength=c * k).reshape(c, k).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


# --- curves -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Accuracy and cost at every distinct parameter value of one policy kind.

    Points are ordered from the most expensive (everything to the last exit) to the cheapest.
    ``params`` are in the policy's own units (a threshold, or a patience / exit index).
    """

    kind: str
    params: np.ndarray  # [M]
    accuracy: np.ndarray  # [M]
    mean_cost: np.ndarray  # [M]

    def __len__(self) -> int:
        return len(self.params)

    def policy(self, i: int) -> Policy:
        p = self.params[i]
        if self.kind == "patience":
            return Policy("patience", patience=int(p))
        if self.kind == "fixed":
            return Policy("fixed", exit=int(p))
        return Policy(self.kind, threshold=float(p))


def _score_curve(trace: Trace, kind: str) -> Curve:
    s = score(trace, kind)
    n, k = s.shape
    correct = trace.correct
    cost = trace.cost
    # records: exits whose score beats every earlier exit's (only they can be the first to pass)
    rec = np.ones((n, k), dtype=bool)
    if k > 1:
        rec[:, 1:] = s[:, 1:] > np.maximum.accumulate(s, axis=1)[:, :-1]
    # for each record, where the sample goes when the threshold is just above its score:
    # the next record, or the last exit when no later record exists (exit numbers in the
    # narrowest type: on a million samples x 12 exits every [N, K] int64 is 96 MB)
    small = np.int8 if k < 127 else np.int32
    idx = np.where(rec, np.arange(k, dtype=small), small(k))
    after = np.full((n, k), k, dtype=small)
    if k > 1:
        after[:, :-1] = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, 1:]
    del idx
    np.minimum(after, k - 1, out=after)
    sample, at = np.nonzero(rec)  # row-major, as the events are summed below
    del rec
    to = after[sample, at]
    del after
    value = s[sample, at]
    d_cost = cost[sample, at] - cost[sample, to]
    d_correct = correct[sample, at].astype(np.int8) - correct[sample, to]
    del sample, at, to

    # order within a group of equal scores does not matter: only group ends are read
    order = np.argsort(value)[::-1]
    value = value[order]
    cum_cost = np.cumsum(d_cost[order])
    cum_correct = np.cumsum(d_correct[order], dtype=np.int64)
    # one point per distinct score: the state after all events with score >= that value
    last_of_group = np.nonzero(np.r_[value[1:] != value[:-1], True])[0]
    thresholds = value[last_of_group]

    n_lab = int((trace.label != -1).sum()) or np.nan  # no labels: accuracy is undefined
    base_cost = cost[:, -1].sum()
    base_correct = int(correct[:, -1].sum())
    top = np.nextafter(thresholds[0], np.inf)  # above every score: nobody leaves early
    params = np.r_[top, thresholds]
    accuracy = np.r_[base_correct, base_correct + cum_correct[last_of_group]] / n_lab
    mean_cost = np.r_[base_cost, base_cost + cum_cost[last_of_group]] / n
    if kind == "entropy":
        params = -params
    return Curve(kind, params, accuracy, mean_cost)


def curve(trace: Trace, kind: str) -> Curve:
    """The whole accuracy–cost curve of one policy kind."""
    if kind in SCORE_KINDS:
        return _score_curve(trace, kind)
    if kind in ("patience", "fixed"):
        k = trace.num_exits
        values = range(k - 1, -1, -1)  # most expensive first
        pols = [
            Policy(kind, patience=v) if kind == "patience" else Policy(kind, exit=v) for v in values
        ]
        stats = [evaluate_policy(trace, p) for p in pols]
        return Curve(
            kind,
            np.array(list(values)),
            np.array([s.accuracy for s in stats]),
            np.array([s.mean_cost for s in stats]),
        )
    raise PolicyError(f"no curve for policy kind {kind!r}; choose one of {CURVE_KINDS}")


def pareto_front(mean_cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (cheaper and at least as accurate), by cost."""
    order = np.lexsort((-accuracy, mean_cost))
    best = np.maximum.accumulate(accuracy[order])
    keep = np.r_[True, accuracy[order][1:] > best[:-1]]
    return order[keep]


# A Pareto front longer than this is drawn through this many of its points: a million-sample
# trace's front has hundreds of thousands, far more than a chart shows and megabytes per rerun.
MAX_FRONT_POINTS = 2000


def front_to_draw(front: np.ndarray, max_points: int = MAX_FRONT_POINTS) -> np.ndarray:
    """The front itself, or ~max_points evenly spread points of it (both ends kept)."""
    front = np.asarray(front, dtype=np.int64)
    if len(front) <= max_points:
        return front
    return front[np.unique(np.linspace(0, len(front) - 1, max_points).round().astype(np.int64))]


def thin(n: int, keep: np.ndarray, max_points: int = 400) -> np.ndarray:
    """Sorted indices of at most ~max_points evenly spread points out of n, plus every index in keep.

    Whole curves have one point per distinct score (tens of thousands); drawing a few hundred
    of them plus the Pareto front looks the same and keeps every rerun light. Only for drawing:
    metrics and solvers read the full curve.
    """
    if n <= max_points:
        return np.arange(n)
    even = np.linspace(0, n - 1, max_points).round().astype(np.int64)
    return np.unique(np.r_[even, np.asarray(keep, dtype=np.int64)])


def drawing_indices(
    mean_cost: np.ndarray, accuracy: np.ndarray, max_points: int = 400
) -> np.ndarray:
    """Indices of a curve to draw: ~max_points evenly spread along it plus its Pareto front
    (thinned to ``MAX_FRONT_POINTS`` when longer)."""
    mean_cost, accuracy = np.asarray(mean_cost), np.asarray(accuracy)
    if len(mean_cost) <= max_points:
        return np.arange(len(mean_cost))
    return thin(len(mean_cost), front_to_draw(pareto_front(mean_cost, accuracy)), max_points)


# --- solvers ------------------------------------------------------------------------------------


def cheapest_with_accuracy(c: Curve, target: float) -> int | None:
    """Index of the cheapest point with accuracy >= target (ties: the more accurate); None if none."""
    ok = np.nonzero(c.accuracy >= target - TOL)[0]
    if ok.size == 0:
        return None
    order = np.lexsort((-c.accuracy[ok], c.mean_cost[ok]))
    return int(ok[order[0]])


def best_within_budget(c: Curve, budget: float) -> int | None:
    """Index of the most accurate point with mean cost <= budget (ties: the cheaper); None if none."""
    ok = np.nonzero(c.mean_cost <= budget * (1 + TOL))[0]
    if ok.size == 0:
        return None
    order = np.lexsort((c.mean_cost[ok], -c.accuracy[ok]))
    return int(ok[order[0]])


def nearest_cost(c: Curve, cost: float) -> int:
    """Index of the point whose mean cost is closest to ``cost`` (ties: the more accurate).

    Used to compare two policy kinds at matched cost (a learned gate beside a threshold)."""
    d = np.abs(c.mean_cost - cost)
    return int(np.lexsort((-c.accuracy, d))[0])


def budget_target(trace: Trace, budget: float, relative: bool) -> float:
    """An absolute mean-cost budget, or a fraction of the full model's mean cost."""
    return budget * float(trace.cost[:, -1].mean()) if relative else budget


# --- reference points ---------------------------------------------------------------------------


def oracle_stats(trace: Trace, never_correct: NeverCorrect = "first") -> PolicyStats:
    """The oracle: every sample leaves at its earliest correct exit.

    ``never_correct`` says where samples no exit gets right are charged: "first" (the cheapest
    way to be wrong, a lower bound for every policy) or "last" (they ran the whole network).
    Accuracy is the same under both; cost and speed-up are not.
    """
    return evaluate(trace, oracle_correct(trace, fallback=never_correct))


def last_exit_stats(trace: Trace) -> PolicyStats:
    return evaluate(trace, np.full(trace.num_samples, trace.num_exits - 1))


def accuracy_within_budgets(trace: Trace, kinds, budgets) -> dict[str, dict[str, float | None]]:
    """Best accuracy of each policy kind within each budget (fractions of the full model's mean
    cost): the comparison table the gate and JEI cards carry (None: no setting that cheap)."""
    full = float(trace.cost[:, -1].mean())
    out = {}
    for kind in kinds:
        c = curve(trace, kind)
        row = {}
        for b in budgets:
            i = best_within_budget(c, b * full)
            row[f"{b:g}"] = None if i is None else round(float(c.accuracy[i]), 4)
        out[kind] = row
    return out
