"""Real early exit with the JEI model's jointly trained gates vs max-prob at matched accuracy.

The JEI model (``fashion_multi_exit_cnn_jei``) runs under its gate policy at the trained
operating point (threshold 0.5); max-prob on the same model is set to the cheapest threshold
whose accuracy on the bundled trace is at least the gate's. Both run for real (torch eager,
CPU, batch compaction) on the same samples, interleaved, median of repeats, at batch 256 and
batch 1; the full model (no decisions) is the baseline. Printed per row: accuracy and mean
FLOPs from the run, ms per sample, speed-up over the full model, and the gate's per-batch
overhead (the gates are computed in numpy at every exit). Ratios are measured within one run.

Run: ``python bench/jei_gates_speed.py [--threads 1] [--repeats 3] [--n 5000] [--n1 300]``.
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
from engine.core import tradeoff  # noqa: E402
from engine.core.policies import Policy  # noqa: E402
from engine.data.images import load, to_model_input  # noqa: E402
from engine.families import load_model  # noqa: E402
from engine.run.runtime import EarlyExitRunner  # noqa: E402
from engine.trace_store import load_trace  # noqa: E402


def matched_max_prob(trace, accuracy: float) -> Policy:
    """The cheapest max-prob threshold with at least ``accuracy`` on the trace."""
    c = tradeoff.curve(trace, "max_prob")
    i = tradeoff.cheapest_with_accuracy(c, accuracy)
    return c.policy(len(c) - 1 if i is None else i)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion_multi_exit_cnn_jei")
    ap.add_argument("--threshold", type=float, default=0.5, help="gate threshold")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=5000, help="samples at batch 256")
    ap.add_argument("--n1", type=int, default=300, help="samples at batch 1")
    args = ap.parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    model = load_model(args.model)
    trace = load_trace(args.model, "test", build_if_missing=False)
    data = load(trace.meta.dataset, "test")
    x, y = to_model_input(data.images), data.labels
    gate = Policy("gate", threshold=args.threshold)
    g_stats = tradeoff.evaluate_policy(trace, gate)
    mp = matched_max_prob(trace, g_stats.accuracy)
    print(
        f"trace: gate {args.threshold:g} accuracy {g_stats.accuracy:.4f} at "
        f"{g_stats.cost_fraction:.1%}; matched {mp.describe()} at "
        f"{tradeoff.evaluate_policy(trace, mp).cost_fraction:.1%}"
    )
    runner = EarlyExitRunner(model, "torch", device="cpu")
    full_flops = runner.costs.full
    rows = []
    for batch, n in ((256, args.n), (1, args.n1)):
        xs, ys = x[:n], y[:n]
        min_rows = 16 if batch > 1 else 1
        times: dict[str, list[float]] = {"full": [], "gate": [], "max_prob": []}
        results = {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            runner.run_full(xs, batch_size=batch)
            times["full"].append(time.perf_counter() - t0)
            for name, pol in (("gate", gate), ("max_prob", mp)):
                res = runner.run(xs, pol, batch_size=batch, min_rows=min_rows)
                times[name].append(res.total_ms / 1e3)
                results[name] = res
        full_s = statistics.median(times["full"])
        for name in ("gate", "max_prob"):
            res = results[name]
            s = statistics.median(times[name])
            rows.append(
                (
                    batch,
                    name if name == "gate" else mp.describe(),
                    float((res.pred == ys).mean()),
                    float(res.flops.mean() / full_flops),
                    1e3 * s / n,
                    full_s / s,
                )
            )
        rows.append((batch, "full model", float("nan"), 1.0, 1e3 * full_s / n, 1.0))
    print("| batch | policy | accuracy | FLOPs (of full) | ms/sample | speed-up vs full |")
    print("|---|---|---|---|---|---|")
    for b, name, acc, fl, ms, sp in rows:
        a = "–" if np.isnan(acc) else f"{acc:.4f}"
        print(f"| {b} | {name} | {a} | {fl:.1%} | {ms:.3f} | {sp:.2f}× |")
    by = {(r[0], r[1] == "gate"): r for r in rows if r[1] != "full model"}
    for b in (256, 1):
        print(
            f"batch {b}: gate / max-prob wall-clock at matched accuracy = "
            f"{by[(b, True)][4] / by[(b, False)][4]:.2f}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
