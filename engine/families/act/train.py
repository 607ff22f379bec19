"""Train Graves' ACT on parity: ``python -m engine.train act``.

Every step draws a fresh batch of parity strings from a seeded generator (as in the ACT paper,
where the training data is unlimited), so ``--steps`` sets the amount of data. Loss:

    -log( sum_n p^n y^n[target] )  +  tau * (N + R)          (tau = --ponder-cost)

Afterwards a fixed test set (``--test-size`` strings, seed ``--test-seed``) is evaluated with
real halting (``run_act``), and unless ``--no-traces`` its records (halting score and step output
of every ponder step, length, label) are written to ``<traces-dir>/records/<model_id>__test.parquet``
for the halting page (see ``engine.families.act.records``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from engine.core.progress import Meter, Progress, terminal, track
from engine.core.stats import spearman
from engine.core.training import (
    add_output_args,
    command_line,
    cosine_lr,
    print_saved,
    save_model,
    seed_everything,
)
from engine.families.act import model as act

FAMILY = "act"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train act", description=__doc__)
    p.add_argument("--num-bits", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--cell", choices=("gru", "rnn", "mlp"), default="rnn")
    p.add_argument("--max-steps", type=int, default=12, help="M, the most ponder steps")
    p.add_argument("--eps", type=float, default=0.01, help="halt when cum. halting >= 1 - eps")
    p.add_argument("--ponder-cost", type=float, default=1e-4, help="tau, weight of N + R")
    p.add_argument("--steps", type=int, default=60000, help="training steps (batches)")
    p.add_argument("--max-steps-train", type=int, default=None, help="cap --steps (quick runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=int, default=4000)
    p.add_argument("--test-seed", type=int, default=12345)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_output_args(p, "parity_act")
    return p


def train(model: act.ACTNet, args, progress: Progress | None = None) -> None:
    steps = args.steps if args.max_steps_train is None else min(args.steps, args.max_steps_train)

    def batch_loss(out: dict, y: torch.Tensor):
        loss, nll = act.act_loss(out, y, args.ponder_cost)
        return loss, {"nll": nll, "steps": out["steps"].float().mean()}

    train_on_parity(model, batch_loss, args, steps, progress)


def train_on_parity(
    model: nn.Module,
    batch_loss: Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    args,
    steps: int,
    progress: Progress | None = None,
) -> None:
    """Adam with a cosine schedule over ``steps`` fresh parity batches (batch i drawn at seed
    ``args.seed * 1_000_003 + i``: ACT's and PonderNet's training stream for the same seed),
    gradients clipped to norm 1. ``batch_loss(model(x), y)`` gives (loss, the tensors the bar
    shows beside it, averaged over the last 100 steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = cosine_lr(opt, steps)
    rng_seed = args.seed * 1_000_003
    model.train()
    progress = progress or terminal(args.quiet)
    meter = Meter(progress, "steps", window=100)
    for i in track(range(steps), "steps", progress):
        x, y, _ = act.parity_data(args.batch_size, args.num_bits, seed=rng_seed + i)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        loss, shown = batch_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        meter.add(loss=loss.item(), **{k: v.item() for k, v in shown.items()})
    model.eval()


def halting_metrics(steps: np.ndarray, correct: np.ndarray) -> dict:
    """The card's accuracy and steps taken, for any pondering model's real run."""
    return {
        "accuracy": round(float(correct.mean()), 5),
        "mean_steps": round(float(steps.mean()), 4),
        "max_steps_taken": int(steps.max()),
        "min_steps_taken": int(steps.min()),
    }


def length_metrics(steps: np.ndarray, correct: np.ndarray, length: np.ndarray, num_bits: int):
    """The card's steps and accuracy against the parity string's length (1..num_bits)."""
    lengths = range(1, num_bits + 1)
    return {
        "spearman_steps_vs_length": round(spearman(steps, length), 4),
        "mean_steps_by_length": [round(float(steps[length == k].mean()), 3) for k in lengths],
        "accuracy_by_length": [round(float(correct[length == k].mean()), 4) for k in lengths],
    }


def parity_card(
    args, argv: list[str], family: str, title: str, config, training: dict, timings: dict, metrics
) -> dict:
    """The model card of a network trained on parity strings (ACT, PonderNet): the family's
    ``training`` record and ``timings`` in the fields every card has."""
    return {
        "model_id": args.model_id,
        "title": title,
        "family": family,
        "module": f"engine.families.{family}.model",
        "config": config.to_dict(),
        "dataset": f"parity{args.num_bits}",
        "split": "generated",
        "class_names": ["even", "odd"],
        "seed": args.seed,
        "epochs": 1,
        "training": {
            **training,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "threads": args.threads,
            "test_seed": args.test_seed,
        },
        "training_command": command_line(family, argv),
        **timings,
        "metrics": metrics,
    }


def main(argv: list[str] | None = None, progress: Progress | None = None) -> dict:
    argv = list(argv or [])
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    config = act.Config(
        num_bits=args.num_bits,
        hidden=args.hidden,
        cell=args.cell,
        max_steps=args.max_steps,
        eps=args.eps,
    )
    model = act.ACTNet(config)
    t0 = time.perf_counter()
    train(model, args, progress)
    train_seconds = time.perf_counter() - t0

    x, y, length = act.parity_data(args.test_size, args.num_bits, seed=args.test_seed)
    rec = act.run_act(model, x)
    steps, correct = rec["steps"], rec["pred"] == y
    metrics = {
        "test_samples": int(args.test_size),
        **halting_metrics(steps, correct),
        "mean_ponder_cost": round(float(rec["ponder_cost"].mean()), 4),
        "mean_flops": float(rec["flops"].mean()),
        "flops_per_step": act.step_flops(model),
        **length_metrics(steps, correct, length, args.num_bits),
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    training = {
        "method": "ACT (Graves 2016): halting unit, N(t), remainder R(t), ponder cost N+R",
        "ponder_cost_weight_tau": args.ponder_cost,
        "eps": args.eps,
        "max_steps": args.max_steps,
        "train_steps": args.steps,
        "max_steps_train": args.max_steps_train,
    }
    title = f"ACT on {args.num_bits}-bit parity (Graves 2016), τ = {args.ponder_cost:g}"
    card = parity_card(
        args, argv, FAMILY, title, config, training,
        {"train_seconds": round(train_seconds, 1)}, metrics,
    )  # fmt: skip
    path = save_model(model, card, args.out_dir)
    if not args.no_traces:
        from engine.families.act import records as halting

        halting.write_records(
            model, args.model_id, x, y, length, args.traces_dir, tau=args.ponder_cost
        )
    if not args.quiet:
        print_saved(path, f"{train_seconds:.0f}s training", metrics)
    return card
