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
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

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
    probs: np.ndarray  # [N, K, C] float32, rows sum to 1
    cost: np.ndarray  # [N, K] float64, cumulative cost (FLOPs) of reaching exit k
    latency_ms: np.ndarray | None = None  # [N, K] float64, cumulative measured wall-clock
    gate: np.ndarray | None = None  # [N, K] float32 in [0, 1], learned exit-gate score
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample columns, [N]
    # [N, K] float64 in [0, 1]: the exit's top-1 probability over the model's own outputs, when
    # the classes are coarser than those (per-token traces); it replaces max(probs)
    confidence: np.ndarray | None = None

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
    def has_labels(self) -> bool:
        return bool((self.label != UNKNOWN_LABEL).any())

    # --- derived per-exit quantities [N, K] (computed once, traces are immutable) ------
    @cached_property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=2)

    @cached_property
    def max_prob(self) -> np.ndarray:
        if self.confidence is not None:
            return self.confidence.astype(np.float64)
        return max_prob_of(self.probs)

    @cached_property
    def entropy_norm(self) -> np.ndarray:
        self._whole_distribution("entropy")
        return entropy_norm_of(self.probs)

    @cached_property
    def margin(self) -> np.ndarray:
        self._whole_distribution("the top-2 margin")
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
            probs=self.probs[idx],
            cost=self.cost[idx],
            latency_ms=None if self.latency_ms is None else self.latency_ms[idx],
            gate=None if self.gate is None else self.gate[idx],
            extra={k: v[idx] for k, v in self.extra.items()},
            confidence=None if self.confidence is None else self.confidence[idx],
        )

    # --- (de)serialisation ---------------------------------------------------------------
    def to_frame(self) -> pl.DataFrame:
        n, k, c = self.probs.shape
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


def validate(t: Trace) -> None:
    """Check shapes, dtypes, finiteness, probability rows, monotone cost and label range."""
    if not isinstance(t.meta, TraceMeta):
        raise TraceError("meta", "must be a TraceMeta")
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
    _finite("probs", t.probs)
    if t.probs.min() < -1e-6 or t.probs.max() > 1 + 1e-6:
        raise TraceError("probs", "probabilities must lie in [0, 1]")
    sums = t.probs.sum(axis=2, dtype=np.float64)
    if np.abs(sums - 1).max() > 1e-3:
        i, e = np.unravel_index(np.abs(sums - 1).argmax(), sums.shape)
        raise TraceError(
            "probs", f"rows must sum to 1 (sample {i}, exit {e} sums to {sums[i, e]:.4f})"
        )
    if len(t.meta.exit_names) != k:
        raise TraceError("meta.exit_names", f"has {len(t.meta.exit_names)} names for {k} exits")
    if len(t.meta.class_names) != c:
        raise TraceError("meta.class_names", f"has {len(t.meta.class_names)} names for {c} classes")
    if not isinstance(t.sample_id, np.ndarray) or t.sample_id.shape != (n,):
        raise TraceError("sample_id", f"must have shape ({n},)")
    if len(np.unique(t.sample_id)) != n:
        raise TraceError("sample_id", "sample ids must be unique")
    if not isinstance(t.label, np.ndarray) or t.label.shape != (n,):
        raise TraceError("label", f"must have shape ({n},)")
    if not np.issubdtype(t.label.dtype, np.integer):
        raise TraceError("label", f"must be integers, got {t.label.dtype}")
    if ((t.label < UNKNOWN_LABEL) | (t.label >= c)).any():
        bad = t.label[(t.label < UNKNOWN_LABEL) | (t.label >= c)][0]
        raise TraceError("label", f"label {bad} is outside 0..{c - 1} (use -1 for unknown)")
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


def from_frame(
    df: pl.DataFrame,
    meta: TraceMeta | None = None,
    name: str = "uploaded",
    header: dict | None = None,
) -> Trace:
    """Build and validate a trace from a wide table (see the module docstring).

    Without ``meta``, metadata comes from ``header`` (``parse_header``) and the columns.
    """
    cols = set(df.columns)
    if "sample_id" not in cols:
        raise TraceError("sample_id", "column missing")
    prob_cols: dict[str, dict[tuple[int, int], str]] = {"prob": {}, "logit": {}}
    per_exit: dict[str, dict[int, str]] = {"cost": {}, "latency": {}, "gate": {}, "conf": {}}
    for col in df.columns:
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
    n = df.height
    if n == 0:
        raise TraceError("probs", "the trace has no samples")

    def numeric(col: str, dtype) -> np.ndarray:
        s = df[col]
        if s.null_count():
            raise TraceError(col, f"{s.null_count()} empty value(s)")
        if not s.dtype.is_numeric():
            raise TraceError(col, f"must be numeric, got {s.dtype}")
        return s.to_numpy().astype(dtype)

    raw = np.empty((n, k, c), dtype=np.float64)
    for (e, j), col in grid.items():
        raw[:, e, j] = numeric(col, np.float64)
    if not np.isfinite(raw).all():
        i, e, j = (int(v) for v in np.argwhere(~np.isfinite(raw))[0])
        raise TraceError(
            f"{kind}_e*_c*",
            f"contains NaN or infinity (first in column {kind}_e{e}_c{j}, row {i})",
        )
    probs = raw.astype(np.float32) if kind == "prob" else _softmax(raw)

    def stack(prefix: str, dtype, required: bool) -> np.ndarray | None:
        found = per_exit[prefix]
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
        return np.stack([numeric(found[e], dtype) for e in range(k)], axis=1)

    cost = stack("cost", np.float64, required=True)
    latency = stack("latency", np.float64, required=False)
    gate = stack("gate", np.float32, required=False)
    confidence = stack("conf", np.float64, required=False)

    if "label" in cols:
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
    if meta is None:
        meta = _meta_from_header(header or {}, name, k, c)
    return Trace(meta, sample_id, label, probs, cost, latency, gate, extra, confidence)


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


def _leading_comments(data: bytes) -> list[str]:
    """The ``#`` lines before the CSV header row."""
    lines = []
    for raw in io.BytesIO(data):
        if not raw.lstrip().startswith(b"#"):
            break
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError:
            raise TraceError("file", f"CSV header line {len(lines) + 1} is not UTF-8") from None
    return lines


def read_parquet(source: str | Path | bytes, name: str = "uploaded") -> Trace:
    """Read a trace from a Parquet path or bytes; any failure becomes a TraceError."""
    src = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        kv = pl.read_parquet_metadata(src)
        if isinstance(src, io.BytesIO):
            src.seek(0)
        df = pl.read_parquet(src)
    except Exception as e:  # polars raises many types for corrupt files
        raise TraceError("file", f"not a readable Parquet file ({type(e).__name__})") from None
    meta = TraceMeta.from_json(kv[META_KEY]) if META_KEY in kv else None
    return from_frame(df, meta, name)


def read_csv(source: str | Path | bytes, name: str = "uploaded") -> Trace:
    """Read a CSV trace; leading ``# key: value`` lines are its metadata (``parse_header``)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    comments = _leading_comments(data)
    header = parse_header(comments)
    try:
        df = pl.read_csv(io.BytesIO(data), infer_schema_length=10_000, skip_lines=len(comments))
    except Exception as e:
        raise TraceError("file", f"not a readable CSV file ({type(e).__name__})") from None
    return from_frame(df, None, name, header)


def read(path_or_bytes: str | Path | bytes, filename: str | None = None) -> Trace:
    """Read a trace, choosing Parquet or CSV by file name (or by magic bytes for bytes)."""
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
        return read_csv(p, p.stem)
    return read_parquet(p, p.stem)
