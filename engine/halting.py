"""Halting records: what the ACT model did on its test strings, and the sweeps over eps.

The halting scores h^n of an ACT model do not depend on eps (see ``engine.models.act``), so the
test set is unrolled once to the maximum number of steps and stored:

    assets/traces/records/<model_id>__test.parquet
        sample_id, length (non-zero entries = difficulty), label, bits ("+-0" string),
        h_0 .. h_{M-1} (halting score of each step), q{c}_0 .. (step output probability of
        class c), steps / remainder / pred / flops of the real run at the trained eps

and any eps is evaluated from these with ``engine.models.act.outputs_at`` (pure numpy). FLOPs at
other eps are steps x the per-step FLOPs counted by torch (``flops_per_step`` in the metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.models.act import halting_distribution, outputs_at
from engine.trace_store import TRACES_DIR

RECORDS_DIR = TRACES_DIR / "records"
META_KEY = "aie.halt_records"
EPS_GRID = np.round(np.r_[0.0, 0.001, 0.005, np.arange(0.01, 0.5, 0.01), 0.5, 0.7, 0.9], 4)


def records_file(model_id: str, split: str = "test", root: Path | None = None) -> Path:
    return (root or RECORDS_DIR) / f"{model_id}__{split}.parquet"


def _bits_string(x: np.ndarray) -> list[str]:
    table = np.array(["-", "0", "+"])
    return ["".join(row) for row in table[(np.sign(x).astype(int) + 1)]]


def write_records(model, model_id, x, y, length, traces_dir=None, tau=None) -> Path:
    """Unroll every test string M steps, run real ACT at the trained eps, write the table."""
    from engine.models import act

    rec_dir = (Path(traces_dir) if traces_dir is not None else TRACES_DIR) / "records"
    rec_dir.mkdir(parents=True, exist_ok=True)
    h, q = act.halting_scores(model, x)
    real = act.run_act(model, x)
    cols = {
        "sample_id": np.arange(len(y), dtype=np.int32),
        "length": length.astype(np.int16),
        "label": y.astype(np.int8),
        "bits": _bits_string(x),
        "steps": real["steps"].astype(np.int16),
        "remainder": real["remainder"].astype(np.float64),
        "pred": real["pred"].astype(np.int8),
        "flops": real["flops"].astype(np.float64),
    }
    for n in range(h.shape[1]):
        cols[f"h_{n}"] = h[:, n].astype(np.float64)
    for c in range(q.shape[2]):
        for n in range(q.shape[1]):
            cols[f"q{c}_{n}"] = q[:, n, c].astype(np.float64)
    meta = {
        "model_id": model_id,
        "eps": model.config.eps,
        "tau": tau,
        "max_steps": model.config.max_steps,
        "num_bits": model.config.num_bits,
        "class_names": ["even", "odd"],
        "flops_per_step": act.step_flops(model),
        "difficulty": "length: number of non-zero entries of the string",
    }
    path = records_file(model_id, root=rec_dir)
    tmp = path.with_suffix(".parquet.tmp")
    pl.DataFrame(cols).write_parquet(tmp, compression="zstd", metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class HaltRecords:
    model_id: str
    sample_id: np.ndarray  # [N]
    length: np.ndarray  # [N] difficulty
    label: np.ndarray  # [N]
    bits: np.ndarray  # [N] str
    h: np.ndarray  # [N, M] float64 halting scores, every step unrolled
    step_probs: np.ndarray  # [N, M, C] float64
    steps: np.ndarray  # [N] real run at meta["eps"]
    remainder: np.ndarray  # [N]
    pred: np.ndarray  # [N]
    flops: np.ndarray  # [N] counted by torch in the real run
    meta: dict

    @property
    def eps(self) -> float:
        return float(self.meta["eps"])

    @property
    def max_steps(self) -> int:
        return self.h.shape[1]


def load_records(model_id: str, split: str = "test", root: Path | None = None) -> HaltRecords:
    path = records_file(model_id, split, root)
    if not path.exists():
        raise FileNotFoundError(f"no halting records for {model_id} ({split}) at {path}")
    df = pl.read_parquet(path).sort("sample_id")
    meta = json.loads(pl.read_parquet_metadata(path).get(META_KEY, "{}"))
    m = len([c for c in df.columns if c.startswith("h_")])
    c = len([col for col in df.columns if col.startswith("q") and col.endswith("_0")])
    h = np.stack([df[f"h_{n}"].to_numpy() for n in range(m)], 1)
    q = np.stack([np.stack([df[f"q{k}_{n}"].to_numpy() for n in range(m)], 1) for k in range(c)], 2)
    return HaltRecords(
        model_id=model_id,
        sample_id=df["sample_id"].to_numpy().astype(np.int64),
        length=df["length"].to_numpy().astype(np.int64),
        label=df["label"].to_numpy().astype(np.int64),
        bits=df["bits"].to_numpy(),
        h=h.astype(np.float64),
        step_probs=q.astype(np.float64),
        steps=df["steps"].to_numpy().astype(np.int64),
        remainder=df["remainder"].to_numpy(),
        pred=df["pred"].to_numpy().astype(np.int64),
        flops=df["flops"].to_numpy(),
        meta=meta,
    )


# --- evaluation at any eps (pure numpy) ----------------------------------------------------


@dataclass(frozen=True)
class AtEps:
    eps: float
    steps: np.ndarray  # [N]
    remainder: np.ndarray  # [N]
    ponder_cost: np.ndarray  # [N] N + R
    probs: np.ndarray  # [N, C]
    pred: np.ndarray  # [N]
    correct: np.ndarray  # [N] bool
    flops: np.ndarray  # [N] steps x per-step FLOPs

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def at_eps(rec: HaltRecords, eps: float) -> AtEps:
    steps, remainder, ponder, probs = outputs_at(rec.h, rec.step_probs, eps)
    pred = probs.argmax(1)
    return AtEps(
        eps=float(eps),
        steps=steps,
        remainder=remainder,
        ponder_cost=ponder,
        probs=probs,
        pred=pred,
        correct=pred == rec.label,
        flops=steps * float(rec.meta.get("flops_per_step", 1.0)),
    )


def cumulative_halting(rec: HaltRecords, i: int, eps: float) -> tuple[np.ndarray, int, float]:
    """One input's (cumulative halting incl. remainder [M], steps N, remainder R) at eps."""
    steps, remainder, p = halting_distribution(rec.h[i], eps)
    return np.cumsum(p), int(steps), float(remainder)


