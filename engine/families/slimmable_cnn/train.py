"""Train a slimmable multi-exit CNN: ``python -m engine.train slimmable_cnn --dataset fashion_mnist``.

Yu & Huang's sandwich rule (Universally Slimmable Networks, 2019): every step trains the
largest width, the smallest width and ``--random-widths`` widths drawn from the others, and sums
their losses before one optimiser step. In-place distillation: the largest width learns from the
labels; every other width learns from the largest width's (detached) last-exit distribution,
blended with the labels, ``(1 - a) CE + a T^2 KL(p_full^T || p^T)`` (``a = --distill-alpha``).
At each width every exit's loss is averaged (as the multi-exit CNN's joint training does), so
width × depth is trained at once. Switchable batch norm keeps one set of statistics per width.

The card records the test accuracy of every (width, exit) and its FLOPs, counted by torch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.training import command_line, image_split, save_model, seed_everything
from engine.families.multi_exit_cnn.loop import add_common_args, run_epochs, split_description
from engine.families.slimmable_cnn.model import SlimmableCNN, build, grid_names, width_names
from engine.families.slimmable_cnn.records import grid_accuracy, grid_costs

FAMILY = "slimmable_cnn"


def sandwich_widths(num_widths: int, random_widths: int, gen: torch.Generator) -> list[int]:
    """Largest, smallest, then ``random_widths`` distinct others drawn with ``gen``."""
    middle = torch.randperm(max(0, num_widths - 2), generator=gen)[:random_widths] + 1
    return [num_widths - 1, 0, *sorted(int(i) for i in middle)]


def sandwich_loss(
    model: SlimmableCNN,
    x: torch.Tensor,
    y: torch.Tensor,
    widths: list[int],
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Sum over the sandwich's widths of the mean loss over that width's exits; the first width
    (the largest) is the in-place teacher."""
    total, teacher = x.new_zeros(()), None
    for w in widths:
        logits = model.run(x, w)
        if teacher is None:
            loss = sum(F.cross_entropy(z, y) for z in logits) / len(logits)
            teacher = F.softmax(logits[-1].detach() / temperature, dim=1)
        else:
            loss = x.new_zeros(())
            for z in logits:
                kd = F.kl_div(F.log_softmax(z / temperature, 1), teacher, reduction="batchmean")
                loss = loss + (1 - alpha) * F.cross_entropy(z, y) + alpha * temperature**2 * kd
            loss = loss / len(logits)
        total = total + loss
    return total


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train slimmable_cnn", description=__doc__)
    add_common_args(p)
    p.add_argument("--channels", default="16,32,64,64", help="full-width channels per stage")
    p.add_argument("--strides", default="2,2,2,1")
    p.add_argument("--width-mults", default="0.25,0.5,0.75,1.0", help="ascending, up to 1.0")
    p.add_argument("--random-widths", type=int, default=1, help="sandwich: random middle widths")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="in-place distillation weight")
    p.add_argument("--temperature", type=float, default=1.0)
    return p


def main(argv: list[str]) -> Path:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    model_id = args.model_id or f"{args.dataset}_{FAMILY}"
    x, y, class_names, _ = image_split(args.dataset, "train", args.max_train, args.seed)
    xt, yt, _, _ = image_split(args.dataset, "test", args.max_test, args.seed)
    config = {
        "num_classes": len(class_names),
        "channels": [int(v) for v in args.channels.split(",")],
        "strides": [int(v) for v in args.strides.split(",")],
        "width_mults": [float(v) for v in args.width_mults.split(",")],
    }
    model = build(config)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def loss_fn(xb, yb):
        widths = sandwich_widths(model.num_widths, args.random_widths, gen)
        return sandwich_loss(model, xb, yb, widths, args.distill_alpha, args.temperature)

    t0 = time.perf_counter()
    run_epochs(list(model.parameters()), loss_fn, [model], x, y, args, args.epochs, args.seed)
    train_seconds = time.perf_counter() - t0

    acc = grid_accuracy(model, xt, yt)  # [W, S]
    costs = grid_costs(model)
    metrics = {
        "width_names": width_names(config),
        "exit_names": [f"stage {s + 1}" for s in range(model.num_stages)],
        # the width cascade's exits: each width run to its last exit
        "test_accuracy": [round(float(a), 5) for a in acc[:, -1]],
        "flops_width": [int(f) for f in costs.last_exit],
        # width × depth: row = width, column = exit; cumulative FLOPs of reaching that exit at
        # that width, the exit heads on the way included (what early exit at one width pays)
        "test_accuracy_grid": [[round(float(a), 5) for a in row] for row in acc],
        "flops_grid": [[int(f) for f in row] for row in costs.cumulative],
        "test_samples": len(yt),
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    if not args.quiet:
        print("per-width test accuracy:", " ".join(f"{a:.4f}" for a in acc[:, -1]))
        print("accuracy grid (width x exit):\n", np.round(acc, 4))
        print("FLOPs per width:", metrics["flops_width"])
        print(f"trained in {train_seconds:.1f}s")
    mults = ", ".join(f"{m:g}" for m in config["width_mults"])
    card = {
        "model_id": model_id,
        "title": args.title or f"Slimmable multi-exit CNN ({args.dataset}, widths {mults})",
        "family": FAMILY,
        "module": f"engine.families.{FAMILY}.model",
        "config": config,
        "dataset": args.dataset,
        "split": split_description(args, len(y), len(yt)),
        "class_names": list(class_names),
        "exit_names": width_names(config),
        "grid_names": grid_names(config),
        "seed": args.seed,
        "epochs": args.epochs,
        "training": {
            "rule": f"sandwich: largest + smallest + {args.random_widths} random width(s) a step",
            "inplace_distillation": {"alpha": args.distill_alpha, "temperature": args.temperature},
            "optimizer": f"AdamW lr={args.lr} wd={args.weight_decay}, warm-up + cosine",
            "batch_size": args.batch_size,
            "threads": args.threads,
            "preprocessing": "engine.data.images.to_model_input, no augmentation",
        },
        "training_command": command_line(FAMILY, argv),
        "train_seconds": round(train_seconds, 1),
        "metrics": metrics,
    }
    return save_model(model, card, args.out_dir)
