"""PonderNet records: every test string unrolled once, then evaluated at any q in numpy.

The halting scores lam^n do not depend on the threshold q (see ``model.py``), so one unroll of
the test set to M steps holds every answer the model can give:

    assets/traces/records/<model_id>__test.parquet
        sample_id, label, difficulty (the string's length: its number of non-zero entries),
        bits ("+-0" string), lam_0 .. lam_{M-1} (halting scores), q{c}_0 .. q{c}_{M-1} (step
        output probability of class c), steps / pred / flops of the real run at the card's q

with the model id, q, M, and the per-step and encoder FLOPs (counted by torch) as JSON metadata.
``at_q`` evaluates a threshold, ``at_sample`` the sampled halting; FLOPs away from the real run
are encoder FLOPs + steps x per-step FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.families.act.records import (
    bits_strings,
    flops_at,
    read_unroll,
    records_file,
    unroll_columns,
    write_unroll,
)
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
        "bits": bits_strings(np.asarray(x)),
        "steps": real.steps.astype(np.int16),
        "pred": real.pred.astype(np.int8),
        "flops": real.flops.astype(np.float64),
    }
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
    return write_unroll(
        records_file(model_id, root=rec_dir), META_KEY, meta, cols, "lam", lam, probs
    )


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
    def max_steps(self) -> int:
        return self.lam.shape[1]

    @property
    def full_flops(self) -> float:
        """The cost of running every step: encoder + M x the per-step FLOPs."""
        return flops_at(self.meta, self.max_steps)

    @property
    def p(self) -> np.ndarray:
        """[N, M] the halting distribution P(N = n)."""
        return halting_distribution(self.lam)


def load_records(model_id: str, split: str = "test", root: Path | None = None) -> PonderRecords:
    path = records_file(model_id, split, root)
    if not path.exists():
        raise FileNotFoundError(f"no PonderNet records for {model_id} ({split}) at {path}")
    df, meta, lam, q = read_unroll(path, META_KEY, "lam")
    return PonderRecords(
        model_id=model_id,
        **unroll_columns(df),
        bits=df["bits"].to_numpy(),
        lam=lam,
        step_probs=q,
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
    return Evaluation(steps, probs, pred, pred == rec.label, flops_at(rec.meta, steps))


def at_q(rec: PonderRecords, q: float) -> Evaluation:
    """Halt at the first step whose cumulative halting probability reaches q."""
    return _evaluate(rec, threshold_steps(rec.p, q))


def at_sample(rec: PonderRecords, seed: int = 0) -> Evaluation:
    """Halt where the seeded Bernoulli(lam^n) coins say (the same coins as ``model.run``)."""
    return _evaluate(rec, sampled_steps(rec.lam, seed))


def mean_expected_steps(rec: PonderRecords) -> float:
    """The mean of E[N] over the inputs: what sampled halting costs on average."""
    return float(expected_steps(rec.p).mean())
