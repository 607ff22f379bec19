"""Exit policies as pure, vectorised functions: (trace, parameters) -> exit index per sample.

Every policy stops at the *first* exit whose criterion holds and falls back to the last exit.
One decision function, ``stop_mask``, serves the cached traces, the real runtime
(``engine.run.runtime``, on live activations), the sample inspector, the language page and the
tour, so the cached-trace answer and the real early-exit run agree exactly.

Conventions (named as in the literature, see shared/FIELD.md):
- ``max_prob``: exit when max softmax probability >= threshold (BranchyNet, MSDNet).
  threshold 0 exits everything at the first exit; a threshold above 1 sends everything to the last.
- ``entropy``: exit when entropy / log(C) <= threshold (DeeBERT, normalised so one slider range
  [0, 1] fits every class count). threshold 1 exits everything at the first exit.
- ``margin``: exit when top-1 minus top-2 probability >= threshold.
- ``patience``: PABEE; exit at exit k when the prediction has stayed unchanged for ``patience``
  consecutive exits (k-patience .. k agree). Patience 0 exits at the first exit.
- ``per_exit``: max-prob with one threshold per exit (the last one is never consulted).
- ``gate``: exit when the trace's learned gate score >= threshold (JEI-DNN style gates).
- ``fixed``: every sample leaves at one exit (static truncation, and the "last exit" baseline).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from engine.core.trace import Trace, entropy_norm_of, margin_of, max_prob_of

PolicyKind = Literal["max_prob", "entropy", "margin", "patience", "per_exit", "gate", "fixed"]
POLICY_KINDS: tuple[str, ...] = (
    "max_prob",
    "entropy",
    "margin",
    "patience",
    "per_exit",
    "gate",
    "fixed",
)
POLICY_LABELS = {
    "max_prob": "Max probability (BranchyNet / MSDNet)",
    "entropy": "Entropy (DeeBERT)",
    "margin": "Top-2 margin",
    "patience": "Patience (PABEE)",
    "per_exit": "Per-exit thresholds",
    "gate": "Learned gate (JEI-DNN)",
    "fixed": "Fixed exit (static truncation)",
}


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Policy:
    """One exit policy with its parameters; serialisable to JSON via ``to_dict``."""

    kind: PolicyKind
    threshold: float | None = None  # max_prob, entropy, margin, gate
    patience: int | None = None  # patience
    thresholds: tuple[float, ...] | None = None  # per_exit
    exit: int | None = None  # fixed

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise PolicyError(f"unknown policy kind {self.kind!r}; choose one of {POLICY_KINDS}")
        need = {
            "max_prob": "threshold",
            "entropy": "threshold",
            "margin": "threshold",
            "gate": "threshold",
            "patience": "patience",
            "per_exit": "thresholds",
            "fixed": "exit",
        }[self.kind]
        value = getattr(self, need)
        if value is None:
            raise PolicyError(f"policy {self.kind!r} needs {need!r}")
        if need == "threshold" and not np.isfinite(value):
            raise PolicyError("threshold must be a finite number")
        if need in ("patience", "exit") and (int(value) != value or value < 0):
            raise PolicyError(f"{need} must be a non-negative integer")
        if need == "thresholds" and not all(np.isfinite(v) for v in value):
            raise PolicyError("thresholds must be finite numbers")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if "thresholds" in d:
            d["thresholds"] = list(d["thresholds"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Policy:
        if not isinstance(d, dict) or "kind" not in d:
            raise PolicyError("a policy is a JSON object with a 'kind' field")
        unknown = set(d) - {"kind", "threshold", "patience", "thresholds", "exit"}
        if unknown:
            raise PolicyError(f"unknown policy field(s): {sorted(unknown)}")
        try:
            return cls(
                kind=d["kind"],
                threshold=None if d.get("threshold") is None else float(d["threshold"]),
                patience=None if d.get("patience") is None else int(d["patience"]),
                thresholds=None
                if d.get("thresholds") is None
                else tuple(float(v) for v in d["thresholds"]),
                exit=None if d.get("exit") is None else int(d["exit"]),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, PolicyError):
                raise
            raise PolicyError(f"bad policy value: {e}") from None

    def describe(self) -> str:
        if self.kind == "per_exit":
            return "per-exit max-prob " + ", ".join(f"{t:.3f}" for t in self.thresholds)
        if self.kind == "patience":
            return f"patience {self.patience}"
        if self.kind == "fixed":
            return f"fixed exit {self.exit}"
        return f"{self.kind.replace('_', '-')} {self.threshold:.4g}"


# --- the decision rule: one function for traces, the runtime, the inspector and the tour ---------


class _Outputs:
    """Confidence scores of raw probabilities, computed once, as a ``Trace`` caches them."""

    def __init__(self, probs: np.ndarray, gate: np.ndarray | None):
        self.probs = np.asarray(probs)
        self.gate = None if gate is None else np.asarray(gate)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=-1)

    @property
    def max_prob(self) -> np.ndarray:
        return max_prob_of(self.probs)

    @property
    def entropy_norm(self) -> np.ndarray:
        return entropy_norm_of(self.probs)

    @property
    def margin(self) -> np.ndarray:
        return margin_of(self.probs)


def stop_mask(
    policy: Policy, outputs: np.ndarray | Trace, gate: np.ndarray | None = None
) -> np.ndarray:
    """[..., K] bool: may each sample stop at exit k, judged on the outputs of exits 0..k.

    ``outputs`` is a ``Trace`` (its cached scores and gate are used) or probabilities
    [..., K, C] (with ``gate`` [..., K] for the gate policy). Column k never depends on the
    columns after it, so a runtime that has computed exits 0..k only may fill the rest with
    anything (zeros) and read column k. Every caller that decides an exit goes through here.
    """
    out = outputs if isinstance(outputs, Trace) else _Outputs(outputs, gate)
    k = out.probs.shape[-2]
    kind = policy.kind
    if kind == "max_prob":
        return out.max_prob >= policy.threshold
    if kind == "entropy":
        return out.entropy_norm <= policy.threshold
    if kind == "margin":
        return out.margin >= policy.threshold
    if kind == "patience":
        return patience_mask(out.pred, policy.patience)
    if kind == "per_exit":
        t = np.asarray(policy.thresholds, dtype=np.float64)
        if t.shape != (k,):
            raise PolicyError(f"per-exit thresholds need {k} values, got {t.size}")
        return out.max_prob >= t
    if kind == "gate":
        if out.gate is None:
            raise PolicyError("these outputs have no learned gate scores")
        return out.gate.astype(np.float64) >= policy.threshold
    if kind == "fixed":
        if policy.exit >= k:
            raise PolicyError(f"exit {policy.exit} does not exist (the model has {k} exits)")
        mask = np.zeros(out.probs.shape[:-1], dtype=bool)
        mask[..., policy.exit] = True
        return mask
    raise PolicyError(f"unknown policy kind {kind!r}")


def first_true(mask: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis; the last index where none is True."""
    k = mask.shape[-1]
    # count the leading exits before the first True, exit by exit: each step is one
    # vectorised pass over all samples (contiguous in a compact trace's column-major scores),
    # several times faster on a million samples than argmax along a short last axis
    seen = np.zeros(mask.shape[:-1], dtype=bool)
    out = np.zeros(mask.shape[:-1], dtype=np.int8 if k < 127 else np.intp)
    for e in range(k - 1):
        np.logical_or(seen, mask[..., e], out=seen)
        out += ~seen
    return out.astype(np.intp)


