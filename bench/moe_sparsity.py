"""Sparse MoE execution: measured time per token vs the dense-equivalent model and vs FLOPs.

    python bench/moe_sparsity.py [--batch 256] [--reps 15] [--threads 1]

For the bundled dynamic-k model (D2DMoE) at several tau, and the top-k model at k=1 and k=2,
prints per batch size: FLOPs per sample (counted by FlopCounterMode as executed) relative to the
dense-equivalent model (every MLP as one matmul pair, no router), and the measured time per
token (median of ``--reps`` runs) relative to the same dense model. Also times dense
compute-then-mask, which has the dense cost whatever tau is. All ratios come from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.data import images
from engine.families import load_model
from engine.families.moe import analysis as moe
from engine.families.moe.model import FlopMeter, Routing


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flops_of(model, x, routing=None, dense=False) -> float:
    meter = FlopMeter(len(x))
    with torch.no_grad():
        model.forward_dense(x, meter) if dense else model(x, routing, meter=meter)
    return float(meter.flops.mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data = images.load("fashion_mnist", "test").images
    except images.DatasetUnavailable:
        data = moe.gallery("fashion_mnist")[0].images
    dyn, topk = load_model("fashion_d2dmoe_vit"), load_model("fashion_moe_vit")
    rows = [(dyn, f"D2DMoE tau={t:g}", Routing(tau=t), False) for t in (0, 0.2, 0.4, 0.6, 0.8, 1)]
    rows += [(dyn, "D2DMoE tau=0.4, dense compute-then-mask", Routing(tau=0.4), True)]
    rows += [(topk, f"top-{k} (no capacity limit)", Routing(k=k), False) for k in (1, 2)]
    tokens = dyn.config.tokens
    print(f"threads={args.threads}, reps={args.reps}, {tokens} tokens per image, times: median")
    for b in args.batch:
        x = images.to_model_input(data[:b])
        with torch.no_grad():
            dense_ms = median_ms(lambda x=x: dyn.forward_dense(x), args.reps)
        dense_f = flops_of(dyn, x, dense=True)
        print(
            f"\nbatch {b}: dense-equivalent model {dense_ms / (b * tokens) * 1e3:.2f} µs/token, "
            f"{dense_f / 1e6:.2f} MFLOPs/sample"
        )
        print(
            f"{'setting':<42}{'experts/tok':>12}{'FLOPs/dense':>13}{'µs/token':>10}"
            f"{'time/dense':>12}"
        )
        for model, name, routing, masked in rows:
            with torch.no_grad():
                ms = median_ms(
                    lambda m=model, r=routing, d=masked, x=x: m(x, r, dense_masked=d), args.reps
                )
                out = model(x, routing)
            ept = torch.stack([r.chosen.sum(-1).float() for r in out.layers]).mean().item()
            f = flops_of(model, x, routing) if not masked else float("nan")
            print(
                f"{name:<42}{ept:>12.2f}{f / dense_f:>13.2f}{ms / (b * tokens) * 1e3:>10.2f}"
                f"{ms / dense_ms:>12.2f}"
            )


if __name__ == "__main__":
    main()
