"""Real early exit: FLOPs-predicted vs measured wall-clock speed-up, per backend and batch size.

For each backend (PyTorch eager, ONNX Runtime float32, ONNX Runtime int8, QuEE) and batch size,
the full model (every stage and head, no decisions) and the early-exit runtime under max-prob
thresholds are timed on the same samples, interleaved, median of repeats. Printed per row:
- predicted: FLOPs of the full model / mean FLOPs actually spent (the trace's promise);
- stage-time predicted: the same ratio with each stage weighted by its *measured* time in the
  full run instead of its FLOPs (what compaction could give if bookkeeping were free);
- measured: full-model wall-clock / early-exit wall-clock, and measured / predicted;
- agree: share of samples whose exit and prediction equal the cached trace's.
Target: measured >= 0.8 x predicted at batch 256; ONNX Runtime at least as fast as torch eager.

Run: ``python bench/early_exit_speedup.py [--threads 1] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.core.policies import Policy, exit_index  # noqa: E402
from engine.core.progress import terminal  # noqa: E402
from engine.data.images import load, to_model_input  # noqa: E402
from engine.families import load_model  # noqa: E402
from engine.run.runtime import EarlyExitRunner  # noqa: E402
from engine.trace_store import load_trace  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist_multi_exit_cnn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000, help="samples at batch size > 1")
    ap.add_argument("--n1", type=int, default=500, help="samples at batch size 1")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.9, 0.99, 0.999])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1])
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx", "onnx_int8", "quee"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    model = load_model(args.model)
    trace = load_trace(args.model, "test")
    x = to_model_input(load("mnist", "test").images)
    calib = to_model_input(load("mnist", "train").images[:512])
    backends = list(args.backends)
    if torch.cuda.is_available():
        backends.insert(1, "torch-cuda")
    runners = {}
    for b in backends:
        kind, device = ("torch", "cuda") if b == "torch-cuda" else (b, "cpu")
        runners[b] = EarlyExitRunner(
            model,
            kind,
            device=device,
            threads=args.threads,
            model_id=args.model,
            calibration=calib,
            progress=terminal(),
        )
        runners[b].run(x[:256], Policy("max_prob", threshold=0.9))  # export, sessions, warm-up
    costs = runners[backends[0]].costs
    print(
        f"model {args.model}: {costs.full / 1e6:.2f} MFLOPs/sample full, exits at "
        + ", ".join(f"{c / 1e6:.2f}" for c in costs.cumulative)
        + f" MFLOPs; torch threads {torch.get_num_threads()}, ONNX Runtime intra-op threads "
        f"{args.threads}; median of {args.repeats}"
    )
    policies = [Policy("max_prob", threshold=t) for t in args.thresholds]
    header = (
        "| backend | batch | threshold | mean exit | predicted | stage-time pred. | measured "
        "| measured/predicted | agree | accuracy |"
    )
    print(header)
    print("|" + "---|" * 10)
    full_ms_by: dict[tuple[str, int], float] = {}
    for bs in args.batch_sizes:
        n = args.n if bs > 1 else args.n1
        xs, ts = x[:n], trace.subset(np.arange(n))
        min_rows = 16 if bs > 1 else 1  # padding would multiply the work at batch 1
        times: dict[tuple[str, float | None], list[float]] = {}
        results = {}
        stage_ms = {}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every row
            for b in backends:
                full = runners[b].run_full(xs, bs)
                times.setdefault((b, None), []).append(full.total_ms)
                stage_ms[b] = full.stage_ms
                for p in policies:
                    res = runners[b].run(xs, p, batch_size=bs, min_rows=min_rows)
                    times.setdefault((b, p.threshold), []).append(res.total_ms)
                    results[(b, p.threshold)] = res
        for b in backends:
            full_ms = statistics.median(times[(b, None)])
            full_ms_by[(b, bs)] = full_ms
            print(
                f"| {b} | {bs} | full model | {len(costs.stage) - 1} | 1.00 | 1.00 | "
                f"1.00 ({full_ms:.0f} ms) | | | |"
            )
            for p in policies:
                res = results[(b, p.threshold)]
                ee_ms = statistics.median(times[(b, p.threshold)])
                want = exit_index(ts, p)
                agree = np.mean((res.exit == want) & (res.pred == ts.pred[np.arange(n), want]))
                reach = np.array([(res.exit >= k).mean() for k in range(len(costs.stage))])
                predicted = costs.full / res.flops.mean()
                st = stage_ms[b]
                stage_pred = st.sum() / (st * reach).sum()
                measured = full_ms / ee_ms
                acc = np.mean(res.pred == ts.label)
                print(
                    f"| {b} | {bs} | {p.threshold:g} | {res.exit.mean():.2f} | {predicted:.2f} | "
                    f"{stage_pred:.2f} | {measured:.2f} ({ee_ms:.0f} ms) | "
                    f"{measured / predicted:.2f} | {agree:.2%} | {acc:.4f} |"
                )
    print()
    for bs in args.batch_sizes:
        for b in backends:
            if b != "torch" and ("torch", bs) in full_ms_by:
                ratio = full_ms_by[("torch", bs)] / full_ms_by[(b, bs)]
                print(f"full model, batch {bs}: torch eager / {b} wall-clock = {ratio:.2f}")


if __name__ == "__main__":
    main()
