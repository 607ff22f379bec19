"""PonderNet records: every test string unrolled once, then evaluated at any q in numpy.

The halting scores lam^n do not depend on the threshold q (see ``model.py``), so one unroll of
the test set to M steps holds every answer the model can give:

    assets/traces/records/<model_id>__test.parquet
        sample_id, label, difficulty (the string's length: its number of non-zero entries),
        bits ("+-0" string), lam_0 .. lam_{M-1} (halting scores), q{c}_0 .. q{c}_{M-1} (step
        output probability of class c), steps / pred / flops of the real run at the card's q

with the model id, q, M, and the per-step and encoder FLOPs (counted by torch) as JSON metadata.
``at_q`` evaluates a threshold, ``at_sample`` the sampled halting, ``q_sweep`` a grid of q; FLOPs
away from the real run are encoder FLOPs + steps x per-step FLOPs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.families.act.records import _bits_string, records_file
from engine.families.pondernet.model import (
    expected_steps,
    halting_distribution,
    sampled_steps,
    threshold_steps,
)
from engine.paths import RECORDS_DIR

META_KEY = "aie.ponder_records"
Q_GRID = np.round(np.r_[0.01, 0.05, np.arange(0.1, 0.95, 0.05), 0.95, 0.99], 4)


def write_records(
    model, model_id: str, x, y, length, traces_dir: Path | None = None, **meta
) -> Path:
    """Unroll the strings M steps, run the model for real at its q, write both (+ ``meta``)."""
    from engine.families.act.model import encode_flops, step_flops
    from engine.families.pondernet import model as pn

    rec_dir = Path(traces_dir) / "records" if traces_dir is not None else RECORDS_DIR
    rec_dir.mkdir(parents=True, exist_ok=True)
    lam, probs = pn.halting_scores(model, x)
    real = pn.run(model, x)
    cols = {
        "sample_id": np.arange(len(y), dtype=np.int32),
        "label": np.asarray(y).astype(np.int8),
        "difficulty": np.asarray(length).astype(np.int16),
        "bits": _bits_string(np.asarray(x)),
        "steps": real.steps.astype(np.int16),
        "pred": real.pred.astype(np.int8),
        "flops": real.flops.astype(np.float64),
    }
    # float32 is what the model computes lam in, so the stored scores are exact
    for n in range(lam.shape[1]):
        cols[f"lam_{n}"] = lam[:, n].astype(np.float32)
    for c in range(probs.shape[2]):
        for n in range(probs.shape[1]):
            cols[f"q{c}_{n}"] = probs[:, n, c].astype(np.float32)
    meta = {
        "model_id": model_id,
        "q": model.config.q,
        "max_steps": model.config.max_steps,
        "num_bits": model.config.num_bits,
        "flops_per_step": step_flops(model),
        "encode_flops": encode_flops(model),
        "class_names": ["even", "odd"],
        "difficulty": "length: number of non-zero entries of the string",
        **meta,
    }
    path = records_file(model_id, root=rec_dir)
    tmp = path.with_suffix(".parquet.tmp")
    pl.DataFrame(cols).write_parquet(tmp, compression="zstd", metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class PonderRecords:
    model_id: str
    sample_id: np.ndarray  # [N]
    label: np.ndarray  # [N]
    difficulty: np.ndarray  # [N] string length
    bits: np.ndarray  # [N] str
    lam: np.ndarray  # [N, M] float64 halting scores, every step unrolled
    step_probs: np.ndarray  # [N, M, C] float64
    steps: np.ndarray  # [N] the real run at meta["q"]
    pred: np.ndarray  # [N]
    flops: np.ndarray  # [N] counted by torch in the real run
    meta: dict

    @property
    def q(self) -> float:
        return float(self.meta["q"])

    @property
    def p(self) -> np.ndarray:
        """[N, M] the halting distribution P(N = n)."""
        return halting_distribution(self.lam)


def load_records(model_id: str, split: str = "test", root: Path | None = None) -> PonderRecords:
    path = records_file(model_id, split, root)
    if not path.exists():
        raise FileNotFoundError(f"no PonderNet records for {model_id} ({split}) at {path}")
    df = pl.read_parquet(path).sort("sample_id")
    meta = json.loads(pl.read_parquet_metadata(path).get(META_KEY, "{}"))
    m = len([c for c in df.columns if c.startswith("lam_")])
    c = len([col for col in df.columns if col.startswith("q") and col.endswith("_0")])
    lam = np.stack([df[f"lam_{n}"].to_numpy() for n in range(m)], 1)
    q = np.stack([np.stack([df[f"q{k}_{n}"].to_numpy() for n in range(m)], 1) for k in range(c)], 2)
    return PonderRecords(
        model_id=model_id,
        sample_id=df["sample_id"].to_numpy().astype(np.int64),
        label=df["label"].to_numpy().astype(np.int64),
        difficulty=df["difficulty"].to_numpy().astype(np.int64),
        bits=df["bits"].to_numpy(),
        lam=lam.astype(np.float64),
        step_probs=q.astype(np.float64),
        steps=df["steps"].to_numpy().astype(np.int64),
        pred=df["pred"].to_numpy().astype(np.int64),
        flops=df["flops"].to_numpy(),
        meta=meta,
    )


# --- evaluation without the model (pure numpy) -----------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    steps: np.ndarray  # [N] halting step N
    probs: np.ndarray  # [N, C] output of the halting step
    pred: np.ndarray  # [N]
    correct: np.ndarray  # [N] bool
    flops: np.ndarray  # [N] encoder + steps x per-step FLOPs

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def _evaluate(rec: PonderRecords, steps: np.ndarray) -> Evaluation:
    probs = rec.step_probs[np.arange(len(steps)), steps - 1]
    pred = probs.argmax(1)
    flops = float(rec.meta["encode_flops"]) + steps * float(rec.meta["flops_per_step"])
    return Evaluation(steps, probs, pred, pred == rec.label, flops)


def at_q(rec: PonderRecords, q: float) -> Evaluation:
    """Halt at the first step whose cumulative halting probability reaches q."""
    return _evaluate(rec, threshold_steps(rec.p, q))


def at_sample(rec: PonderRecords, seed: int = 0) -> Evaluation:
    """Halt where the seeded Bernoulli(lam^n) coins say (the same coins as ``model.run``)."""
    return _evaluate(rec, sampled_steps(rec.lam, seed))


@dataclass(frozen=True)
class QSweep:
    q: np.ndarray
    accuracy: np.ndarray
    mean_steps: np.ndarray
    mean_flops: np.ndarray


def q_sweep(rec: PonderRecords, q_grid: np.ndarray = Q_GRID) -> QSweep:
    """Accuracy against compute over a grid of thresholds q."""
    rows = [at_q(rec, q) for q in q_grid]
    return QSweep(
        q=np.asarray(q_grid, dtype=np.float64),
        accuracy=np.array([r.accuracy for r in rows]),
        mean_steps=np.array([r.steps.mean() for r in rows]),
        mean_flops=np.array([r.flops.mean() for r in rows]),
    )


def mean_expected_steps(rec: PonderRecords) -> float:
    """The mean of E[N] over the inputs: what sampled halting costs on average."""
    return float(expected_steps(rec.p).mean())
