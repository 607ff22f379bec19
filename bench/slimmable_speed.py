"""Slimmable CNN: real execution at each width and under the per-input width policy, measured
wall-clock vs the FLOPs-predicted speed-up, at batch 256 and batch 1.

Rows ``width w``: the network run at one width to its last exit (``last_exit``), against the
full width on the same samples, interleaved, median of repeats. Rows ``policy t``: the real
width cascade (``EarlyExitRunner``: the narrowest width first, the next width only for the
inputs still below max-prob ``t``; the others never run it) against the full width alone.
Printed per row: predicted = full-width FLOPs / mean FLOPs spent; measured = full-width time /
time (the two timed alternately); and, for the policy, its accuracy and the share of samples
whose width equals the bundled trace's. Rows ``w x d t``: the width × depth exits walked for real
(``records.run_width_depth``, width-major, true termination). Load average before and after.

Run: ``python bench/slimmable_speed.py [--threads 1] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.core.policies import Policy, exit_index  # noqa: E402
from engine.data.images import load, to_model_input  # noqa: E402
from engine.families import load_model  # noqa: E402
from engine.families.slimmable_cnn.records import (  # noqa: E402
    WIDTH_DEPTH,
    grid_costs,
    run_width_depth,
)
from engine.registry import get_card  # noqa: E402
from engine.run.runtime import EarlyExitRunner  # noqa: E402
from engine.trace_store import load_trace  # noqa: E402


def paired(fn, ref, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` and of ``ref()``, called alternately ``repeats`` times each
    (after one warm-up call of each), so that a noisy machine slows both alike."""
    fn(), ref()
    a, b = [], []
    for _ in range(repeats):
        for f, out in ((fn, a), (ref, b)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion_slimmable_cnn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=2048, help="samples at batch 256")
    ap.add_argument("--n1", type=int, default=128, help="samples at batch 1")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.9, 0.99])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}", flush=True)

    card = get_card(args.model)
    model = load_model(args.model)
    trace = load_trace(args.model, "test", build_if_missing=False)
    data = load(card.dataset, "test")
    flops = np.asarray(card.raw["metrics"]["flops_width"], dtype=float)
    mults = card.config["width_mults"]
    full = len(mults) - 1
    runner = EarlyExitRunner(model, backend="torch", device="cpu")

    print(f"{'batch':>5} {'row':<14} {'predicted':>9} {'measured':>9} {'ms/sample':>9} extra")
    for batch, n in ((256, args.n), (1, args.n1)):
        x = to_model_input(data.images[:n])
        chunks = [x[i : i + batch] for i in range(0, n, batch)]

        def at_width(w, chunks=chunks):
            with torch.inference_mode():
                for c in chunks:
                    model.last_exit(c, w)

        def full_width():
            at_width(full)

        for w, m in enumerate(mults):
            t, t_full = paired(lambda w=w: at_width(w), full_width, args.repeats)
            print(
                f"{batch:>5} {'width ' + format(m, 'g'):<14} {flops[-1] / flops[w]:>9.2f} "
                f"{t_full / t:>9.2f} {t / n * 1e3:>9.3f}",
                flush=True,
            )
        for thr in args.thresholds:
            policy = Policy("max_prob", threshold=thr)
            out = runner.run(x, policy, batch_size=batch, min_rows=1)
            t, t_full = paired(
                lambda p=policy, x=x, b=batch: runner.run(x, p, batch_size=b, min_rows=1),
                full_width,
                args.repeats,
            )
            want = exit_index(trace.subset(np.arange(n)), policy)
            agree = float((out.exit == want).mean())
            acc = float((out.pred == data.labels[:n]).mean())
            widths = np.bincount(out.exit, minlength=len(mults)) / n
            print(
                f"{batch:>5} {'policy ' + format(thr, 'g'):<14} "
                f"{flops[-1] / out.flops.mean():>9.2f} {t_full / t:>9.2f} {t / n * 1e3:>9.3f} "
                f"acc {acc:.4f}, stopped per width {np.round(widths, 3).tolist()}, "
                f"agree with trace {agree:.3f}",
                flush=True,
            )
        # width × depth for real (records.run_width_depth), batch by batch
        grid = load_trace(args.model, WIDTH_DEPTH, build_if_missing=False).subset(np.arange(n))
        costs = grid_costs(model)
        for thr in args.thresholds:
            policy = Policy("max_prob", threshold=thr)

            def wxd(p=policy, chunks=chunks, costs=costs):
                return [run_width_depth(model, c, p, costs) for c in chunks]

            outs = wxd()
            exits = np.concatenate([o.exit for o in outs])
            spent = np.concatenate([o.flops for o in outs]).mean()
            t, t_full = paired(wxd, full_width, args.repeats)
            agree = float((exits == exit_index(grid, policy)).mean())
            acc = float((np.concatenate([o.pred for o in outs]) == data.labels[:n]).mean())
            print(
                f"{batch:>5} {'w x d ' + format(thr, 'g'):<14} {flops[-1] / spent:>9.2f} "
                f"{t_full / t:>9.2f} {t / n * 1e3:>9.3f} acc {acc:.4f}, "
                f"agree with trace {agree:.3f}",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
