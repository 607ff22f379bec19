"""A synthetic, realistic multi-exit trace of any size (default 1,000,000 samples x 12 exits x
10 classes), written as one Parquet file in the wide trace layout, chunk by chunk.

Each sample has a difficulty: most are easy, some hard (a few are never right). At exit k the
logit of the true class grows with depth, scaled down by the difficulty, over Gaussian noise,
and a hard sample's early exits often favour one confusing class, so confidence rises with
depth and early exits are over-confident on the hard samples, as in real traces. Chunks of
``--chunk`` samples are generated in float32, written as separate Parquet files and streamed
into the final file by polars (``sink_parquet``), so at no point is the whole [N, K, C] array
in memory. The same seed gives the same file.

    python bench/make_big_trace.py [--samples 1000000] [--exits 12] [--classes 10]
                                   [--seed 0] [--out .cache/big_trace_1000000x12.parquet]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.core.trace import META_KEY, TraceMeta  # noqa: E402

FLOPS_PER_EXIT = 2.5e6  # each segment's cost; cost_e{k} is cumulative


def chunk_frame(start: int, n: int, k: int, c: int, rng: np.random.Generator) -> pl.DataFrame:
    """One chunk of samples [start, start + n) in the wide layout (float32 probabilities)."""
    label = rng.integers(0, c, n)
    # difficulty in [0, 1]: 70 % easy, 25 % hard, 5 % near-impossible
    kind = rng.choice(3, size=n, p=[0.70, 0.25, 0.05])
    difficulty = np.where(
        kind == 0,
        rng.beta(1.5, 6.0, n),
        np.where(kind == 1, rng.beta(5.0, 2.0, n), 1.0),
    ).astype(np.float32)
    confuser = (label + rng.integers(1, c, n)) % c
    depth = np.linspace(0.15, 1.0, k, dtype=np.float32)  # evidence available at each exit
    cols: dict[str, np.ndarray] = {
        "sample_id": np.arange(start, start + n, dtype=np.int64),
        "label": label.astype(np.int64),
    }
    rows = np.arange(n)
    for e in range(k):
        logits = rng.normal(0.0, 1.0, (n, c)).astype(np.float32)
        signal = 7.0 * depth[e] * (1.0 - difficulty) + 1.5 * depth[e] ** 2
        logits[rows, label] += signal
        # hard samples lean towards one wrong class early on, less so deeper
        logits[rows, confuser] += 3.0 * difficulty * (1.0 - depth[e]) + 1.0 * (kind == 2)
        logits *= np.float32(0.8 + 1.2 * depth[e])  # sharper (more confident) with depth
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        for j in range(c):
            cols[f"prob_e{e}_c{j}"] = p[:, j]
    for e in range(k):
        cols[f"cost_e{e}"] = np.full(n, FLOPS_PER_EXIT * (e + 1))
    return pl.DataFrame(cols)


def make(
    out: Path, samples: int, exits: int, classes: int, seed: int = 0, chunk: int = 100_000
) -> Path:
    """Write the trace to ``out`` (atomically) and return it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = TraceMeta(
        model_id=f"synthetic-{samples}x{exits}",
        exit_names=tuple(f"block {e + 1}" for e in range(exits)),
        class_names=tuple(f"class {j}" for j in range(classes)),
        dataset="synthetic",
        split="test",
        cost_unit="FLOPs",
        extra={"note": f"made by bench/make_big_trace.py, seed {seed}"},
    )
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix="aie-big-", dir=out.parent))
    try:
        parts = []
        for i, start in enumerate(range(0, samples, chunk)):
            part = tmp / f"part{i:05d}.parquet"
            chunk_frame(start, min(chunk, samples - start), exits, classes, rng).write_parquet(part)
            parts.append(part)
        final = tmp / "trace.parquet"
        pl.scan_parquet(parts).sink_parquet(
            final, metadata={META_KEY: meta.to_json()}, row_group_size=chunk
        )
        final.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--exits", type=int, default=12)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or ROOT / ".cache" / f"big_trace_{args.samples}x{args.exits}.parquet"
    print(f"load average before: {os.getloadavg()}")
    t0 = time.perf_counter()
    make(out, args.samples, args.exits, args.classes, args.seed, args.chunk)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
