"""Train ACT on images: ``python -m engine.train act_cnn`` (MNIST by default).

Loss, as in Graves (2016) and ``engine/families/act/train.py``:

    -log( sum_n p^n y^n[label] )  +  tau * (N + R)          (tau = --ponder-cost)

Afterwards the test set is run with real halting (``act.run_act``); unless ``--no-traces`` the
halting records (halting score and step output of every ponder step for every test image, plus
its difficulty: the earliest exit of ``--difficulty-model`` that gets it right) are written to
``<traces-dir>/records/<model_id>__test.parquet`` for the halting page.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engine.core.progress import Progress, terminal
from engine.core.training import (
    add_output_args,
    command_line,
    image_split,
    print_saved,
    save_model,
    seed_everything,
    train_epochs,
)
from engine.data import images
from engine.families.act import model as act
from engine.families.act.train import halting_metrics
from engine.families.act_cnn import model as act_cnn

FAMILY = "act_cnn"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train act_cnn", description=__doc__)
    p.add_argument("--dataset", choices=images.DATASETS, default="mnist")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--readout", choices=("pool", "flatten"), default="pool")
    p.add_argument("--max-steps", type=int, default=8, help="M, the most ponder steps")
    p.add_argument("--eps", type=float, default=0.01, help="halt when cum. halting >= 1 - eps")
    p.add_argument("--ponder-cost", type=float, default=0.01, help="tau, weight of N + R")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="use only N training images")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--max-steps-train", type=int, default=None, help="stop early (quick runs)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--difficulty-model",
        default=None,
        help="early-exit model whose bundled test trace rates difficulty "
        "(default: <dataset>_multi_exit_cnn)",
    )
    add_output_args(p, None, "default: <dataset>_act")
    return p


def train(model: act_cnn.ACTConvNet, x: torch.Tensor, y: torch.Tensor, args, progress=None) -> None:
    def batch_loss(b: torch.Tensor):
        out = model(x[b])
        loss, nll = act.act_loss(out, y[b], args.ponder_cost)
        return loss, {"nll": nll, "steps": out["steps"].float().mean()}

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    model.train()
    train_epochs(
        opt, batch_loss, len(y), args.batch_size, args.epochs, args.seed,
        progress or terminal(args.quiet), max_steps=args.max_steps_train, clip=1.0,
    )  # fmt: skip
    model.eval()


def main(argv: list[str] | None = None, progress: Progress | None = None) -> dict:
    argv = list(argv or [])
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    model_id = args.model_id or f"{args.dataset}_act"
    x, y, class_names, _ = image_split(args.dataset, "train", args.max_train, args.seed)
    xt, yt, _, te = image_split(args.dataset, "test", args.max_test, args.seed)
    yt = yt.numpy()

    config = act_cnn.Config(
        num_classes=len(class_names),
        width=args.width,
        readout=args.readout,
        max_steps=args.max_steps,
        eps=args.eps,
    )
    model = act_cnn.ACTConvNet(config)
    t0 = time.perf_counter()
    train(model, x, y, args, progress)
    train_seconds = time.perf_counter() - t0

    from engine.families.act import records as halting

    rec = act.run_act(model, xt)
    steps, correct = rec["steps"], rec["pred"] == yt
    counts = np.bincount(steps, minlength=config.max_steps + 1)[1:]
    metrics = {
        "test_samples": len(yt),
        **halting_metrics(steps, correct),
        "steps_histogram": [int(c) for c in counts],
        "mean_steps_correct": round(float(steps[correct].mean()), 4),
        "mean_steps_wrong": round(float(steps[~correct].mean()), 4) if (~correct).any() else None,
        "mean_ponder_cost": round(float(rec["ponder_cost"].mean()), 4),
        "mean_flops": float(rec["flops"].mean()),
        "encode_flops": act.encode_flops(model),
        "flops_per_step": act.step_flops(model),
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    difficulty_model = args.difficulty_model or f"{args.dataset}_multi_exit_cnn"
    difficulty = halting.early_exit_difficulty(difficulty_model, te)
    if difficulty is not None:
        metrics["difficulty"] = halting.difficulty_summary(steps, difficulty, correct)
    card = {
        "model_id": model_id,
        "title": f"ACT conv net ({args.dataset}, Graves 2016)",
        "family": FAMILY,
        "module": "engine.families.act_cnn.model",
        "config": config.to_dict(),
        "dataset": args.dataset,
        "split": "train",
        "class_names": list(class_names),
        "seed": args.seed,
        "epochs": args.epochs,
        "training": {
            "method": "ACT (Graves 2016): halting unit, N(t), remainder R(t), ponder cost N+R",
            "ponder_cost_weight_tau": args.ponder_cost,
            "eps": args.eps,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "threads": args.threads,
            "max_train": args.max_train,
            "max_steps_train": args.max_steps_train,
            "difficulty_model": difficulty_model,
        },
        "training_command": command_line(FAMILY, argv),
        "train_seconds": round(train_seconds, 1),
        "metrics": metrics,
    }
    path = save_model(model, card, args.out_dir)
    if not args.no_traces:
        halting.write_image_records(
            model,
            model_id,
            xt,
            yt,
            te,
            difficulty,
            args.traces_dir,
            tau=args.ponder_cost,
            dataset=args.dataset,
            class_names=list(class_names),
            difficulty_model=difficulty_model,
        )
    if not args.quiet:
        print_saved(path, f"{train_seconds:.0f}s training", metrics)
    return card
