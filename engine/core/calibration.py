"""Calibration of exits: reliability diagrams and expected calibration error (ECE).

Thresholded exits are said to be over-confident on the samples they let through (the
"positive confidence bias" JEI-DNN points out), so ECE is reported per exit and for the outputs a
policy actually returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from engine.core.trace import Trace, picks


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins; empty bins have count 0 and NaN accuracy/confidence."""

    edges: np.ndarray  # [B + 1]
    accuracy: np.ndarray  # [B]
    confidence: np.ndarray  # [B]
    count: np.ndarray  # [B]
    ece: float  # sum over bins of (count / N) * |accuracy - confidence|


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> Reliability:
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = _bin_index(conf, edges)
    count = np.bincount(which, minlength=bins).astype(np.int64)
    acc_sum = np.bincount(which, weights=ok, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    return _from_sums(edges, count, acc_sum, conf_sum, conf.size)


def _bin_index(conf: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin i holds edges[i] < conf <= edges[i + 1] (``np.digitize(..., right=True)``), counted
    edge by edge: a few vectorised comparisons beat a binary search per value on a million."""
    which = np.zeros(conf.shape, dtype=np.int64)
    for edge in edges[1:-1]:
        which += conf > edge
    return which


def _from_sums(
    edges: np.ndarray, count: np.ndarray, acc_sum: np.ndarray, conf_sum: np.ndarray, size: int
) -> Reliability:
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, acc_sum / count, np.nan)
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
    n = max(1, size)
    gap = np.abs(np.nan_to_num(acc) - np.nan_to_num(mean_conf))
    return Reliability(edges, acc, mean_conf, count, float((count / n * gap).sum()))


def per_exit(trace: Trace, bins: int = 15) -> list[Reliability]:
    """One reliability diagram per exit, over the labelled samples."""
    lab = trace.label != -1
    return [
        reliability(trace.max_prob[lab, k], trace.correct[lab, k], bins)
        for k in range(trace.num_exits)
    ]


@dataclass(frozen=True)
class PolicyOutputs:
    """What a policy returns for each labelled sample: its exit, confidence and correctness.

    Gathered once per policy evaluation (``policy_outputs``) and shared by ``of_policy``,
    ``exit_gaps`` and ``exited_reliability``: on a million samples each gather and binning is
    tens of milliseconds, and a tuning rerun would otherwise repeat them for every chart.
    """

    exits: np.ndarray  # [L] exit of each labelled sample
    confidence: np.ndarray  # [L] float64, max-prob at that exit
    correct: np.ndarray  # [L] float64, 1.0 where that exit is right
    bin: np.ndarray  # [L] reliability bin of the confidence
    edges: np.ndarray  # [B + 1]
    num_exits: int
    outcome: np.ndarray | None = None  # [L] bin * 2 + right, when read from an OutcomeTable

    @cached_property
    def group(self) -> np.ndarray:
        """[L] exit * B + bin: the (exit, bin) cell of each sample."""
        group = self.exits * (len(self.edges) - 1)
        group += self.bin
        return group

    @cached_property
    def tally(self) -> np.ndarray:
        """[K, B, 2] int64: samples per (exit, bin, wrong/right), from one bincount.

        Every count and number right that the diagrams need, per exit, per bin or per cell,
        is a sum of these integers, exact in any order; only the confidence sums are summed
        sample by sample (``np.bincount`` in sample order, as before)."""
        b = len(self.edges) - 1
        if self.outcome is not None:
            key = np.multiply(self.exits, 2 * b, dtype=np.int64)
            key += self.outcome
        else:
            key = self.group * 2
            key += self.correct > 0
        return np.bincount(key, minlength=self.num_exits * b * 2).reshape(self.num_exits, b, 2)


def confidence_bins(trace: Trace, bins: int = 15) -> np.ndarray:
    """[N, K] int8: the reliability bin of every sample's max-prob at every exit.

    Computed once per trace, in ``outcome_table`` (the pages cache that), so that a policy's
    outputs are binned by a lookup at their exits instead of afresh each time."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = trace.max_prob
    table = np.empty(conf.shape, dtype=np.int8 if bins < 127 else np.int64, order="F")
    for e in range(conf.shape[1]):
        table[:, e] = _bin_index(np.ascontiguousarray(conf[:, e]), edges)
    return table


@dataclass(frozen=True, eq=False)
class OutcomeTable:
    """Per trace, what a policy's outputs are gathered from, laid out for that gather.

    Row-major, so that the samples' values at their exits are read in one sweep (a gather from
    column-major [N, K] arrays jumps between K columns: twice as slow on a million rows)."""

    code: np.ndarray  # [N, K] int8: reliability bin * 2 + right
    confidence: np.ndarray  # [N, K] max-prob: float32 when every one is a float32, else float64


def outcome_table(trace: Trace, bins: int = 15) -> OutcomeTable:
    """Every sample's bin, correctness and confidence at every exit (computed once per trace;
    the pages cache it). Max-probabilities of float32 probabilities are float32 numbers, so a
    float32 copy holds them exactly, in half the memory a gather reads."""
    code = confidence_bins(trace, bins)
    if bins * 2 > 127:
        code = code.astype(np.int64)
    code *= 2
    code += trace.correct
    mp = trace.max_prob  # checked and copied column by column: no [N, K] float64 made
    narrow = all(np.array_equal(mp[:, e].astype(np.float32), mp[:, e]) for e in range(mp.shape[1]))
    conf = np.empty(mp.shape, dtype=np.float32 if narrow else np.float64)
    conf[...] = mp
    return OutcomeTable(np.ascontiguousarray(code), conf)


def policy_outputs(
    trace: Trace, exits: np.ndarray, bins: int = 15, outcome: OutcomeTable | None = None
) -> PolicyOutputs:
    """Gather what the policy returns; ``outcome`` is ``outcome_table(trace, bins)``, read
    instead of gathering correctness and binning the confidences afresh."""
    exits = np.asarray(exits)
    edges = np.linspace(0.0, 1.0, bins + 1)
    lab = trace.labelled
    if outcome is not None:
        conf, code = picks(exits, outcome.confidence, outcome.code)
        if not lab.all():
            conf, code, exits = conf[lab], code[lab], exits[lab]
        right = (code & 1).astype(np.float64)
        conf = conf.astype(np.float64)  # exact: every float32 is a float64
        return PolicyOutputs(exits, conf, right, code >> 1, edges, trace.num_exits, code)
    conf, ok = picks(exits, trace.max_prob, trace.correct)
    which = _bin_index(conf, edges)
    if not lab.all():
        conf, ok, exits, which = conf[lab], ok[lab], exits[lab], which[lab]
    return PolicyOutputs(
        exits, conf, ok.astype(np.float64), which.astype(np.int64), edges, trace.num_exits
    )


def of_policy(
    trace: Trace, exits: np.ndarray, bins: int = 15, outputs: PolicyOutputs | None = None
) -> Reliability:
    """Reliability of the outputs the policy returns (each sample's confidence at its exit)."""
    o = outputs if outputs is not None else policy_outputs(trace, exits, bins)
    b = len(o.edges) - 1
    per_bin = o.tally.sum(axis=0)
    count, acc_sum = per_bin.sum(axis=1), per_bin[:, 1].astype(np.float64)
    conf_sum = np.bincount(o.bin, weights=o.confidence, minlength=b)
    return _from_sums(o.edges, count, acc_sum, conf_sum, o.confidence.size)


@dataclass(frozen=True)
class ExitGaps:
    """Signed calibration gap of the samples that leave at each exit, and of all of them.

    gap = mean confidence - accuracy: positive means over-confident (JEI-DNN's "positive bias"
    of thresholded exits), negative under-confident. ECE hides the sign; this keeps it. Exits
    that no labelled sample leaves at have count 0 and NaN confidence, accuracy and gap.
    """

    count: np.ndarray  # [K]
    confidence: np.ndarray  # [K]
    accuracy: np.ndarray  # [K]
    gap: np.ndarray  # [K]
    overall_confidence: float
    overall_accuracy: float

    @property
    def overall_gap(self) -> float:
        return self.overall_confidence - self.overall_accuracy


def exit_gaps(trace: Trace, exits: np.ndarray, outputs: PolicyOutputs | None = None) -> ExitGaps:
    """Signed gap per exit over the labelled samples a policy sends there, and overall."""
    o = outputs if outputs is not None else policy_outputs(trace, exits)
    conf, ok, where = o.confidence, o.correct, o.exits
    k = trace.num_exits
    per_exit = o.tally.sum(axis=1)
    count, n_right = per_exit.sum(axis=1), per_exit[:, 1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, np.bincount(where, conf, k) / count, np.nan)
        acc = np.where(count > 0, n_right / count, np.nan)
    n = conf.size
    return ExitGaps(
        count=count,
        confidence=mean_conf,
        accuracy=acc,
        gap=mean_conf - acc,
        overall_confidence=float(conf.mean()) if n else float("nan"),
        overall_accuracy=float(ok.mean()) if n else float("nan"),
    )


def exited_reliability(
    trace: Trace, exits: np.ndarray, bins: int = 15, outputs: PolicyOutputs | None = None
) -> list[Reliability]:
    """One reliability diagram per exit over the labelled samples that leave there.

    One pass: samples are binned once and counted per (exit, bin), in the order a per-exit
    ``reliability`` would see them, so the sums are the same to the last bit."""
    o = outputs if outputs is not None else policy_outputs(trace, exits, bins)
    k, b = o.num_exits, len(o.edges) - 1
    count = o.tally.sum(axis=2)
    acc_sum = o.tally[:, :, 1].astype(np.float64)
    conf_sum = np.bincount(o.group, weights=o.confidence, minlength=k * b).reshape(k, b)
    sizes = count.sum(axis=1)
    return [_from_sums(o.edges, count[e], acc_sum[e], conf_sum[e], sizes[e]) for e in range(k)]
