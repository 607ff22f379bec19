"""The training loop and evaluation shared by the image trainers (multi-exit CNN, its JEI mode,
cascade, slimmable CNN): common arguments, AdamW with warm-up + cosine per step, per-exit
accuracy and the card's metrics. A module of its own so that a mode of one trainer can use it
without the trainer importing the mode back."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from engine.core.progress import terminal
from engine.core.training import cosine_lr, train_epochs
from engine.data import images
from engine.paths import MODELS_DIR
from engine.run.exits import exit_costs


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", choices=images.DATASETS)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (results depend on it)"
    )
    p.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--model-id", default=None, help="default: <dataset>_<family>")
    p.add_argument("--title", default=None)
    p.add_argument("--max-train", type=int, default=None, help="use only N training images")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--quiet", action="store_true")


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int, warmup: int = 50):
    """Linear warm-up then cosine decay to zero, per step."""
    return cosine_lr(opt, total_steps, warmup=min(warmup, max(1, total_steps // 10)))


def run_epochs(
    params: list[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_modules: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    epochs: int,
    seed: int,
    label: str = "",
) -> None:
    """Minibatch AdamW over (x, y) for ``epochs``; order from a generator seeded by ``seed``;
    a bar of steps per epoch, with the epoch's loss so far, to ``args.progress`` (set by
    ``train_and_save``), else tqdm."""
    progress = getattr(args, "progress", None) or terminal(args.quiet)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    for m in train_modules:
        m.train()

    def batch_loss(b: torch.Tensor):
        return loss_fn(x[b], y[b]), {}

    train_epochs(
        opt, batch_loss, len(y), args.batch_size, epochs, seed, progress,
        label=label, schedule=cosine_schedule,
    )  # fmt: skip


@torch.no_grad()
def exit_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500):
    """Per-exit accuracy of a contract model (``forward`` returns K logits) on (x, y)."""
    model.eval()
    correct = None
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        hits = torch.stack([(z.argmax(1) == y[i : i + batch]).sum() for z in logits])
        correct = hits if correct is None else correct + hits
    return [float(c) / len(y) for c in correct]


def exit_metrics(model: nn.Module, acc: list[float], n_test: int, names: list[str]) -> dict:
    costs = exit_costs(model)
    stage_f, head_f = [int(f) for f in costs.stage], [int(f) for f in costs.head]
    cumulative = costs.cumulative.tolist()
    return {
        "exit_names": names,
        "test_accuracy": [round(a, 5) for a in acc],
        "test_samples": n_test,
        "flops_stage": stage_f,
        "flops_head": head_f,
        # cost of reaching exit k and evaluating every head on the way (what early exit pays)
        "flops_cumulative": [int(c) for c in cumulative],
        # the same network run to the end without the intermediate heads
        "flops_backbone_last_exit": int(sum(stage_f) + head_f[-1]),
        "params": int(sum(p.numel() for p in model.parameters())),
    }


# --- the multi-exit CNN ------------------------------------------------------------------


def split_description(args: argparse.Namespace, n_train: int, n_test: int) -> dict:
    origin = (
        "scikit-learn digits, fixed 75/25 split (seed 0) from engine.data.images"
        if args.dataset == "digits"
        else "the official train/test split"
    )
    train = f"train split, {n_train} images"
    if args.max_train:
        train += f" (seeded subset, --max-train {args.max_train})"
    return {
        "source": origin,
        "train": train,
        "test": f"test split, {n_test} images (all metrics)",
        "validation": "none; hyper-parameters fixed in advance, no early stopping",
    }
