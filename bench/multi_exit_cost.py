"""FLOPs vs wall-clock per exit, and what inference optimisations do to each stage's time.

    python bench/multi_exit_cost.py [--compile] [--clock cpu|wall] [--repeats 7] [--n-agree 2000]

Part 1, per exit of the bundled multi-exit CNN and cascade: the cumulative FLOPs and the
cumulative measured time (stages and heads up to that exit, median of repeats, 1 thread), both as
ratios to the last exit, at batch 256 and 1.

Part 2, the multi-exit CNN at batch 256, 1 thread: each inference variant's time for stage k +
head k (the runtime's unit), as a ratio to its baseline, per stage and for the whole network,
and the whole network against torch eager. Variants (``engine.run.optimize``): torch eager,
batch norm folded into the convolutions (torch.fx ``fuse``), + channels_last, + torch.compile
(``--compile``, off by default: about a minute of compilation, printed apart); ONNX Runtime
float32 at each graph optimisation level (baseline: no optimisation); int8 schemes (QDQ /
QOperator, per-channel / per-tensor weights, u8 / s8 activations; baseline: ONNX Runtime float32
at level "all", the runtime's default) and a mixed chain that keeps int8 only on the stages
where the fastest scheme measured <= 0.9 x float. Variants are timed interleaved (one pass of
each per repeat), median of repeats, by process CPU time (``--clock wall`` for wall-clock).
Agreement with torch eager on the first ``--n-agree`` MNIST test images: argmax equal (worst
exit) and max |dprob| (float variants), accuracy at the last exit (all). Load average printed
before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.data import gallery, images  # noqa: E402
from engine.families import load_model  # noqa: E402
from engine.run import optimize  # noqa: E402
from engine.run.exits import exit_costs  # noqa: E402
from engine.run.onnx_export import (  # noqa: E402
    GRAPH_LEVELS,
    Int8Scheme,
    OnnxSessions,
    export_chain,
    quantize_chain,
)

REPEATS = {256: 7, 1: 200}
MODEL = "mnist_multi_exit_cnn"
INT8_SCHEMES = {  # weights int8; activations s8 or u8
    "int8 QDQ per-channel s8 (former onnx_int8)": Int8Scheme("qdq", True, "int8"),
    "int8 QDQ per-channel u8": Int8Scheme("qdq", True, "uint8"),
    "int8 QDQ per-tensor u8": Int8Scheme("qdq", False, "uint8"),
    "int8 QOperator per-channel u8 (onnx_int8)": Int8Scheme("qoperator", True, "uint8"),
    "int8 QOperator per-tensor u8": Int8Scheme("qoperator", False, "uint8"),
    "int8 QOperator per-channel s8": Int8Scheme("qoperator", True, "int8"),
}


def load_str() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@torch.no_grad()
def cumulative_times(model, x: torch.Tensor, repeats: int) -> np.ndarray:
    runs = []
    for _ in range(repeats):
        h, spent, row = x, 0.0, []
        for stage, head in zip(model.stages, model.heads, strict=True):
            t0 = time.perf_counter()
            h = stage(h)
            head(h)
            spent += time.perf_counter() - t0
            row.append(spent)
        runs.append(row)
    return np.median(np.array(runs), axis=0) * 1e3


def per_exit(repeats: dict[int, int]) -> None:
    for model_id, dataset in ((MODEL, "mnist"), ("mnist_cascade", "mnist")):
        model = load_model(model_id)
        x = images.to_model_input(gallery.test_images(dataset).data.images[:256])
        flops = exit_costs(model).cumulative
        print(f"\n{model_id}: cumulative MFLOPs/sample {np.round(flops / 1e6, 3).tolist()}")
        print(f"  FLOPs / last exit        {np.round(flops / flops[-1], 3).tolist()}")
        for batch, reps in repeats.items():
            t = cumulative_times(model, x[:batch], reps)
            print(
                f"  time / last exit, b={batch:<3} {np.round(t / t[-1], 3).tolist()}"
                f"  (last exit {t[-1] / batch * 1e3:.0f} µs/sample)"
            )


class _Variant:
    """One row of the table: stage/head callables on its own activations, and its baseline."""

    def __init__(self, name, start, stage, head, baseline, is_float=True, build_s=None):
        self.name, self.start, self.stage, self.head = name, start, stage, head
        self.baseline, self.is_float, self.build_s = baseline, is_float, build_s
        self.ms: list[np.ndarray] = []


def _torch_variant(ts: optimize.TorchStages, baseline: str) -> _Variant:
    return _Variant(
        f"torch {ts.name}",
        ts.start,
        lambda k, h: ts.stages[k](h),
        lambda k, h: ts.heads[k](h),
        baseline,
        build_s=ts.build_s,
    )


def _ort_variant(name: str, sess: OnnxSessions, baseline: str, is_float: bool) -> _Variant:
    return _Variant(
        name,
        lambda x: np.ascontiguousarray(x.numpy(), dtype=np.float32),
        sess.stage,
        sess.head,
        baseline,
        is_float,
    )


def optimisations(n_agree: int, repeats: int, compile_: bool, clock_name: str) -> None:
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    model = load_model(MODEL)
    data = images.load("mnist", "test")
    x_all = images.to_model_input(data.images[:n_agree])
    x = x_all[:256]
    calib = images.to_model_input(images.load("mnist", "train").images[:512])
    k_count = len(model.stages)
    chain = export_chain(model, model_id=MODEL)
    print(
        f"\n{MODEL}: inference variants, batch 256, 1 thread, median of {repeats}, "
        f"{'process CPU time' if clock_name == 'cpu' else 'wall-clock'}"
    )

    variants: list[_Variant] = []
    for name in optimize.TORCH_VARIANTS:
        if name == "compile" and not compile_:
            continue
        ts = optimize.torch_stages(model, name)
        v = _torch_variant(ts, "torch eager")
        if name == "compile":  # Inductor compiles on the first call at each shape
            t0 = time.perf_counter()
            with torch.inference_mode():
                optimize.all_logits(v.stage, v.head, v.start(x), k_count)
                optimize.all_logits(v.stage, v.head, v.start(x_all[:n_agree]), k_count)
            v.build_s = time.perf_counter() - t0
        variants.append(v)
    for level in GRAPH_LEVELS:
        sess = OnnxSessions(chain, 1, level=level, save_optimized=level != "disable")
        variants.append(_ort_variant(f"ORT float32, level {level}", sess, "ORT disable", True))
    for name, scheme in INT8_SCHEMES.items():
        t0 = time.perf_counter()
        q = quantize_chain(model, chain, calib, scheme)
        v = _ort_variant(name, OnnxSessions(q, 1), "ORT all", False)
        v.build_s, v.chain = time.perf_counter() - t0, q
        variants.append(v)

    def timed_pass(vs: list[_Variant], reps: int) -> None:
        with torch.inference_mode():
            for v in vs:  # warm-up
                optimize.stage_times(v.stage, v.head, v.start(x), k_count, 1, clock)
            for _ in range(reps):  # interleaved: drift in machine load hits every row
                for v in vs:
                    v.ms.append(
                        optimize.stage_times(v.stage, v.head, v.start(x), k_count, 1, clock)
                    )

    timed_pass(variants, repeats)
    med = {v.name: np.median(np.array(v.ms), axis=0) for v in variants}
    # int8 only where it pays: the fastest int8 scheme, per stage, against float ORT "all"
    int8_rows = [v for v in variants if not v.is_float]
    best = min(int8_rows, key=lambda v: med[v.name].sum())
    f_ms = med["ORT float32, level all"]
    use = optimize.pick_int8_stages(f_ms, med[best.name])
    float_chain = export_chain(model, model_id=MODEL)
    mixed = optimize.mixed_chain(float_chain, best.chain, use)
    mv = _ort_variant(
        f"mixed: {best.name.removeprefix('int8 ')} on stages "
        f"{[k + 1 for k, u in enumerate(use) if u] or 'none'}",
        OnnxSessions(mixed, 1),
        "ORT all",
        False,
    )
    ref = variants[0]
    alias = {"torch eager": ref.name, "ORT disable": "ORT float32, level disable"}
    alias["ORT all"] = "ORT float32, level all"
    # the mixed chain is timed in a second pass, against the same run's eager and float ORT
    second = [ref, next(v for v in variants if v.name == alias["ORT all"]), mv]
    for v in second:
        v.ms = []
    timed_pass(second, repeats)
    med2 = {v.name: np.median(np.array(v.ms), axis=0) for v in second}

    with torch.inference_mode():
        ref_logits = optimize.all_logits(ref.stage, ref.head, ref.start(x_all), k_count)
    labels = data.labels[:n_agree]
    print(
        "| variant | baseline | stage 1 | stage 2 | stage 3 | stage 4 | whole | whole / torch eager "
        "| argmax = eager (worst exit) | max abs dprob | accuracy (last exit) | build s |"
    )
    print("|" + "---|" * 12)
    for v in [*variants, mv]:
        m = med2 if v is mv else med
        base, eager_ms = m[alias[v.baseline]], m[ref.name].sum()
        ratio = m[v.name] / base
        with torch.inference_mode():
            logits = optimize.all_logits(v.stage, v.head, v.start(x_all), k_count)
        ag = optimize.agreement(ref_logits, logits, labels)
        build = f"{v.build_s:.1f}" if v.build_s is not None else ""
        print(
            f"| {v.name} | {v.baseline} | "
            + " | ".join(f"{r:.2f}" for r in ratio)
            + f" | {m[v.name].sum() / base.sum():.2f} ({m[v.name].sum():.1f} ms) | "
            f"{m[v.name].sum() / eager_ms:.2f} | {ag.argmax_equal.min():.4f} | "
            f"{ag.max_abs_dprob.max():.1e} | {ag.accuracy[-1]:.4f} | {build} |"
        )
    print(
        f"int8 vs float ORT (level all), whole network: best scheme {best.name} "
        f"{med[best.name].sum() / f_ms.sum():.2f}×, mixed "
        f"{med2[mv.name].sum() / med2[alias['ORT all']].sum():.2f}× "
        f"(< 1 = int8 faster); stages where int8 pays (≤ 0.9×): "
        f"{[k + 1 for k, u in enumerate(use) if u] or 'none'}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--n-agree", type=int, default=2000)
    ap.add_argument("--compile", action="store_true", help="add torch.compile (~60 s to compile)")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="time the variants by process CPU time (default: robust on a shared machine; one "
        "thread, so it is compute time) or wall-clock",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # already set in this process (e.g. under pytest)
        torch.set_num_interop_threads(1)
    print(f"load average before: {load_str()}")
    per_exit(REPEATS)
    optimisations(args.n_agree, args.repeats, args.compile, args.clock)
    print(f"\nload average after: {load_str()}")


if __name__ == "__main__":
    main()
