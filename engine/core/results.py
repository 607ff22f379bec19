"""The per-sample results every family produces: what each input cost and got, per setting.

A family's knob (an exit threshold, ACT's ε, PonderNet's q, a skip-gate threshold, D2DMoE's τ)
is swept over S settings on N shared samples; for each (setting, sample) the results hold the
compute spent, the prediction and whether it was right, plus the family's own per-sample detail
(exit taken, blocks run, steps, experts per token). The compare page, the halting page and the
results CLI read only this type, so a new family needs no code there.

The multi-exit ``Trace`` stays its own type: it holds every exit's probabilities, from which any
exit policy can be evaluated, which per-setting rows would lose. ``from_trace`` turns a trace
into results over its max-probability threshold.

On disk: Parquet, one row per (setting, sample), the metadata as JSON under ``aie.results``:

    setting, sample_id, label, cost, full_cost, correct, [pred], [latency_ms],
    [detail.<name> ...], [extra.<name> ...]
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from engine.core.policies import exit_index
from engine.core.trace import Trace, TraceError
from engine.core.tradeoff import curve

META_KEY = "aie.results"


@dataclass(frozen=True)
class Results:
    """Per-sample compute and correctness of one model at each of S settings of its knob."""

    name: str  # what the app calls it ("early exit (CNN)", "pondering (ACT)")
    setting: str  # the knob's name ("threshold", "eps", "q", "tau", ...)
    settings: np.ndarray  # [S] float64
    sample_id: np.ndarray  # [N]
    label: np.ndarray  # [N] int64, -1 when unknown
    cost: np.ndarray  # [S, N] compute spent, in meta["cost_unit"]
    full_cost: np.ndarray  # [N] compute of the full (static) model on the sample
    correct: np.ndarray  # [S, N] bool
    pred: np.ndarray | None = None  # [S, N] int64
    latency_ms: np.ndarray | None = None  # [S, N] measured, where known
    detail: dict[str, np.ndarray] = field(default_factory=dict)  # [S, N] each
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # [N] each (difficulty, ...)
    meta: dict = field(default_factory=dict)  # model_id, family, dataset, split, cost_unit

    def __post_init__(self):
        validate(self)

    @classmethod
    def from_fractions(cls, name, setting, sample_id, label, settings, cost_fraction, correct):
        """Results whose cost is already a fraction of the full model (full cost 1)."""
        frac = np.asarray(cost_fraction, dtype=np.float64)
        return cls(
            name,
            setting,
            np.asarray(settings, dtype=np.float64),
            np.asarray(sample_id),
            np.asarray(label, dtype=np.int64),
            frac,
            np.ones(frac.shape[1]),
            np.asarray(correct, dtype=bool),
            meta={"cost_unit": "× full"},
        )

    @classmethod
    def from_runs(
        cls,
        name: str,
        setting: str,
        settings,
        sample_id,
        label,
        runs,
        full_cost: float,
        detail: tuple[str, ...] = ("steps",),
        extra: dict | None = None,
        meta: dict | None = None,
    ) -> Results:
        """Results from one evaluation per setting, each with per-sample ``flops``, ``correct``,
        ``pred`` and the ``detail`` attributes (a halting model's evaluation at each eps or q)."""
        label = np.asarray(label, dtype=np.int64)
        return cls(
            name,
            setting,
            np.asarray(settings, dtype=np.float64),
            np.asarray(sample_id),
            label,
            np.stack([r.flops for r in runs]).astype(np.float64),
            np.full(len(label), float(full_cost)),
            np.stack([r.correct for r in runs]),
            np.stack([r.pred for r in runs]).astype(np.int64),
            detail={d.replace("_", " "): np.stack([getattr(r, d) for r in runs]) for d in detail},
            extra=extra or {},
            meta=meta or {},
        )

    @property
    def num_settings(self) -> int:
        return len(self.settings)

    @property
    def num_samples(self) -> int:
        return len(self.sample_id)

    @property
    def cost_fraction(self) -> np.ndarray:
        """[S, N] compute spent / the full model's compute on that sample."""
        return self.cost / np.maximum(self.full_cost, 1e-300)[None, :]

    @property
    def mean_fraction(self) -> np.ndarray:
        return self.cost_fraction.mean(axis=1)

    @property
    def mean_cost(self) -> np.ndarray:
        return self.cost.mean(axis=1)

    @property
    def accuracy(self) -> np.ndarray:
        lab = self.label >= 0
        if not lab.any():
            return np.full(self.num_settings, np.nan)
        return self.correct[:, lab].mean(axis=1)

    def take(self, idx: np.ndarray) -> Results:
        """The results of samples ``idx`` only, in that order."""

        def cols(a):
            return None if a is None else a[:, idx]

        return Results(
            self.name,
            self.setting,
            self.settings,
            self.sample_id[idx],
            self.label[idx],
            self.cost[:, idx],
            self.full_cost[idx],
            self.correct[:, idx],
            cols(self.pred),
            cols(self.latency_ms),
            {k: v[:, idx] for k, v in self.detail.items()},
            {k: v[idx] for k, v in self.extra.items()},
            self.meta,
        )

    def index_of(self, value: float) -> int:
        """The setting nearest to ``value``."""
        return int(np.argmin(np.abs(self.settings - float(value))))

    # --- persistence ------------------------------------------------------------------------

    def to_frame(self) -> pl.DataFrame:
        s, n = self.cost.shape
        cols = {
            "setting": np.repeat(self.settings, n),
            "sample_id": np.tile(self.sample_id, s),
            "label": np.tile(self.label, s),
            "cost": self.cost.reshape(-1),
            "full_cost": np.tile(self.full_cost, s),
            "correct": self.correct.reshape(-1),
        }
        if self.pred is not None:
            cols["pred"] = self.pred.reshape(-1)
        if self.latency_ms is not None:
            cols["latency_ms"] = self.latency_ms.reshape(-1)
        cols |= {f"detail.{k}": v.reshape(-1) for k, v in self.detail.items()}
        cols |= {f"extra.{k}": np.tile(v, s) for k, v in self.extra.items()}
        return pl.DataFrame(cols)

    def write_parquet(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "name": self.name, "setting_name": self.setting}
        self.to_frame().write_parquet(path, metadata={META_KEY: json.dumps(meta)})
        return path


def validate(r: Results) -> None:
    """Shapes, dtypes and values; raises ``TraceError`` naming the offending field."""
    s, n = len(r.settings), len(r.sample_id)
    if s == 0 or n == 0:
        raise TraceError(
            "settings" if s == 0 else "sample_id", "results need ≥ 1 setting and sample"
        )
    for name in ("cost", "correct"):
        if getattr(r, name).shape != (s, n):
            raise TraceError(name, f"shape {getattr(r, name).shape}, expected {(s, n)}")
    for name in ("pred", "latency_ms"):
        a = getattr(r, name)
        if a is not None and a.shape != (s, n):
            raise TraceError(name, f"shape {a.shape}, expected {(s, n)}")
    if r.label.shape != (n,) or r.full_cost.shape != (n,):
        raise TraceError(
            "label" if r.label.shape != (n,) else "full_cost", "must have one per sample"
        )
    if not (np.isfinite(r.cost).all() and (r.cost >= 0).all()):
        raise TraceError("cost", "must be finite and non-negative")
    if not (np.isfinite(r.full_cost).all() and (r.full_cost > 0).all()):
        raise TraceError("full_cost", "must be finite and positive")
    if len(np.unique(r.sample_id)) != n:
        raise TraceError("sample_id", "sample ids must be unique")
    for k, v in r.detail.items():
        if v.shape != (s, n):
            raise TraceError(f"detail.{k}", f"shape {v.shape}, expected {(s, n)}")
    for k, v in r.extra.items():
        if v.shape != (n,):
            raise TraceError(f"extra.{k}", f"shape {v.shape}, expected ({n},)")


def read_parquet(source: str | Path | bytes) -> Results:
    """Results written by ``write_parquet``; a bad file raises ``TraceError`` naming the field."""
    src = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        raw = pl.read_parquet_metadata(src).get(META_KEY)
        if isinstance(src, io.BytesIO):
            src.seek(0)
        df = pl.read_parquet(src)
        meta = json.loads(raw) if raw else {}
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise TraceError("file", f"not readable results ({e})") from None
    for col in ("setting", "sample_id", "label", "cost", "full_cost", "correct"):
        if col not in df.columns:
            raise TraceError(col, "column missing")
    df = df.sort(["setting", "sample_id"], maintain_order=True)
    settings = np.unique(df["setting"].to_numpy())
    s = len(settings)
    if df.height % s:
        raise TraceError("setting", "every setting must cover the same samples")
    n = df.height // s

    def grid(col, dtype=None):
        a = df[col].to_numpy().reshape(s, n)
        return a if dtype is None else a.astype(dtype)

    first = df.head(n)
    return Results(
        meta.pop("name", "results"),
        meta.pop("setting_name", "setting"),
        settings.astype(np.float64),
        first["sample_id"].to_numpy(),
        first["label"].to_numpy().astype(np.int64),
        grid("cost", np.float64),
        first["full_cost"].to_numpy().astype(np.float64),
        grid("correct", bool),
        grid("pred", np.int64) if "pred" in df.columns else None,
        grid("latency_ms", np.float64) if "latency_ms" in df.columns else None,
        {c[7:]: grid(c) for c in df.columns if c.startswith("detail.")},
        {c[6:]: first[c].to_numpy() for c in df.columns if c.startswith("extra.")},
        meta,
    )


def from_trace(trace: Trace, name: str, kind: str = "max_prob", points: int = 101) -> Results:
    """Early exit (or a cascade) over its threshold: ``points`` settings spread evenly over the
    attainable budgets, each the exact curve's point nearest that budget; the exit taken is the
    detail."""
    c = curve(trace, kind)
    targets = np.linspace(c.mean_cost.min(), c.mean_cost.max(), points)
    pick = np.unique(np.abs(c.mean_cost[None, :] - targets[:, None]).argmin(axis=1))
    rows = np.arange(trace.num_samples)[None, :]
    exits = np.stack([exit_index(trace, c.policy(int(i))) for i in pick])  # [S, N]
    full = trace.cost[:, -1]
    return Results(
        name,
        f"{kind} threshold",
        np.asarray(c.params[pick], dtype=np.float64),
        trace.sample_id,
        trace.label,
        trace.cost[rows, exits],
        np.where(full > 0, full, 1.0),
        trace.correct[rows, exits],
        trace.pred[rows, exits].astype(np.int64),
        None if trace.latency_ms is None else trace.latency_ms[rows, exits],
        {"exit": exits},
        {},
        {
            "model_id": trace.meta.model_id,
            "dataset": trace.meta.dataset,
            "split": trace.meta.split,
            "cost_unit": trace.meta.cost_unit,
        },
    )


@dataclass(frozen=True)
class At:
    """One setting's per-sample view of ``Results``."""

    value: float
    cost: np.ndarray  # [N]
    correct: np.ndarray  # [N]
    pred: np.ndarray | None  # [N]
    detail: dict[str, np.ndarray]  # [N] each

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def at(r: Results, value: float) -> At:
    """The results at the setting nearest ``value``."""
    i = r.index_of(value)
    return At(
        float(r.settings[i]),
        r.cost[i],
        r.correct[i],
        None if r.pred is None else r.pred[i],
        {k: v[i] for k, v in r.detail.items()},
    )


def summary_table(rows: list[tuple[Results, float]], steps: str = "steps") -> pl.DataFrame:
    """One row per model at one setting each: accuracy, mean of the ``steps`` detail and its
    Spearman correlation with the results' difficulty (where they have one)."""
    from engine.core.stats import spearman

    out = []
    for r, value in rows:
        a = at(r, value)
        diff = r.extra.get("difficulty")
        out.append(
            {
                "model": r.meta.get("model_id", r.name),
                "method": r.name,
                "trained with": r.meta.get("trained_with", ""),
                "setting": f"{r.setting} = {a.value:g}",
                "accuracy": round(a.accuracy, 4),
                f"mean {steps}": round(float(a.detail[steps].mean()), 3),
                f"Spearman({steps}, difficulty)": None
                if diff is None
                else round(spearman(a.detail[steps], diff), 3),
            }
        )
    return pl.DataFrame(out)