def patience_mask(pred: np.ndarray, patience: int) -> np.ndarray:
    """[..., K] bool: the prediction at k equals the ones at k-1 .. k-patience (PABEE's counter)."""
    k = pred.shape[-1]
    if patience == 0:
        return np.ones(pred.shape, dtype=bool)
    mask = np.zeros(pred.shape, dtype=bool)
    # PABEE's counter itself, run exit by exit over all samples at once
    run = np.zeros(pred.shape[:-1], dtype=np.int32)
    for e in range(1, k):
        run = np.where(pred[..., e] == pred[..., e - 1], run + 1, 0)
        mask[..., e] = run >= patience
    return mask


def exit_index(
    outputs: Trace | np.ndarray,
    policy: Policy,
    gate: np.ndarray | None = None,
    prepared: ThresholdIndex | None = None,
) -> np.ndarray:
    """[...] int64 exit taken by each sample: the first exit ``stop_mask`` allows, else the last.

    ``outputs`` as in ``stop_mask``: a trace, or probabilities [..., K, C] (one sample's [K, C]
    gives a 0-d array). ``prepared``: ``threshold_index(trace, policy.kind)`` of this trace,
    which gives the same exits in a fraction of the time (a slider move on a big trace).
    """
    if prepared is not None:
        if prepared.kind != policy.kind:
            raise PolicyError(f"prepared for {prepared.kind!r}, not {policy.kind!r}")
        return prepared.exits(policy.threshold)
    return first_true(stop_mask(policy, outputs, gate)).astype(np.int64)


# --- threshold policies, prepared once per trace ------------------------------------------------

# the kinds that stop at the first exit whose score reaches a threshold
SCORE_KINDS = ("max_prob", "entropy", "margin", "gate")


def score(trace: Trace, kind: str) -> np.ndarray:
    """[N, K] score such that ``kind`` exits at the first exit with score >= t' (t' = t, or -t
    for entropy, whose rule is ``entropy <= t``: negation is exact)."""
    if kind == "max_prob":
        return trace.max_prob
    if kind == "margin":
        return trace.margin
    if kind == "entropy":
        return -trace.entropy_norm
    if kind == "gate":
        if trace.gate is None:
            raise PolicyError("this trace has no learned gate scores")
        return trace.gate.astype(np.float64)
    raise PolicyError(f"no score for policy kind {kind!r}")


