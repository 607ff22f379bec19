"""The trace: everything measured when a dynamic model processes a data set.

Policies are evaluated on traces instead of re-running the model, so a threshold slider can
recompute accuracy and cost for a whole data set in milliseconds. A trace holds, per sample and
per exit ``k`` (exits ordered by depth), the class probabilities and the *cumulative* cost of
reaching exit ``k``; everything else (prediction, max-prob, entropy, margin, correctness) is
derived from those arrays.

On disk a trace is one Parquet (or CSV) table with one row per sample, in a *wide* layout that
any external model can produce without this package::

    sample_id, label, prob_e{k}_c{c} ..., cost_e{k} ..., [latency_e{k} ...], [gate_e{k} ...],
    [conf_e{k} ...], [extra.{name} ...]

``logit_e{k}_c{c}`` columns may replace the ``prob_`` ones (they are soft-maxed on load). Parquet
files also carry the metadata (model id, exit and class names, data set, split, cost unit) as
JSON under the ``aie.trace`` key. A CSV file may carry the same fields as ``# key: value`` lines
before its header row, so that one uploaded file says everything::

    # cost_unit: trees
    # exit_names: 10 trees, 50 trees, 200 trees
    sample_id,label,prob_e0_c0,...

Whatever neither gives is inferred from the columns (``exit 0``…, classes ``0``…, FLOPs).

``conf_e{k}`` columns make a *confidence trace*: each exit's confidence is the top-1 probability
over a space much larger than the trace's classes (a language model's vocabulary), so it cannot
be read off ``probs``. Per-token traces from other tools (``engine.byo.foreign``) are stored so:
two classes, "agrees with the reference token" or not, one-hot per exit, and the token's own
confidence per exit. The max-probability rules (``max_prob``, ``per_exit``) read ``confidence``
instead of ``max(probs)``; entropy and margin need the whole distribution and are refused.

A *compact* trace (``read(path, lazy=True)``, chosen by itself for big files: see
``LAZY_MIN_CELLS``) is read column by column with ``polars.scan_parquet`` and keeps only what
the policies read, per sample and exit (``ExitScores``: prediction, max-prob, entropy,
margin), computed one exit at a time, so a 1,000,000 x 12 x 10 trace never holds its
probabilities in memory. ``probs`` is then a ``LazyProbs`` that reads the rows asked for
from the file (a sample's [K, C] for the inspector). The scores are the very numbers the full
trace would derive, so every policy and curve gives the same answer either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from engine.paths import cache_dir

META_KEY = "aie.trace"
FORMAT_VERSION = 1
UNKNOWN_LABEL = -1
_PROB_RE = re.compile(r"^(prob|logit)_e(\d+)_c(\d+)$")
_PER_EXIT_RE = re.compile(r"^(cost|latency|gate|conf)_e(\d+)$")


def max_prob_of(probs: np.ndarray) -> np.ndarray:
    """Max softmax probability over the last axis, as float64.

    Confidence scores are float64 so that a threshold typed as a Python float is compared at
    full precision (numpy 2 would otherwise round it to the array's float32).
    """
    return probs.max(axis=-1).astype(np.float64)


def entropy_norm_of(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log(C): 0 for a one-hot output, 1 for a uniform one."""
    p = probs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return np.clip(h / np.log(probs.shape[-1]), 0.0, 1.0)


def margin_of(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability, as float64."""
    top2 = np.partition(probs.astype(np.float64), -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


# Above this many probabilities (N x K x C, 80 MB in float32) ``read`` keeps a Parquet file's
# trace compact: 1M x 12 x 10 is 480 MB as float32 and 960 MB as the float64 it is parsed in.
LAZY_MIN_CELLS = 20_000_000
# A CSV file above this size is streamed into Parquet first and then read compactly.
LAZY_CSV_BYTES = 100 * 1024 * 1024
# At most this many probabilities (80 MB as float32) are read back from the file at once: one
# exit of a million samples (the inspector's difficulty order), not every exit.
MAX_LAZY_CELLS = 20_000_000


@dataclass(frozen=True, eq=False)
class ExitScores:
    """What policies read per sample and exit, kept instead of the whole distribution.

    Scores are float64 so that a compact trace compares a threshold exactly as a full one;
    ``pred`` is the narrowest integer type that holds the class count.
    """

    pred: np.ndarray  # [N, K] int16/int32
    max_prob: np.ndarray  # [N, K] float64
    entropy_norm: np.ndarray | None  # [N, K] float64, None for a confidence trace
    margin: np.ndarray | None  # [N, K] float64, None for a confidence trace

    def subset(self, idx: np.ndarray) -> ExitScores:
        return ExitScores(
            self.pred[idx],
            self.max_prob[idx],
            None if self.entropy_norm is None else self.entropy_norm[idx],
            None if self.margin is None else self.margin[idx],
        )

    @property
    def nbytes(self) -> int:
        arrs = (self.pred, self.max_prob, self.entropy_norm, self.margin)
        return sum(a.nbytes for a in arrs if a is not None)


class LazyProbs:
    """[N, K, C] probabilities left in their Parquet file; indexing reads just those rows.

    Reading one sample (``probs[i]``, ``probs[i, k]``) or a few thousand is cheap; anything
    that would need the whole distribution of a big trace in memory (``np.asarray``, more
    than ``MAX_LAZY_CELLS`` probabilities) raises a TraceError that says so instead.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(
        self,
        path: str | Path,
        columns: tuple[tuple[str, ...], ...],
        logits: bool,
        n_file: int,
        rows: np.ndarray | None = None,
    ):
        self.path = Path(path)
        self.columns = columns  # [K][C] column names
        self.logits = logits
        self.n_file = n_file
        self.rows = rows  # file rows of this view (None: all, in order)

    @property
    def shape(self) -> tuple[int, int, int]:
        n = self.n_file if self.rows is None else len(self.rows)
        return (n, len(self.columns), len(self.columns[0]))

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, index) -> LazyProbs:
        """The view over a subset of its samples (bool mask or integer index)."""
        idx = np.arange(self.shape[0])[np.asarray(index)]
        rows = idx if self.rows is None else self.rows[idx]
        return LazyProbs(self.path, self.columns, self.logits, self.n_file, rows)

    def read(self, positions: np.ndarray, exit: int | None = None) -> np.ndarray:
        """[len(positions), K, C] float32 read from the file (only the rows' span of it), or
        [len(positions), C] of one exit (only its C columns read)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        n, k, c = self.shape
        exits = range(k) if exit is None else [range(k)[exit]]
        if pos.size * len(exits) * c > MAX_LAZY_CELLS:
            raise TraceError(
                "probs",
                f"this trace is read compactly ({n} samples); whole output distributions are "
                f"read back from its file for at most {MAX_LAZY_CELLS} probabilities at once",
            )
        rows = pos if self.rows is None else self.rows[pos]
        if pos.size == 0:
            out = np.empty((0, len(exits), c), dtype=np.float32)
        else:
            lo, hi = int(rows.min()), int(rows.max())
            cols = [col for e in exits for col in self.columns[e]]
            df = pl.scan_parquet(self.path).select(cols).slice(lo, hi - lo + 1).collect()
            raw = df.to_numpy().astype(np.float64)[rows - lo].reshape(-1, len(exits), c)
            out = _softmax(raw) if self.logits else raw.astype(np.float32)
        return out if exit is None else out[:, 0]

    def __getitem__(self, index):
        """numpy indexing, with the samples (first index) and one exit (second) read lazily."""
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        n = self.shape[0]
        if isinstance(first, (int, np.integer)):
            if not -n <= first < n:
                raise IndexError(f"sample {first} is out of range for {n} samples")
            pos = np.array([first % n])
        else:
            pos = np.arange(n)[first]
        exit = rest[0] if rest and isinstance(rest[0], (int, np.integer)) else None
        block = self.read(pos, exit)
        if exit is not None:
            rest = rest[1:]
        if isinstance(first, (int, np.integer)):
            return block[0][rest] if rest else block[0]
        return block[(np.arange(len(pos)), *rest)] if rest else block

    def __array__(self, dtype=None, copy=None):
        raise TraceError(
            "probs",
            f"this trace is read compactly ({self.shape[0]} samples x {self.shape[1]} exits): "
            "its whole output distributions stay in the file and are not held in memory",
        )


def pick(values: np.ndarray, exits: np.ndarray) -> np.ndarray:
    """``values[n, exits[n]]`` for every row of an [N, K] array.

    Through the flat buffer when it is contiguous (either order): about twice as fast as
    ``values[arange(N), exits]`` on a million rows, and the same numbers."""
    exits = np.asarray(exits)
    n, k = values.shape
    rows = np.arange(n)
    if values.flags.c_contiguous:
        return values.ravel().take(rows * k + exits)
    if values.flags.f_contiguous:
        return values.ravel(order="F").take(exits * n + rows)
    return values[rows, exits]


def picks(exits: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``pick`` of several [N, K] arrays at the same exits, the flat positions computed once
    per memory layout (on a million rows each set costs as much as a gather)."""
    exits = np.asarray(exits)
    index: dict[str, np.ndarray] = {}
    out = []
    for values in arrays:
        n, k = values.shape
        order = "C" if values.flags.c_contiguous else "F" if values.flags.f_contiguous else None
        if order is None:
            out.append(pick(values, exits))
            continue
        if order not in index:
            flat = np.arange(n) * k if order == "C" else np.multiply(exits, n, dtype=np.int64)
            flat += exits if order == "C" else np.arange(n)
            index[order] = flat
        out.append(values.ravel(order=order).take(index[order]))
    return tuple(out)


class TraceError(ValueError):
    """A trace failed validation; ``field`` names the offending field or column."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class TraceMeta:
    model_id: str
    exit_names: tuple[str, ...]
    class_names: tuple[str, ...]
    dataset: str = "unknown"
    split: str = "unknown"
    cost_unit: str = "FLOPs"
    extra: dict = field(default_factory=dict)  # free JSON: model card excerpt, notes

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "model_id": self.model_id,
                "exit_names": list(self.exit_names),
                "class_names": list(self.class_names),
                "dataset": self.dataset,
                "split": self.split,
                "cost_unit": self.cost_unit,
                "extra": self.extra,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TraceMeta:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise TraceError("metadata", f"not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise TraceError("metadata", "must be a JSON object")
        for key in ("model_id", "exit_names", "class_names"):
            if key not in d:
                raise TraceError(f"metadata.{key}", "missing")
        for key in ("exit_names", "class_names"):
            if not isinstance(d[key], list) or not all(isinstance(x, str) for x in d[key]):
                raise TraceError(f"metadata.{key}", "must be a list of strings")
        extra = d.get("extra", {})
        return cls(
            model_id=str(d["model_id"]),
            exit_names=tuple(d["exit_names"]),
            class_names=tuple(d["class_names"]),
            dataset=str(d.get("dataset", "unknown")),
            split=str(d.get("split", "unknown")),
            cost_unit=str(d.get("cost_unit", "FLOPs")),
            extra=extra if isinstance(extra, dict) else {},
        )


@dataclass(frozen=True, eq=False)
class Trace:
    """Per-sample, per-exit measurements of one model on one data split.

    Shapes: N samples, K exits, C classes.
    """

    meta: TraceMeta
    sample_id: np.ndarray  # [N] int64 or str (object)
    label: np.ndarray  # [N] int64, UNKNOWN_LABEL (-1) where not known
    probs: np.ndarray | LazyProbs  # [N, K, C] float32, rows sum to 1
    cost: np.ndarray  # [N, K] float64, cumulative cost (FLOPs) of reaching exit k
    latency_ms: np.ndarray | None = None  # [N, K] float64, cumulative measured wall-clock
    gate: np.ndarray | None = None  # [N, K] float32 in [0, 1], learned exit-gate score
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample columns, [N]
    # [N, K] float64 in [0, 1]: the exit's top-1 probability over the model's own outputs, when
    # the classes are coarser than those (per-token traces); it replaces max(probs)
    confidence: np.ndarray | None = None
    # the per-exit scores of a compact trace, whose ``probs`` stay in the file (LazyProbs)
    scores: ExitScores | None = None

    def __post_init__(self):
        validate(self)

    # --- sizes -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.probs.shape[0]

    @property
    def num_exits(self) -> int:
        return self.probs.shape[1]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[2]

    @property
    def is_compact(self) -> bool:
        """Read compactly (big): scores in memory, whole distributions in the file."""
        return self.scores is not None

    @cached_property
    def labelled(self) -> np.ndarray:
        """[N] bool: the samples with a known label."""
        return self.label != UNKNOWN_LABEL

    @cached_property
    def uniform_cost(self) -> np.ndarray | None:
        """[K] each exit's cost when every sample pays the same there (FLOPs of a fixed
        network), else None: then a policy's per-sample cost is a lookup, not a gather."""
        first = self.cost[0]
        return first.copy() if (self.cost == first).all() else None

    @cached_property
    def num_labelled(self) -> int:
        return int(self.labelled.sum())

    @cached_property
    def has_labels(self) -> bool:
        return bool(self.labelled.any())

    @cached_property
    def full_cost(self) -> float:
        """Mean cost of running every sample to the last exit (a strided column of a big
        ``cost``: milliseconds that no policy changes)."""
        return float(self.cost[:, -1].mean())

    # --- derived per-exit quantities [N, K] (computed once, traces are immutable) ------
    @cached_property
    def pred(self) -> np.ndarray:
        if self.scores is not None:
            return self.scores.pred
        return self.probs.argmax(axis=2)

    @cached_property
    def max_prob(self) -> np.ndarray:
        if self.confidence is not None:
            return self.confidence.astype(np.float64)
        if self.scores is not None:
            return self.scores.max_prob
        return max_prob_of(self.probs)

    @cached_property
    def entropy_norm(self) -> np.ndarray:
        self._whole_distribution("entropy")
        if self.scores is not None:
            return self.scores.entropy_norm
        return entropy_norm_of(self.probs)

    @cached_property
    def margin(self) -> np.ndarray:
        self._whole_distribution("the top-2 margin")
        if self.scores is not None:
            return self.scores.margin
        return margin_of(self.probs)

    def _whole_distribution(self, what: str) -> None:
        if self.confidence is not None:
            raise TraceError(
                "confidence",
                f"this trace holds only each exit's top-1 confidence; {what} needs the whole "
                "output distribution",
            )

    @cached_property
    def correct(self) -> np.ndarray:
        """[N, K] bool; all False for samples without a label."""
        return (self.pred == self.label[:, None]) & (self.label[:, None] != UNKNOWN_LABEL)

    @property
    def exit_cost(self) -> np.ndarray:
        """[K] mean cumulative cost of reaching each exit."""
        return self.cost.mean(axis=0)

    def subset(self, index: np.ndarray) -> Trace:
        """A new trace over the selected samples (bool mask or integer index)."""
        idx = np.asarray(index)
        return replace(
            self,
            sample_id=self.sample_id[idx],
            label=self.label[idx],
            probs=self.probs.take(idx) if self.is_compact else self.probs[idx],
            cost=self.cost[idx],
            latency_ms=None if self.latency_ms is None else self.latency_ms[idx],
            gate=None if self.gate is None else self.gate[idx],
            extra={k: v[idx] for k, v in self.extra.items()},
            confidence=None if self.confidence is None else self.confidence[idx],
            scores=None if self.scores is None else self.scores.subset(idx),
        )

    # --- (de)serialisation ---------------------------------------------------------------
    def to_frame(self) -> pl.DataFrame:
        n, k, c = self.probs.shape
        if self.is_compact:
            raise TraceError(
                "probs",
                "a compactly read trace is not written again: its file is the trace already",
            )
        cols: dict[str, pl.Series] = {
            "sample_id": pl.Series("sample_id", self.sample_id),
            "label": pl.Series("label", self.label, dtype=pl.Int64),
        }
        for e in range(k):
            for j in range(c):
                name = f"prob_e{e}_c{j}"
                cols[name] = pl.Series(name, self.probs[:, e, j], dtype=pl.Float32)
        for prefix, arr, dtype in (
            ("cost", self.cost, pl.Float64),
            ("latency", self.latency_ms, pl.Float64),
            ("gate", self.gate, pl.Float32),
            ("conf", self.confidence, pl.Float64),
        ):
            if arr is None:
                continue
            for e in range(k):
                cols[f"{prefix}_e{e}"] = pl.Series(f"{prefix}_e{e}", arr[:, e], dtype=dtype)
        for name, arr in self.extra.items():
            cols[f"extra.{name}"] = pl.Series(f"extra.{name}", arr)
        return pl.DataFrame(list(cols.values()))

    def write_parquet(self, path: str | Path) -> None:
        """Write atomically (temp file + rename) so a crash never leaves half a trace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        self.to_frame().write_parquet(tmp, metadata={META_KEY: self.meta.to_json()})
        tmp.replace(path)

    def to_parquet_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.to_frame().write_parquet(buf, metadata={META_KEY: self.meta.to_json()})
        return buf.getvalue()

    def to_csv_bytes(self) -> bytes:
        return self.to_frame().write_csv().encode()


# --- validation ------------------------------------------------------------------------------


def _finite(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise TraceError(
            name, f"contains NaN or infinity (first at index {tuple(int(i) for i in bad)})"
        )


def _check_probs(probs: np.ndarray, first_exit: int = 0) -> None:
    """Finite, in [0, 1], rows summing to 1; ``first_exit`` is the exit of ``probs[:, 0]``."""
    if not np.isfinite(probs).all():
        i, e, j = (int(v) for v in np.argwhere(~np.isfinite(probs))[0])
        raise TraceError(
            "probs", f"contains NaN or infinity (first at index {(i, e + first_exit, j)})"
        )
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise TraceError("probs", "probabilities must lie in [0, 1]")
    sums = probs.sum(axis=2, dtype=np.float64)
    if np.abs(sums - 1).max() > 1e-3:
        i, e = np.unravel_index(np.abs(sums - 1).argmax(), sums.shape)
        raise TraceError(
            "probs",
            f"rows must sum to 1 (sample {i}, exit {e + first_exit} sums to {sums[i, e]:.4f})",
        )


def validate(t: Trace) -> None:
    """Check shapes, dtypes, finiteness, probability rows, monotone cost and label range."""
    if not isinstance(t.meta, TraceMeta):
        raise TraceError("meta", "must be a TraceMeta")
    if t.scores is not None:
        _validate_compact(t)
        return
    if not isinstance(t.probs, np.ndarray) or t.probs.ndim != 3:
        raise TraceError("probs", "must be a 3-D array [samples, exits, classes]")
    n, k, c = t.probs.shape
    if n < 1:
        raise TraceError("probs", "the trace has no samples")
    if k < 1:
        raise TraceError("probs", "the trace has no exits")
    if c < 2:
        raise TraceError("probs", "at least two classes are needed")
    if not np.issubdtype(t.probs.dtype, np.floating):
        raise TraceError("probs", f"must be floating point, got {t.probs.dtype}")
    _check_probs(t.probs)
    _validate_names_ids_labels(t, n, k, c)
    _validate_per_sample(t, n, k, c)


def _validate_compact(t: Trace) -> None:
    """A compact trace: its probabilities were checked exit by exit while it was read."""
    if not isinstance(t.probs, LazyProbs):
        raise TraceError("probs", "a compact trace reads its probabilities from its file")
    n, k, c = t.probs.shape
    if n < 1:
        raise TraceError("probs", "the trace has no samples")
    for name in ("pred", "max_prob", "entropy_norm", "margin"):
        arr = getattr(t.scores, name)
        if arr is not None and (not isinstance(arr, np.ndarray) or arr.shape != (n, k)):
            raise TraceError(f"scores.{name}", f"must have shape ({n}, {k})")
    _validate_names_ids_labels(t, n, k, c)
    _validate_per_sample(t, n, k, c)


def _validate_names_ids_labels(t: Trace, n: int, k: int, c: int) -> None:
    if len(t.meta.exit_names) != k:
        raise TraceError("meta.exit_names", f"has {len(t.meta.exit_names)} names for {k} exits")
    if len(t.meta.class_names) != c:
        raise TraceError("meta.class_names", f"has {len(t.meta.class_names)} names for {c} classes")
    if not isinstance(t.sample_id, np.ndarray) or t.sample_id.shape != (n,):
        raise TraceError("sample_id", f"must have shape ({n},)")
    if not _unique(t.sample_id):
        raise TraceError("sample_id", "sample ids must be unique")
    if not isinstance(t.label, np.ndarray) or t.label.shape != (n,):
        raise TraceError("label", f"must have shape ({n},)")
    if not np.issubdtype(t.label.dtype, np.integer):
        raise TraceError("label", f"must be integers, got {t.label.dtype}")
    if ((t.label < UNKNOWN_LABEL) | (t.label >= c)).any():
        bad = t.label[(t.label < UNKNOWN_LABEL) | (t.label >= c)][0]
        raise TraceError("label", f"label {bad} is outside 0..{c - 1} (use -1 for unknown)")


def _unique(ids: np.ndarray) -> bool:
    """No id twice. Integer ids in increasing order (the usual 0..N-1) take one pass, other
    integers a sort: np.unique hashes, seconds on a million."""
    if np.issubdtype(ids.dtype, np.integer):
        if ids.size < 2 or bool((ids[1:] > ids[:-1]).all()):
            return True
        ordered = np.sort(ids)
        return not bool((ordered[1:] == ordered[:-1]).any())
    return len(np.unique(ids)) == ids.size


def _validate_per_sample(t: Trace, n: int, k: int, c: int) -> None:
    for name, arr, required in (("cost", t.cost, True), ("latency_ms", t.latency_ms, False)):
        if arr is None:
            if required:
                raise TraceError(name, "missing")
            continue
        if not isinstance(arr, np.ndarray) or arr.shape != (n, k):
            raise TraceError(name, f"must have shape ({n}, {k})")
        if not np.issubdtype(arr.dtype, np.number):
            raise TraceError(name, f"must be numeric, got {arr.dtype}")
        _finite(name, arr)
        if (arr < 0).any():
            raise TraceError(name, "must be non-negative")
        if k > 1 and (np.diff(arr, axis=1) < 0).any():
            i = int(np.argwhere(np.diff(arr, axis=1) < 0)[0, 0])
            raise TraceError(name, f"must be cumulative, non-decreasing over exits (sample {i})")
    if t.gate is not None:
        if not isinstance(t.gate, np.ndarray) or t.gate.shape != (n, k):
            raise TraceError("gate", f"must have shape ({n}, {k})")
        _finite("gate", t.gate)
        if t.gate.min() < 0 or t.gate.max() > 1:
            raise TraceError("gate", "gate scores must lie in [0, 1]")
    if t.confidence is not None:
        if not isinstance(t.confidence, np.ndarray) or t.confidence.shape != (n, k):
            raise TraceError("confidence", f"must have shape ({n}, {k})")
        if not np.issubdtype(t.confidence.dtype, np.floating):
            raise TraceError("confidence", f"must be floating point, got {t.confidence.dtype}")
        _finite("confidence", t.confidence)
        if t.confidence.min() < 0 or t.confidence.max() > 1:
            raise TraceError("confidence", "confidences must lie in [0, 1]")
    for name, arr in t.extra.items():
        if not isinstance(arr, np.ndarray) or arr.shape[:1] != (n,) or arr.ndim != 1:
            raise TraceError(f"extra.{name}", f"must be a 1-D array of length {n}")


# --- loading ---------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class _Layout:
    """Which column holds what, from the column names alone (no data read)."""

    kind: str  # "prob" or "logit"
    grid: dict[tuple[int, int], str]
    per_exit: dict[str, dict[int, str]]
    k: int
    c: int
    columns: tuple[str, ...]  # every column of the table but unused logits beside probs

    def exit_columns(self, e: int) -> list[str]:
        return [self.grid[(e, j)] for j in range(self.c)]

    @property
    def per_sample_columns(self) -> list[str]:
        """Every column but the probabilities: ids, labels, costs, gates, extras."""
        prob = set(self.grid.values())
        return [c for c in self.columns if c not in prob]


def _layout(columns: list[str]) -> _Layout:
    if "sample_id" not in columns:
        raise TraceError("sample_id", "column missing")
    prob_cols: dict[str, dict[tuple[int, int], str]] = {"prob": {}, "logit": {}}
    per_exit: dict[str, dict[int, str]] = {"cost": {}, "latency": {}, "gate": {}, "conf": {}}
    for col in columns:
        if m := _PROB_RE.match(col):
            prob_cols[m[1]][(int(m[2]), int(m[3]))] = col
        elif m := _PER_EXIT_RE.match(col):
            per_exit[m[1]][int(m[2])] = col
    kind = "prob" if prob_cols["prob"] else "logit"
    grid = prob_cols[kind]
    if not grid:
        raise TraceError("prob_e{k}_c{c}", "no probability or logit columns found")
    k = max(e for e, _ in grid) + 1
    c = max(j for _, j in grid) + 1
    missing = [f"{kind}_e{e}_c{j}" for e in range(k) for j in range(c) if (e, j) not in grid]
    if missing:
        raise TraceError(missing[0], f"column missing ({len(missing)} of the {k}x{c} grid absent)")
    other = prob_cols["logit"] if kind == "prob" else {}
    cols = tuple(col for col in columns if col not in other.values())
    return _Layout(kind, grid, per_exit, k, c, cols)


def _numeric(df: pl.DataFrame, col: str, dtype) -> np.ndarray:
    s = df[col]
    if s.null_count():
        raise TraceError(col, f"{s.null_count()} empty value(s)")
    if not s.dtype.is_numeric():
        raise TraceError(col, f"must be numeric, got {s.dtype}")
    return s.to_numpy().astype(dtype)


def _exit_probs(df: pl.DataFrame, lay: _Layout, exits: range) -> np.ndarray:
    """[N, len(exits), C] float32 probabilities of some exits (logits soft-maxed)."""
    raw = np.empty((df.height, len(exits), lay.c), dtype=np.float64)
    for i, e in enumerate(exits):
        for j in range(lay.c):
            raw[:, i, j] = _numeric(df, lay.grid[(e, j)], np.float64)
    if not np.isfinite(raw).all():
        i, e, j = (int(v) for v in np.argwhere(~np.isfinite(raw))[0])
        raise TraceError(
            f"{lay.kind}_e*_c*",
            f"contains NaN or infinity (first in column {lay.kind}_e{exits[e]}_c{j}, row {i})",
        )
    return raw.astype(np.float32) if lay.kind == "prob" else _softmax(raw)


def _per_sample(df: pl.DataFrame, lay: _Layout) -> dict:
    """Everything but the probabilities, as Trace keyword arguments."""
    n, k = df.height, lay.k
    if n == 0:
        raise TraceError("probs", "the trace has no samples")

    def stack(prefix: str, dtype, required: bool) -> np.ndarray | None:
        found = lay.per_exit[prefix]
        if not found:
            if required:
                raise TraceError(f"{prefix}_e0", "column missing")
            return None
        for e in range(k):
            if e not in found:
                raise TraceError(f"{prefix}_e{e}", "column missing")
        extra_cols = sorted(set(found) - set(range(k)))
        if extra_cols:
            raise TraceError(f"{prefix}_e{extra_cols[0]}", f"exit index beyond the {k} exits")
        return np.stack([_numeric(df, found[e], dtype) for e in range(k)], axis=1)

    cost = stack("cost", np.float64, required=True)
    latency = stack("latency", np.float64, required=False)
    gate = stack("gate", np.float32, required=False)
    confidence = stack("conf", np.float64, required=False)

    if "label" in df.columns:
        s = df["label"]
        if not (s.dtype.is_integer() or s.dtype == pl.Null or s.dtype.is_float()):
            raise TraceError("label", f"must be integers, got {s.dtype}")
        lab = s.cast(pl.Float64).fill_null(UNKNOWN_LABEL).to_numpy()
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise TraceError("label", "must be whole numbers")
        label = lab.astype(np.int64)
    else:
        label = np.full(n, UNKNOWN_LABEL, dtype=np.int64)

    sid = df["sample_id"]
    if sid.null_count():
        raise TraceError("sample_id", "empty sample ids")
    sample_id = (
        sid.to_numpy() if sid.dtype.is_integer() else sid.cast(pl.String).to_numpy().astype(object)
    )
    extra = {
        col[len("extra.") :]: df[col].to_numpy() for col in df.columns if col.startswith("extra.")
    }
    return {
        "sample_id": sample_id,
        "label": label,
        "cost": cost,
        "latency_ms": latency,
        "gate": gate,
        "extra": extra,
        "confidence": confidence,
    }


def from_frame(
    df: pl.DataFrame,
    meta: TraceMeta | None = None,
    name: str = "uploaded",
    header: dict | None = None,
) -> Trace:
    """Build and validate a trace from a wide table (see the module docstring).

    Without ``meta``, metadata comes from ``header`` (``parse_header``) and the columns.
    """
    lay = _layout(df.columns)
    if df.height == 0:
        raise TraceError("probs", "the trace has no samples")
    probs = _exit_probs(df, lay, range(lay.k))
    rest = _per_sample(df, lay)
    if meta is None:
        meta = _meta_from_header(header or {}, name, lay.k, lay.c)
    return Trace(meta=meta, probs=probs, **rest)


def scan(
    path: str | Path,
    meta: TraceMeta | None = None,
    name: str = "uploaded",
    header: dict | None = None,
) -> Trace:
    """A compact trace from a Parquet file: ``scan_parquet``, one exit's columns at a time.

    The per-sample columns are read once; then for each exit only its C probability columns
    are read, checked as ``validate`` checks them, turned into the scores the policies read
    and dropped, so memory holds [N, K] scores instead of [N, K, C] probabilities. A cost that
    every sample pays alike (FLOPs of a fixed network) is kept as one row broadcast to
    [N, K]: the same numbers, read-only, without 8 bytes per sample and exit.
    """
    lf = pl.scan_parquet(path)
    try:
        columns = lf.collect_schema().names()
        lay = _layout(columns)
        df = lf.select(lay.per_sample_columns).collect()
    except TraceError:
        raise
    except Exception as e:  # polars raises many types for corrupt files
        raise TraceError("file", f"not a readable Parquet file ({type(e).__name__})") from None
    rest = _per_sample(df, lay)
    n, k, c = df.height, lay.k, lay.c
    del df
    cost = rest["cost"]
    if (cost == cost[0]).all():  # a fixed network's FLOPs: one row, read-only, seen N times
        rest["cost"] = np.broadcast_to(cost[0].copy(), cost.shape)
    del cost
    if c < 2:
        raise TraceError("probs", "at least two classes are needed")
    # column-major: a policy reads the scores exit by exit (policies.first_true)
    pred = np.empty((n, k), dtype=np.int16 if c < 2**15 else np.int32, order="F")
    max_prob = np.empty((n, k), order="F")
    whole = rest["confidence"] is None
    entropy = np.empty((n, k), order="F") if whole else None
    margin = np.empty((n, k), order="F") if whole else None
    for e in range(k):
        try:
            part = lf.select(lay.exit_columns(e)).collect()
        except Exception as err:
            raise TraceError(
                "file", f"not a readable Parquet file ({type(err).__name__})"
            ) from None
        p = _exit_probs(part, lay, range(e, e + 1))
        del part
        _check_probs(p, first_exit=e)
        p = p[:, 0]
        pred[:, e] = p.argmax(axis=1)
        max_prob[:, e] = max_prob_of(p)
        if whole:
            entropy[:, e] = entropy_norm_of(p)
            margin[:, e] = margin_of(p)
    if meta is None:
        meta = _meta_from_header(header or {}, name, k, c)
    columns_kc = tuple(tuple(lay.exit_columns(e)) for e in range(k))
    probs = LazyProbs(path, columns_kc, lay.kind == "logit", n)
    scores = ExitScores(pred, max_prob, entropy, margin)
    return Trace(meta=meta, probs=probs, scores=scores, **rest)


# --- CSV header lines ------------------------------------------------------------------------

HEADER_KEYS = ("model_id", "dataset", "split", "cost_unit", "exit_names", "class_names")
_HEADER_RE = re.compile(r"^#\s*(?:aie\.)?([A-Za-z][\w.-]*)\s*:\s*(.*?)\s*$")


def parse_header(lines: list[str]) -> dict[str, str | tuple[str, ...]]:
    """Metadata from ``# key: value`` comment lines (``aie.`` before the key is allowed).

    Names are comma-separated, or a JSON list when a name holds a comma. Comment lines that are
    not ``# word: value`` are free text and ignored; an unknown key is refused, so that a typo
    (``# cost-unit: trees``) does not silently fall back to FLOPs.
    """
    out: dict[str, str | tuple[str, ...]] = {}
    for line in lines:
        m = _HEADER_RE.match(line.strip())
        if m is None:
            continue
        key, value = m[1], m[2]
        if key not in HEADER_KEYS:
            raise TraceError(
                f"# {key}", f"unknown CSV header key; the known ones are {', '.join(HEADER_KEYS)}"
            )
        if key in out:
            raise TraceError(key, "given twice in the CSV header")
        if key.endswith("_names"):
            out[key] = _names(key, value)
        elif not value:
            raise TraceError(key, "empty in the CSV header")
        else:
            out[key] = value
    return out


def _names(key: str, value: str) -> tuple[str, ...]:
    if value.startswith("["):
        try:
            names = json.loads(value)
        except json.JSONDecodeError as e:
            raise TraceError(key, f"not a valid JSON list ({e.msg})") from None
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise TraceError(key, "must be a JSON list of strings")
    else:
        names = [x.strip() for x in value.split(",")]
    if any(not x.strip() for x in names):
        raise TraceError(key, "has an empty name")
    if len(set(names)) != len(names):
        raise TraceError(key, "names must be unique")
    return tuple(names)


def _meta_from_header(header: dict, name: str, k: int, c: int) -> TraceMeta:
    """Metadata from the header, the rest inferred; name counts checked against the columns."""
    for key, count, what in (("exit_names", k, "exits"), ("class_names", c, "classes")):
        if key in header and len(header[key]) != count:
            raise TraceError(
                key,
                f"the header gives {len(header[key])} names for the {count} {what} in the columns",
            )
    return TraceMeta(
        model_id=header.get("model_id", name),
        exit_names=header.get("exit_names", tuple(f"exit {e}" for e in range(k))),
        class_names=header.get("class_names", tuple(str(j) for j in range(c))),
        dataset=header.get("dataset", "unknown"),
        split=header.get("split", "unknown"),
        cost_unit=header.get("cost_unit", "FLOPs"),
    )


def _leading_comments(data: bytes | io.IOBase) -> list[str]:
    """The ``#`` lines before the CSV header row (bytes, or a file open in binary mode)."""
    lines = []
    for raw in io.BytesIO(data) if isinstance(data, bytes) else data:
        if not raw.lstrip().startswith(b"#"):
            break
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError:
            raise TraceError("file", f"CSV header line {len(lines) + 1} is not UTF-8") from None
    return lines


def read_parquet(
    source: str | Path | bytes, name: str = "uploaded", lazy: bool | None = None
) -> Trace:
    """Read a trace from a Parquet path or bytes; any failure becomes a TraceError.

    ``lazy``: keep it compact (``scan``); None decides by size (``LAZY_MIN_CELLS``
    probabilities), for a path only: bytes were in memory anyway, and are read whole.
    """
    src = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        kv = pl.read_parquet_metadata(src)
        if isinstance(src, io.BytesIO):
            src.seek(0)
        if not isinstance(src, io.BytesIO) and lazy is None:
            lazy = _prob_cells(pl.scan_parquet(src)) >= LAZY_MIN_CELLS
        df = None if lazy else pl.read_parquet(src)
    except Exception as e:  # polars raises many types for corrupt files
        raise TraceError("file", f"not a readable Parquet file ({type(e).__name__})") from None
    meta = TraceMeta.from_json(kv[META_KEY]) if META_KEY in kv else None
    if df is None:
        if isinstance(src, io.BytesIO):
            raise TraceError("file", "only a file on disk can be read compactly")
        return scan(src, meta, name)
    return from_frame(df, meta, name)


def _prob_cells(lf: pl.LazyFrame) -> int:
    """N x (number of probability columns), from the file's footer (no data read)."""
    n_prob = sum(1 for c in lf.collect_schema().names() if _PROB_RE.match(c))
    return int(lf.select(pl.len()).collect().item()) * n_prob


def read_csv(source: str | Path | bytes, name: str = "uploaded", lazy: bool | None = None) -> Trace:
    """Read a CSV trace; leading ``# key: value`` lines are its metadata (``parse_header``).

    ``lazy`` (a path only; None: when the file is over ``LAZY_CSV_BYTES``): stream the CSV into
    a Parquet file in the temporary folder (``sink_parquet``, never whole in memory) and read
    that compactly.
    """
    if isinstance(source, bytes):
        data, lazy = source, False
        comments = _leading_comments(data)
    else:
        path = Path(source)
        with path.open("rb") as f:
            comments = _leading_comments(f)
        if lazy is None:
            lazy = path.stat().st_size > LAZY_CSV_BYTES
        data = None if lazy else path.read_bytes()
    header = parse_header(comments)
    if lazy:
        return _scan_csv(path, len(comments), name, header)
    try:
        df = pl.read_csv(io.BytesIO(data), infer_schema_length=10_000, skip_lines=len(comments))
    except Exception as e:
        raise TraceError("file", f"not a readable CSV file ({type(e).__name__})") from None
    return from_frame(df, None, name, header)


def _scan_csv(path: Path, skip: int, name: str, header: dict) -> Trace:
    """A big CSV streamed into Parquet, then read compactly (its probabilities stay in that
    file). The Parquet is kept in the cache folder under the CSV's path, size and time, so
    loading the same file again reuses it instead of leaving one more copy behind."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{skip}".encode())
    out = cache_dir() / "csv_traces" / f"{path.stem}-{key.hexdigest()[:16]}.parquet"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="aie-trace-", dir=out.parent)) / out.name
        try:
            pl.scan_csv(path, skip_lines=skip, infer_schema_length=10_000).sink_parquet(tmp)
            tmp.replace(out)
        except Exception as e:
            raise TraceError("file", f"not a readable CSV file ({type(e).__name__})") from None
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    return scan(out, None, name, header)


def read(
    path_or_bytes: str | Path | bytes, filename: str | None = None, lazy: bool | None = None
) -> Trace:
    """Read a trace, choosing Parquet or CSV by file name (or by magic bytes for bytes).

    ``lazy`` as in ``read_parquet``/``read_csv``: compact, whole, or (None) by size.
    """
    if isinstance(path_or_bytes, bytes):
        name = Path(filename or "uploaded").stem
        suffix = Path(filename or "").suffix.lower()
        if suffix in (".parquet", ".pq") or (not suffix and path_or_bytes[:4] == b"PAR1"):
            return read_parquet(path_or_bytes, name)
        if suffix == ".csv" or not suffix:
            return read_csv(path_or_bytes, name)
        raise TraceError("file", f"expected a .parquet or .csv file, got {suffix!r}")
    p = Path(path_or_bytes)
    if p.suffix.lower() == ".csv":
        return read_csv(p, p.stem, lazy)
    return read_parquet(p, p.stem, lazy)
