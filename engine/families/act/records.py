"""Halting records: what an ACT model did on its test inputs, evaluated at any eps.

The halting scores h^n of an ACT model do not depend on eps (see ``engine.families.act.model``), so the
test set is unrolled once to the maximum number of steps and stored:

    assets/traces/records/<model_id>__test.parquet
        sample_id, difficulty, label,
        bits ("+-0" string; parity) or image_index (row of the data set's test split; images),
        h_0 .. h_{M-1} (halting score of each step), q{c}_0 .. (step output probability of
        class c), steps / remainder / pred / flops of the real run at the trained eps

and any eps is evaluated from these with ``engine.families.act.model.outputs_at`` (pure numpy). FLOPs at
other eps are the encoder's FLOPs plus steps x the per-step FLOPs, both counted by torch.

Difficulty: for parity, the string's length (its number of non-zero entries); for images, the
earliest exit of the bundled early-exit CNN that classifies the image correctly (its number of
exits when none does), read from that model's test trace, so ACT's steps can be set against a
second, independent model's view of the same image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.core.stats import by_level, spearman
from engine.families.act.model import halting_distribution, outputs_at
from engine.paths import RECORDS_DIR, TRACES_DIR

META_KEY = "aie.halt_records"
EPS_GRID = np.round(np.r_[0.0, 0.001, 0.005, np.arange(0.01, 0.5, 0.01), 0.5, 0.7, 0.9], 4)


def records_file(model_id: str, split: str = "test", root: Path | None = None) -> Path:
    return (root or RECORDS_DIR) / f"{model_id}__{split}.parquet"


def bits_strings(x: np.ndarray) -> list[str]:
    table = np.array(["-", "0", "+"])
    return ["".join(row) for row in table[(np.sign(x).astype(int) + 1)]]


def _write(model, model_id, x, cols: dict, meta: dict, traces_dir) -> Path:
    """Unroll every input M steps, run real ACT at the trained eps, write cols + the unroll."""
    from engine.families.act import model as act

    rec_dir = (Path(traces_dir) if traces_dir is not None else TRACES_DIR) / "records"
    rec_dir.mkdir(parents=True, exist_ok=True)
    h, q = act.halting_scores(model, x)
    real = act.run_act(model, x)
    cols = {
        **cols,
        "steps": real["steps"].astype(np.int16),
        "remainder": real["remainder"].astype(np.float64),
        "pred": real["pred"].astype(np.int8),
        "flops": real["flops"].astype(np.float64),
    }
    meta = {
        "model_id": model_id,
        "eps": model.config.eps,
        "max_steps": model.config.max_steps,
        "flops_per_step": act.step_flops(model),
        "encode_flops": act.encode_flops(model),
        **meta,
    }
    return write_unroll(records_file(model_id, root=rec_dir), META_KEY, meta, cols, "h", h, q)


def write_unroll(
    path: Path, meta_key: str, meta: dict, cols: dict, score: str, h: np.ndarray, q: np.ndarray
) -> Path:
    """Write ``cols`` with the unroll (halting scores [N, M] as ``{score}_n``, step outputs
    [N, M, C] as ``q{c}_n``) and ``meta`` as JSON, atomically; ``read_unroll`` reads it back.

    float32: the halting scores are exact (the model computes them in float32); q rounds by
    ~1e-7, far below anything that moves an argmax, and halves the file."""
    cols = dict(cols)
    for n in range(h.shape[1]):
        cols[f"{score}_{n}"] = h[:, n].astype(np.float32)
    for c in range(q.shape[2]):
        for n in range(q.shape[1]):
            cols[f"q{c}_{n}"] = q[:, n, c].astype(np.float32)
    tmp = path.with_suffix(".parquet.tmp")
    pl.DataFrame(cols).write_parquet(tmp, compression="zstd", metadata={meta_key: json.dumps(meta)})
    tmp.replace(path)
    return path


def write_records(model, model_id, x, y, length, traces_dir=None, tau=None) -> Path:
    """Parity: the strings, their length as difficulty, and the unroll."""
    cols = {
        "sample_id": np.arange(len(y), dtype=np.int32),
        "difficulty": length.astype(np.int16),
        "label": y.astype(np.int8),
        "bits": bits_strings(x),
    }
    meta = {
        "input": "bits",
        "tau": tau,
        "num_bits": model.config.num_bits,
        "class_names": ["even", "odd"],
        "difficulty": "length: number of non-zero entries of the string",
        "difficulty_label": "string length (non-zero entries)",
    }
    return _write(model, model_id, x, cols, meta, traces_dir)


def write_image_records(
    model,
    model_id,
    x,
    y,
    image_index,
    difficulty,
    traces_dir=None,
    *,
    tau=None,
    dataset: str,
    class_names: list[str],
    difficulty_model: str,
) -> Path:
    """Images: the test-split row of each image, its early-exit difficulty, and the unroll.

    ``difficulty`` may be None (no trace of the difficulty model): stored as -1 and not shown.
    """
    n = len(y)
    cols = {
        "sample_id": np.arange(n, dtype=np.int32),
        "difficulty": (np.full(n, -1) if difficulty is None else difficulty).astype(np.int16),
        "label": np.asarray(y).astype(np.int8),
        "image_index": np.asarray(image_index).astype(np.int32),
    }
    meta = {
        "input": "image",
        "dataset": dataset,
        "tau": tau,
        "class_names": class_names,
        "difficulty": None
        if difficulty is None
        else f"earliest exit of {difficulty_model} that is correct (its number of exits if none)",
        "difficulty_label": f"oracle exit of {difficulty_model}",
        "difficulty_model": difficulty_model,
    }
    return _write(model, model_id, x, cols, meta, traces_dir)


def early_exit_difficulty(model_id: str, sample_ids: np.ndarray) -> np.ndarray | None:
    """Per sample: earliest exit of ``model_id`` that is correct, or its number of exits if none.

    Read from the bundled test trace (sample_id = row of the test split); None if it is missing.
    """
    from engine.core.policies import oracle_correct
    from engine.trace_store import load_trace

    try:
        trace = load_trace(model_id, "test", build_if_missing=False)
    except (FileNotFoundError, ValueError):
        return None
    rate = oracle_correct(trace, fallback="last")
    rate[~trace.correct.any(axis=1)] = trace.num_exits
    row = {int(s): i for i, s in enumerate(trace.sample_id)}
    if any(int(s) not in row for s in sample_ids):
        return None
    return rate[[row[int(s)] for s in sample_ids]].astype(np.int64)


def difficulty_summary(steps: np.ndarray, difficulty: np.ndarray, correct: np.ndarray) -> dict:
    """For the model card: rank correlation and per-difficulty steps/accuracy."""
    levels, mean, _, acc, count = by_level(difficulty, steps, correct)
    return {
        "spearman_steps_vs_difficulty": round(spearman(steps, difficulty), 4),
        "levels": [int(v) for v in levels],
        "count_by_difficulty": [int(c) for c in count],
        "mean_steps_by_difficulty": [round(float(v), 3) for v in mean],
        "accuracy_by_difficulty": [round(float(v), 4) for v in acc],
    }


@dataclass(frozen=True)
class HaltRecords:
    model_id: str
    sample_id: np.ndarray  # [N]
    difficulty: np.ndarray  # [N] int; parity: length; images: early-exit oracle exit; -1 unknown
    label: np.ndarray  # [N]
    bits: np.ndarray | None  # [N] str (parity)
    image_index: np.ndarray | None  # [N] row of the test split (images)
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

    @property
    def full_flops(self) -> float:
        """The cost of running every step: encoder + M x the per-step FLOPs."""
        return flops_at(self.meta, self.max_steps)

    @property
    def has_difficulty(self) -> bool:
        return bool((self.difficulty >= 0).all()) and self.meta.get("difficulty") is not None


def flops_at(meta: dict, steps):
    """FLOPs of a run that takes ``steps`` ponder steps (int or [N]), from a stored unroll's
    metadata: the encoder once + steps x the per-step FLOPs (ACT, PonderNet)."""
    return float(meta.get("encode_flops", 0.0)) + steps * float(meta.get("flops_per_step", 1.0))


def unroll_columns(df: pl.DataFrame) -> dict[str, np.ndarray]:
    """The per-input columns every stored unroll has (ACT, PonderNet), as ``load_records``
    hands them to its records dataclass."""
    return {
        "sample_id": df["sample_id"].to_numpy().astype(np.int64),
        "difficulty": df["difficulty"].to_numpy().astype(np.int64),
        "label": df["label"].to_numpy().astype(np.int64),
        "steps": df["steps"].to_numpy().astype(np.int64),
        "pred": df["pred"].to_numpy().astype(np.int64),
        "flops": df["flops"].to_numpy(),
    }


def read_unroll(
    path: Path, meta_key: str, score: str
) -> tuple[pl.DataFrame, dict, np.ndarray, np.ndarray]:
    """(rows by sample id, JSON metadata, halting scores [N, M] from columns ``{score}_n``,
    step output probabilities [N, M, C] from ``q{c}_n``) of a stored unroll (ACT, PonderNet)."""
    df = pl.read_parquet(path).sort("sample_id")
    meta = json.loads(pl.read_parquet_metadata(path).get(meta_key, "{}"))
    m = len([c for c in df.columns if c.startswith(f"{score}_")])
    c = len([col for col in df.columns if col.startswith("q") and col.endswith("_0")])
    h = np.stack([df[f"{score}_{n}"].to_numpy() for n in range(m)], 1)
    q = np.stack([np.stack([df[f"q{k}_{n}"].to_numpy() for n in range(m)], 1) for k in range(c)], 2)
    return df, meta, h.astype(np.float64), q.astype(np.float64)


def load_records(model_id: str, split: str = "test", root: Path | None = None) -> HaltRecords:
    path = records_file(model_id, split, root)
    if not path.exists():
        raise FileNotFoundError(f"no halting records for {model_id} ({split}) at {path}")
    df, meta, h, q = read_unroll(path, META_KEY, "h")
    return HaltRecords(
        model_id=model_id,
        **unroll_columns(df),
        bits=df["bits"].to_numpy() if "bits" in df.columns else None,
        image_index=df["image_index"].to_numpy().astype(np.int64)
        if "image_index" in df.columns
        else None,
        h=h,
        step_probs=q,
        remainder=df["remainder"].to_numpy(),
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
        flops=flops_at(rec.meta, steps),
    )


def cumulative_halting(rec: HaltRecords, i: int, eps: float) -> tuple[np.ndarray, int, float]:
    """One input's (cumulative halting incl. remainder [M], steps N, remainder R) at eps."""
    steps, remainder, p = halting_distribution(rec.h[i], eps)
    return np.cumsum(p), int(steps), float(remainder)