@dataclass(frozen=True, eq=False)
class ThresholdIndex:
    """A score policy's exit for any threshold, prepared once per trace and kind.

    ``running[:, e]`` is the best score of exits 0..e (a running maximum, so non-decreasing
    along e): a sample passes at the first e where it reaches t, so its exit is the number of
    exits before the last whose running maximum is below t, one comparison pass per exit
    with no [N, K] mask. When every score is a float32 (max-prob and gates of float32
    probabilities) ``running`` is float32 too, half the memory read per move, and t is rounded
    up to the smallest float32 >= t: for a float32 score s, s >= t exactly when s >= that.
    """

    kind: str
    running: np.ndarray  # [N, K - 1] column-major, float32 or float64

    def exits(self, threshold: float) -> np.ndarray:
        t = -float(threshold) if self.kind == "entropy" else float(threshold)
        if self.running.dtype == np.float32:
            t = _float32_at_least(t)
        n, k1 = self.running.shape
        out = np.zeros(n, dtype=np.int8 if k1 < 127 else np.int32)
        below = np.empty(n, dtype=bool)
        for e in range(k1):
            np.less(self.running[:, e], t, out=below)
            out += below
        return out.astype(np.int64)


def _float32_at_least(t: float) -> np.float32:
    """The smallest float32 >= t (inf above float32's range)."""
    with np.errstate(over="ignore"):
        f = np.float32(t)
    return np.nextafter(f, np.float32(np.inf)) if float(f) < t else f


def threshold_index(trace: Trace, kind: str) -> ThresholdIndex:
    """Prepare ``kind``'s exits on ``trace`` (``exit_index(..., prepared=)``), column by
    column so that nothing [N, K]-sized is made but the result."""
    s = score(trace, kind)
    n, k = s.shape
    cols = range(k - 1)  # the last exit is the fallback: its score is never read
    narrow = all(np.array_equal(s[:, e].astype(np.float32), s[:, e]) for e in cols)
    running = np.empty((n, k - 1), dtype=np.float32 if narrow else np.float64, order="F")
    for e in cols:
        if e == 0:
            running[:, 0] = s[:, 0]
        else:
            np.maximum(running[:, e - 1], s[:, e], out=running[:, e])
    return ThresholdIndex(kind, running)


# --- oracles ------------------------------------------------------------------------------

# Where the oracle charges a sample that no exit gets right. Both are in use in the literature,
# and on a trace with many such samples the oracle's speed-up differs a lot between them.
NeverCorrect = Literal["first", "last"]
NEVER_CORRECT: tuple[str, ...] = ("first", "last")


def oracle_correct(trace: Trace, fallback: NeverCorrect = "first") -> np.ndarray:
    """Earliest exit that predicts the label.

    fallback="first" sends never-correct samples to the first exit: the cheapest way to be wrong,
    which makes the oracle's cost a lower bound for every policy at its accuracy. fallback="last"
    sends them to the last exit: the difficulty ranking ("needs the whole network, and fails"),
    and the convention of work that reports the oracle as "run until right, else to the end".
    """
    if fallback not in NEVER_CORRECT:
        raise PolicyError(f"never-correct samples go to 'first' or 'last', not {fallback!r}")
    correct = trace.correct
    idx = correct.argmax(axis=1)
    never = ~correct.any(axis=1)
    idx[never] = 0 if fallback == "first" else trace.num_exits - 1
    return idx.astype(np.int64)


def oracle_stable(trace: Trace) -> np.ndarray:
    """Earliest exit from which the prediction no longer changes (label-free)."""
    pred = trace.pred
    differs = pred != pred[:, -1:]
    # last exit whose prediction differs from the final one; the stable exit is the one after it
    k = trace.num_exits
    last_diff = np.where(differs.any(axis=1), k - 1 - differs[:, ::-1].argmax(axis=1), -1)
    return (last_diff + 1).astype(np.int64)


# --- plain per-sample reference (tests compare the vectorised code against it) ---------------


def reference_exit_index(trace: Trace, policy: Policy) -> np.ndarray:
    """Loop over samples and exits exactly as a batch-size-1 runtime would."""
    out = np.empty(trace.num_samples, dtype=np.int64)
    k_last = trace.num_exits - 1
    for n in range(trace.num_samples):
        chosen = k_last
        run = 0
        for k in range(trace.num_exits):
            p = trace.probs[n, k].astype(np.float64)
            top = sorted(p, reverse=True)
            if policy.kind == "max_prob":
                ok = p.max() >= policy.threshold
            elif policy.kind == "entropy":
                ok = float(entropy_norm_of(p)) <= policy.threshold
            elif policy.kind == "margin":
                ok = top[0] - top[1] >= policy.threshold
            elif policy.kind == "per_exit":
                ok = p.max() >= policy.thresholds[k]
            elif policy.kind == "gate":
                ok = float(trace.gate[n, k]) >= policy.threshold
            elif policy.kind == "fixed":
                ok = k == policy.exit
            elif policy.kind == "patience":
                if k > 0 and trace.pred[n, k] == trace.pred[n, k - 1]:
                    run += 1
                else:
                    run = 0
                ok = run >= policy.patience
            else:
                raise PolicyError(policy.kind)
            if ok:
                chosen = k
                break
        out[n] = chosen
    return out