@dataclass(frozen=True)
class EpsSweep:
    eps: np.ndarray
    accuracy: np.ndarray
    mean_steps: np.ndarray
    mean_ponder_cost: np.ndarray
    mean_flops: np.ndarray


def eps_sweep(rec: HaltRecords, eps_grid: np.ndarray = EPS_GRID) -> EpsSweep:
    """Accuracy and compute at every eps of the grid (all inputs at once per eps)."""
    rows = [at_eps(rec, e) for e in eps_grid]
    return EpsSweep(
        eps=np.asarray(eps_grid, dtype=np.float64),
        accuracy=np.array([r.accuracy for r in rows]),
        mean_steps=np.array([r.steps.mean() for r in rows]),
        mean_ponder_cost=np.array([r.ponder_cost.mean() for r in rows]),
        mean_flops=np.array([r.flops.mean() for r in rows]),
    )


def steps_by_difficulty(rec: HaltRecords, steps: np.ndarray, correct: np.ndarray):
    """Per length L: (lengths, mean steps, std of steps, accuracy, count)."""
    lengths = np.unique(rec.length)
    mean = np.array([steps[rec.length == k].mean() for k in lengths])
    std = np.array([steps[rec.length == k].std() for k in lengths])
    acc = np.array([correct[rec.length == k].mean() for k in lengths])
    count = np.array([(rec.length == k).sum() for k in lengths])
    return lengths, mean, std, acc, count


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties (NaN if either is constant)."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inv, weights=r) / counts)[inv]

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
