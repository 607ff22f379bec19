"""Real early exit: FLOPs- and time-predicted vs measured wall-clock speed-up, per backend.

For each backend (PyTorch eager, PyTorch with batch norm folded + channels_last, ONNX Runtime
float32, ONNX Runtime int8, QuEE) and batch size, the full model (every stage and head, no
decisions) and the early-exit runtime under max-prob thresholds are timed on the same samples,
interleaved, median of repeats. Printed per row:
- FLOPs pred.: FLOPs of the full model / mean FLOPs actually spent (the trace's promise);
- time pred.: the same ratio with each stage weighted by its *measured* time in the full run
  (stage k + head k, same backend, same run) instead of its FLOPs: what compaction can give if
  bookkeeping were free and a stage's time were proportional to its rows;
- measured: full-model wall-clock / early-exit wall-clock;
- realised: measured / time pred. (target >= 0.9 at batch 256 for torch and ONNX Runtime) and
  measured / FLOPs pred.;
- CPU-time pred., measured and realised on CPU time: the same with process CPU time
  (``time.process_time``) instead of wall-clock: on a shared machine a process waiting for a
  core accrues wall time but no CPU time, so these ratios survive load far better (1 thread,
  so CPU time is compute time; memory stalls still count);
- bookkeeping: share of the early-exit run (wall) spent outside stage and head calls (softmax,
  the policy's ``stop_mask``, index copies, padding);
- stage calls / proportional: CPU time of the early-exit run's stage and head calls / the
  full run's per-stage CPU time weighted by the share of samples reaching each stage (> 1: the
  compacted, smaller batches cost more per row: fixed per-call costs, padding to min_rows);
  realised on CPU time ~= (1 - bookkeeping) / (stage calls / proportional), up to the full run's
  own small bookkeeping;
- agree: share of samples whose exit and prediction equal the cached trace's.
Load average printed before and after.

Run: ``python bench/early_exit_speedup.py [--threads 1] [--repeats 5] [--n 2560]`` (about two
minutes with the defaults on the 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
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
    ap.add_argument("--n", type=int, default=2560, help="samples at batch size > 1")
    ap.add_argument("--n1", type=int, default=200, help="samples at batch size 1")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.9, 0.99, 0.999])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1])
    ap.add_argument(
        "--backends", nargs="+", default=["torch", "torch_opt", "onnx", "onnx_int8", "quee"]
    )
    args = ap.parse_args(argv)
    print(f"load average before: {load_str()}")
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # already set in this process (e.g. under pytest)
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
    calls = {b: instrument(r) for b, r in runners.items()}
    costs = runners[backends[0]].costs
    k_count = len(costs.stage)
    print(
        f"model {args.model}: {costs.full / 1e6:.2f} MFLOPs/sample full, exits at "
        + ", ".join(f"{c / 1e6:.2f}" for c in costs.cumulative)
        + f" MFLOPs; torch threads {torch.get_num_threads()}, ONNX Runtime intra-op threads "
        f"{args.threads}; median of {args.repeats}"
    )
    policies = [Policy("max_prob", threshold=t) for t in args.thresholds]
    header = (
        "| backend | batch | threshold | mean exit | FLOPs pred. | time pred. | measured "
        "| realised / time pred. | CPU-time pred. | measured, CPU time | realised, CPU time "
        "| measured / FLOPs pred. | bookkeeping | stage calls / proportional | agree | accuracy |"
    )
    print(header)
    print("|" + "---|" * 16)
    full_ms_by: dict[tuple[str, int], float] = {}
    for bs in args.batch_sizes:
        n = args.n if bs > 1 else args.n1
        xs, ts = x[:n], trace.subset(np.arange(n))
        min_rows = 16 if bs > 1 else 1  # padding would multiply the work at batch 1
        wall: dict[tuple[str, float | None], list[float]] = {}
        cpu: dict[tuple[str, float | None], list[float]] = {}
        inside: dict[tuple[str, float], list[float]] = {}
        calls_cpu: dict[tuple[str, float], list[np.ndarray]] = {}
        results = {}
        stage_wall: dict[str, list[np.ndarray]] = {}
        stage_cpu: dict[str, list[np.ndarray]] = {}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every row
            for b in backends:
                calls[b].reset(k_count)
                c0 = time.process_time()
                full = runners[b].run_full(xs, bs)
                cpu.setdefault((b, None), []).append(time.process_time() - c0)
                wall.setdefault((b, None), []).append(full.total_ms)
                stage_wall.setdefault(b, []).append(full.stage_ms)
                stage_cpu.setdefault(b, []).append(calls[b].cpu.copy())
                for p in policies:
                    calls[b].reset(k_count)
                    c0 = time.process_time()
                    res = runners[b].run(xs, p, batch_size=bs, min_rows=min_rows)
                    cpu.setdefault((b, p.threshold), []).append(time.process_time() - c0)
                    wall.setdefault((b, p.threshold), []).append(res.total_ms)
                    inside.setdefault((b, p.threshold), []).append(calls[b].ms / res.total_ms)
                    calls_cpu.setdefault((b, p.threshold), []).append(calls[b].cpu.copy())
                    results[(b, p.threshold)] = res
        for b in backends:
            full_ms = statistics.median(wall[(b, None)])
            full_cpu = statistics.median(cpu[(b, None)])
            full_ms_by[(b, bs)] = full_ms
            print(
                f"| {b} | {bs} | full model | {k_count - 1} | 1.00 | 1.00 | "
                f"1.00 ({full_ms:.0f} ms) | | 1.00 | 1.00 ({full_cpu * 1e3:.0f} ms) | | | | | | |"
            )
            st = np.median(np.array(stage_wall[b]), axis=0)
            st_cpu = np.median(np.array(stage_cpu[b]), axis=0)
            for p in policies:
                res = results[(b, p.threshold)]
                ee_ms = statistics.median(wall[(b, p.threshold)])
                ee_cpu = statistics.median(cpu[(b, p.threshold)])
                want = exit_index(ts, p)
                agree = np.mean((res.exit == want) & (res.pred == ts.pred[np.arange(n), want]))
                reach = np.array([(res.exit >= k).mean() for k in range(k_count)])
                predicted = costs.full / res.flops.mean()
                stage_pred = st.sum() / (st * reach).sum()
                cpu_pred = st_cpu.sum() / (st_cpu * reach).sum()
                measured, measured_cpu = full_ms / ee_ms, full_cpu / ee_cpu
                acc = np.mean(res.pred == ts.label)
                book = 1 - statistics.median(inside[(b, p.threshold)])
                ee_calls = np.median(np.array(calls_cpu[(b, p.threshold)]), axis=0)
                proportional = ee_calls.sum() / (st_cpu * reach).sum()
                print(
                    f"| {b} | {bs} | {p.threshold:g} | {res.exit.mean():.2f} | {predicted:.2f} | "
                    f"{stage_pred:.2f} | {measured:.2f} ({ee_ms:.0f} ms) | "
                    f"{measured / stage_pred:.2f} | {cpu_pred:.2f} | "
                    f"{measured_cpu:.2f} ({ee_cpu * 1e3:.0f} ms) | {measured_cpu / cpu_pred:.2f} | "
                    f"{measured / predicted:.2f} | {book:.1%} | {proportional:.2f} | "
                    f"{agree:.2%} | {acc:.4f} |"
                )
    print()
    for bs in args.batch_sizes:
        for b in backends:
            if b != "torch" and ("torch", bs) in full_ms_by:
                ratio = full_ms_by[("torch", bs)] / full_ms_by[(b, bs)]
                print(f"full model, batch {bs}: torch eager / {b} wall-clock = {ratio:.2f}")
    print(f"load average after: {load_str()}")


def load_str() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class _Calls:
    """What the instrumented stage and head calls spent since ``reset``: wall milliseconds in
    all (``ms``) and process CPU seconds per stage index (``cpu``, stage k + head k)."""

    def reset(self, k_count: int) -> None:
        self.ms, self.cpu = 0.0, np.zeros(k_count)


def instrument(runner: EarlyExitRunner) -> _Calls:
    """Time every stage and head call of the runner's chains (wall and process CPU time)."""
    acc = _Calls()
    for chain in (runner._float, runner._int8):
        if chain is None:
            continue
        for name in ("stage", "head"):
            call = getattr(chain, name)

            def timed(k, h, call=call):
                t0, c0 = time.perf_counter(), time.process_time()
                out = call(k, h)
                acc.cpu[k] += time.process_time() - c0
                acc.ms += (time.perf_counter() - t0) * 1e3
                return out

            setattr(chain, name, timed)
    return acc


if __name__ == "__main__":
    main()
