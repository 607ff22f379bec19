"""Skip records: what the gated skip network did on a test split, and the sweeps over them.

Gating decisions change the features every later gate sees, so the network has to be *re-run*
for every gate threshold; that is done once, when the model is trained, on a fixed grid of
thresholds (``THRESHOLDS``), and stored in one long Parquet table per model:

    assets/traces/records/<model_id>__<split>.parquet
        threshold, sample_id, label, pred, max_prob, flops, executed (bit b = block b ran),
        gate_b0 .. gate_b{B-1} (execute probability as seen on that path)

plus the curves of the training-free variants (skip a fixed set of blocks / skip each input's
k lowest-scored blocks) in ``<model_id>__variants__<split>.parquet`` in the same folder, and
the early-exit trace of the same backbone as a normal ``engine.core.trace.Trace`` in
``assets/traces/<model_id>__<split>.parquet`` (so the tuning page works on it too).

Everything below the writers is pure numpy on the loaded records (no torch, no streamlit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.core.progress import track
from engine.paths import RECORDS_DIR, TRACES_DIR

META_KEY = "aie.skip_records"
THRESHOLDS = np.round(np.arange(0.0, 1.0001, 0.05), 2)  # 0.00, 0.05, ..., 1.00
DEFAULT_THRESHOLD = 0.5


def records_file(model_id: str, split: str = "test", root: Path | None = None) -> Path:
    return (root or RECORDS_DIR) / f"{model_id}__{split}.parquet"


def variants_file(model_id: str, split: str = "test", root: Path | None = None) -> Path:
    return (root or RECORDS_DIR) / f"{model_id}__variants__{split}.parquet"


@dataclass(frozen=True)
class SkipRecords:
    """Per threshold t (T of them), per sample n (N), per block b (B)."""

    model_id: str
    thresholds: np.ndarray  # [T]
    sample_id: np.ndarray  # [N] index into the data set's split
    label: np.ndarray  # [N]
    pred: np.ndarray  # [T, N]
    max_prob: np.ndarray  # [T, N]
    flops: np.ndarray  # [T, N] FLOPs spent (counted by torch on what ran)
    executed: np.ndarray  # [T, N, B] bool
    gate: np.ndarray  # [T, N, B] execute probability
    meta: dict  # dataset, split, class_names, block_names, full_flops, ...

    @property
    def num_blocks(self) -> int:
        return self.executed.shape[2]

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label[None, :]

    def index_of(self, threshold: float) -> int:
        """Index of the grid threshold nearest to ``threshold``."""
        return int(np.abs(self.thresholds - threshold).argmin())


# --- writing (runs the model; used by the trainer) --------------------------------------------


def write_assets(
    model, model_id, dataset, x, y, sample_id, class_names, traces_dir=None, progress=None
):
    """Run the model on (x, y) for every threshold and variant; write records, variants, trace.
    ``progress`` (``engine.core.progress``) hears of every threshold and variant."""
    from engine.core.trace import Trace, TraceMeta
    from engine.families.skipnet import model as skipnet

    traces_dir = Path(traces_dir) if traces_dir is not None else TRACES_DIR
    rec_dir = traces_dir / "records"
    rec_dir.mkdir(parents=True, exist_ok=True)
    nb = model.num_blocks
    full = skipnet.full_flops(model)
    frames = []
    for t in track(THRESHOLDS, "gate threshold sweep", progress):
        r = skipnet.run_skipnet(model, x, threshold=float(t))
        bits = (r["executed"].astype(np.uint8) << np.arange(nb, dtype=np.uint8)).sum(1)
        cols = {
            "threshold": np.full(len(y), t, dtype=np.float32),
            "sample_id": sample_id.astype(np.int32),
            "label": y.astype(np.int8),
            "pred": r["pred"].astype(np.int8),
            "max_prob": r["probs"].max(1).astype(np.float32),
            "flops": r["flops"].astype(np.float32),
            "executed": bits.astype(np.uint8),
        }
        for b in range(nb):
            cols[f"gate_b{b}"] = r["gate"][:, b]
        frames.append(pl.DataFrame(cols))
    meta = {
        "model_id": model_id,
        "dataset": dataset,
        "split": "test",
        "class_names": list(class_names),
        "block_names": [f"block {b + 1}" for b in range(nb)],
        "full_flops": full,
        "note": "threshold t: a block runs for an input when its gate score >= t",
    }
    _write(pl.concat(frames), records_file(model_id, root=rec_dir), meta)
    _write(variant_curves(model, x, y, progress), variants_file(model_id, root=rec_dir), meta)

    probs, cost = skipnet.exit_outputs(model, x)
    trace = Trace(
        meta=TraceMeta(
            model_id=model_id,
            exit_names=tuple(meta["block_names"]),
            class_names=tuple(class_names),
            dataset=dataset,
            split="test",
            extra={
                "note": "early exit on the skip network's backbone: every block runs (gates "
                "off); cost = FLOPs of the blocks and every head up to the exit"
            },
        ),
        sample_id=sample_id.astype(np.int64),
        label=y.astype(np.int64),
        probs=probs,
        cost=cost,
    )
    trace.write_parquet(traces_dir / f"{model_id}__test.parquet")


def variant_curves(model, x, y, progress=None) -> pl.DataFrame:
    """Accuracy and mean FLOPs of the training-free skipping variants, k = 0 .. B-1 skipped.

    ``fixed``: skip the k blocks with the lowest *mean* gate score (over these inputs, all blocks
    run) for every input. ``lowest``: skip each input's own k lowest-scored blocks.
    """
    import torch

    from engine.families.skipnet import model as skipnet

    with torch.no_grad():
        _, probs, _ = model.eval()(x, all_on=True)
    order = np.argsort(probs.mean(0).numpy(), kind="stable")
    rows = []
    for k in track(range(model.num_blocks), "skipping variants (k)", progress):
        for method, r in (
            ("fixed", skipnet.skip_fixed(model, x, order[:k].tolist())),
            ("lowest", skipnet.skip_lowest(model, x, k)),
        ):
            row = {
                "method": method,
                "k": k,
                "accuracy": float((r["pred"] == y).mean()),
                "mean_flops": float(r["flops"].mean()),
                "skipped_blocks": json.dumps(order[:k].tolist()) if method == "fixed" else "",
            }
            for b, v in enumerate(1 - r["executed"].mean(0)):
                row[f"skip_b{b}"] = float(v)
            rows.append(row)
    return pl.DataFrame(rows)


def _write(df: pl.DataFrame, path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    df.write_parquet(tmp, compression="zstd", metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)


# --- loading ----------------------------------------------------------------------------------


def _meta(path: Path) -> dict:
    return json.loads(pl.read_parquet_metadata(path).get(META_KEY, "{}"))


def load_records(model_id: str, split: str = "test", root: Path | None = None) -> SkipRecords:
    """Read the long table back into [T, N, ...] arrays (FileNotFoundError if absent)."""
    path = records_file(model_id, split, root)
    if not path.exists():
        raise FileNotFoundError(f"no skip records for {model_id} ({split}) at {path}")
    df = pl.read_parquet(path).sort(["threshold", "sample_id"])
    meta = _meta(path)
    thresholds = np.unique(df["threshold"].to_numpy()).astype(np.float64)
    t = len(thresholds)
    n = df.height // t
    nb = len([c for c in df.columns if c.startswith("gate_b")])

    def grid(col: str) -> np.ndarray:
        return df[col].to_numpy().reshape(t, n)

    bits = grid("executed").astype(np.uint8)
    executed = ((bits[..., None] >> np.arange(nb, dtype=np.uint8)) & 1).astype(bool)
    gate = np.stack([grid(f"gate_b{b}") for b in range(nb)], axis=2).astype(np.float32)
    return SkipRecords(
        model_id=model_id,
        thresholds=np.round(thresholds, 4),
        sample_id=grid("sample_id")[0].astype(np.int64),
        label=grid("label")[0].astype(np.int64),
        pred=grid("pred").astype(np.int64),
        max_prob=grid("max_prob").astype(np.float64),
        flops=grid("flops").astype(np.float64),
        executed=executed,
        gate=gate,
        meta=meta,
    )


def load_variants(model_id: str, split: str = "test", root: Path | None = None) -> pl.DataFrame:
    path = variants_file(model_id, split, root)
    if not path.exists():
        raise FileNotFoundError(f"no variant curves for {model_id} ({split}) at {path}")
    return pl.read_parquet(path)


# --- sweeps and summaries (pure, vectorised) ----------------------------------------------------


@dataclass(frozen=True)
class GateSweep:
    thresholds: np.ndarray  # [T]
    accuracy: np.ndarray  # [T]
    mean_flops: np.ndarray  # [T]
    skip_rate: np.ndarray  # [T] fraction of (sample, block) pairs skipped
    skip_rate_block: np.ndarray  # [T, B]


def gate_sweep(rec: SkipRecords) -> GateSweep:
    """Accuracy, mean FLOPs and skip rates at every grid threshold, in one vectorised pass."""
    skipped = ~rec.executed
    return GateSweep(
        thresholds=rec.thresholds,
        accuracy=rec.correct.mean(axis=1),
        mean_flops=rec.flops.mean(axis=1),
        skip_rate=skipped.mean(axis=(1, 2)),
        skip_rate_block=skipped.mean(axis=1),
    )


def skip_rate_per_class(rec: SkipRecords, t_index: int) -> np.ndarray:
    """[C, B]: fraction of each class's inputs that skipped each block at threshold index t."""
    c = len(rec.meta.get("class_names", [])) or int(rec.label.max()) + 1
    skipped = (~rec.executed[t_index]).astype(np.float64)  # [N, B]
    sums = np.zeros((c, rec.num_blocks))
    np.add.at(sums, rec.label, skipped)
    counts = np.bincount(rec.label, minlength=c)[:, None]
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)


def blocks_run_per_sample(rec: SkipRecords, t_index: int) -> np.ndarray:
    """[N] number of blocks each input ran at threshold index t."""
    return rec.executed[t_index].sum(axis=1)


def summary(rec: SkipRecords, t_index: int) -> dict:
    """Headline numbers at one threshold: accuracy, mean FLOPs, fraction of full cost, skip rate."""
    full = float(rec.meta.get("full_flops", rec.flops[0].mean()))
    mean = float(rec.flops[t_index].mean())
    return {
        "threshold": float(rec.thresholds[t_index]),
        "accuracy": float(rec.correct[t_index].mean()),
        "mean_flops": mean,
        "cost_fraction": mean / full,
        "skip_rate": float((~rec.executed[t_index]).mean()),
        "mean_blocks_run": float(blocks_run_per_sample(rec, t_index).mean()),
    }
