"""Train PonderNet on parity: ``python -m engine.train pondernet``.

The data are ACT's (``engine.families.act.model.parity_data``): every step draws a fresh seeded batch, and
the test set is the same strings as ACT's (same size, seed and number of bits), so the two
families are compared on identical inputs. Loss (Banino et al. 2021, eq. 4-6):

    sum_n p_n CE(y^n, target)  +  beta KL(p || p_G(lambda_p))     (--beta, --lambda-p)

Afterwards the test set is run with real halting at the threshold q (``model.run``) and, unless
``--no-traces``, its records are written to ``<traces-dir>/records/<model_id>__test.parquet``.
``--quick`` caps the run at a few batches and a small test set (tests, smoke runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from engine.core.progress import Progress
from engine.core.training import (
    add_output_args,
    print_saved,
    save_model,
    seed_everything,
)
from engine.families.act.model import parity_data, step_flops
from engine.families.act.train import (
    halting_metrics,
    length_metrics,
    parity_card,
    train_on_parity,
)
from engine.families.pondernet import model as pn
from engine.families.pondernet import records

FAMILY = "pondernet"
QUICK_STEPS, QUICK_TEST = 60, 400


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train pondernet", description=__doc__)
    p.add_argument("--num-bits", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--cell", choices=("gru", "rnn", "mlp"), default="rnn")
    p.add_argument("--max-steps", type=int, default=12, help="M, the most steps (M halts)")
    p.add_argument("--q", type=float, default=0.5, help="inference: halt when P(N <= n) >= q")
    p.add_argument("--lambda-p", type=float, default=0.2, help="geometric prior's halting prob.")
    p.add_argument("--beta", type=float, default=0.01, help="weight of KL(p || prior)")
    p.add_argument("--halt-bias-init", type=float, default=-2.0)
    p.add_argument("--steps", type=int, default=7000, help="training steps (batches)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=int, default=4000)
    p.add_argument("--test-seed", type=int, default=12345, help="ACT's test set by default")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, {QUICK_TEST} tests")
    add_output_args(p, "parity_pondernet")
    return p


def train(model: pn.PonderNet, args, steps: int, progress: Progress | None = None) -> None:
    def batch_loss(out: dict, y: torch.Tensor):
        loss, rec, kl = pn.ponder_loss(out, y, args.lambda_p, args.beta)
        return loss, {"rec": rec, "kl": kl}

    train_on_parity(model, batch_loss, args, steps, progress)  # ACT's stream for the same seed


def evaluate(model: pn.PonderNet, x, y, length, num_bits: int) -> dict:
    """The card's metrics: real halting at the config's q, sampled halting (seed 0), and E[N]."""
    real = pn.run(model, x)
    sampled = pn.run(model, x, sample=True, seed=0)
    steps, correct = real.steps, real.pred == y
    lam, _ = pn.halting_scores(model, x)
    return {
        "test_samples": len(y),
        "q": model.config.q,
        **halting_metrics(steps, correct),
        "mean_flops": float(real.flops.mean()),
        "flops_per_step": step_flops(model),
        **length_metrics(steps, correct, length, num_bits),
        "mean_expected_steps": round(
            float(pn.expected_steps(pn.halting_distribution(lam)).mean()), 4
        ),
        "sampled_accuracy": round(float((sampled.pred == y).mean()), 5),
        "sampled_mean_steps": round(float(sampled.steps.mean()), 4),
        "params": int(sum(p.numel() for p in model.parameters())),
    }


def main(argv: list[str] | None = None, progress: Progress | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    steps = min(args.steps, QUICK_STEPS) if args.quick else args.steps
    test_size = min(args.test_size, QUICK_TEST) if args.quick else args.test_size
    config = pn.PonderNetConfig(
        num_bits=args.num_bits,
        hidden=args.hidden,
        cell=args.cell,
        max_steps=args.max_steps,
        q=args.q,
        halt_bias_init=args.halt_bias_init,
    )
    model = pn.PonderNet(config)
    # wall-clock is inflated on a shared machine; the CPU time of this single-threaded process
    # is what the run costs on a quiet core
    load_before, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    train(model, args, steps, progress)
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    x, y, length = parity_data(test_size, args.num_bits, seed=args.test_seed)
    metrics = evaluate(model, x, y, length, args.num_bits)
    training = {
        "method": "PonderNet (Banino 2021): sum_n p_n CE(y_n) + beta KL(p || Geometric(lambda_p))",
        "lambda_p": args.lambda_p,
        "beta": args.beta,
        "max_steps": args.max_steps,
        "halt_bias_init": args.halt_bias_init,
        "train_steps": steps,
        "quick": args.quick,
    }
    timings = {
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    title = (
        f"PonderNet on {args.num_bits}-bit parity (Banino 2021), "
        f"λp = {args.lambda_p:g}, β = {args.beta:g}"
    )
    card = parity_card(args, argv, FAMILY, title, config, training, timings, metrics)
    path = save_model(model, card, args.out_dir)
    if not args.no_traces:
        records.write_records(
            model, args.model_id, x, y, length, args.traces_dir,
            lambda_p=args.lambda_p, beta=args.beta, test_seed=args.test_seed,
        )  # fmt: skip
    if not args.quiet:
        print_saved(path, f"{train_seconds:.0f}s training, {cpu_seconds:.0f}s CPU", metrics)
    return card


if __name__ == "__main__":
    main()
