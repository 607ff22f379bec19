"""Train a multi-exit residual CNN: ``python -m engine.train multi_exit_cnn --dataset mnist``.

Two training modes, both from the early-exit literature:

* ``joint`` (SDN / BranchyNet): backbone and all exits trained together on the weighted sum of
  the exits' losses, ``sum_k w_k * loss_k / sum_k w_k`` (``--exit-weights``, default all 1).
* ``heads_only`` (SDN's "IC-only", FastBERT's second stage): first the backbone and the last
  exit are trained alone (``--epochs``), then the backbone and the last exit are frozen and only
  the earlier heads are trained (``--head-epochs``). The backbone is then exactly a plain CNN,
  and the early exits cannot make it worse.

* ``jei`` (JEI-DNN, ``train_jei``): the stages of a bundled model (``--backbone``) frozen, new
  heads and one gate per exit trained jointly on the expected loss under the gates' exit
  distribution plus ``--cost-weight`` times the expected cost; the gates ship in the weights.

``--distill`` adds FastBERT-style self-distillation: each earlier exit also matches the last
exit's (detached) softened distribution, ``loss_k = (1 - a) CE + a T^2 KL(p_last^T || p_k^T)``
with ``a = --distill-alpha`` and ``T = --temperature``.

The per-exit test accuracy and the FLOPs of every stage and head are measured after training
and written to the model card with the weights (engine.core.training.save_model).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.progress import Progress
from engine.core.training import (
    command_line,
    image_split,
    save_model,
    seed_everything,
)
from engine.families.multi_exit_cnn.loop import (
    add_common_args,
    exit_accuracy,
    exit_metrics,
    run_epochs,
    split_description,
)

FAMILY = "multi_exit_cnn"


def parse_weights(text: str | None, k: int) -> list[float]:
    if not text:
        return [1.0] * k
    w = [float(v) for v in text.split(",")]
    if len(w) != k or any(v < 0 for v in w) or sum(w) <= 0:
        raise SystemExit(f"--exit-weights needs {k} non-negative numbers, not all zero")
    return w


def multi_exit_loss(
    logits: list[torch.Tensor],
    y: torch.Tensor,
    weights: list[float],
    distill_alpha: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Weighted sum of per-exit losses; optional self-distillation from the last exit."""
    teacher = None
    if distill_alpha > 0:
        teacher = F.softmax(logits[-1].detach() / temperature, dim=1)
    total = logits[0].new_zeros(())
    for k, (z, w) in enumerate(zip(logits, weights, strict=True)):
        if w == 0:
            continue
        loss = F.cross_entropy(z, y)
        if teacher is not None and k < len(logits) - 1:
            kd = F.kl_div(F.log_softmax(z / temperature, dim=1), teacher, reduction="batchmean")
            loss = (1 - distill_alpha) * loss + distill_alpha * temperature**2 * kd
        total = total + w * loss
    return total / sum(weights)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    weights: list[float],
    alpha: float,
) -> float:
    """Train any multi-exit model (stages + heads) by ``args.mode``; returns the seconds spent."""
    k = len(model.heads)
    t0 = time.perf_counter()
    if args.mode == "joint":

        def loss_fn(xb, yb):
            return multi_exit_loss(model(xb), yb, weights, alpha, args.temperature)

        run_epochs(list(model.parameters()), loss_fn, [model], x, y, args, args.epochs, args.seed)
    else:
        # phase 1: a plain CNN (backbone + last exit only)
        last_only = [0.0] * (k - 1) + [1.0]

        def loss_backbone(xb, yb):
            return multi_exit_loss(model(xb), yb, last_only)

        backbone = [*model.stages.parameters(), *model.heads[-1].parameters()]
        run_epochs(
            backbone, loss_backbone, [model], x, y, args, args.epochs, args.seed, "backbone "
        )
        # phase 2: freeze it (batch-norm statistics included), train the earlier heads
        model.eval()
        for prm in backbone:
            prm.requires_grad_(False)
        early = list(model.heads[:-1])
        head_weights = weights[:-1] + [0.0]

        def loss_heads(xb, yb):
            with torch.no_grad():
                hs, h = [], xb
                for stage in model.stages:
                    h = stage(h)
                    hs.append(h)
            logits = [head(h) for head, h in zip(model.heads, hs, strict=True)]
            return multi_exit_loss(logits, yb, head_weights, alpha, args.temperature)

        head_params = [prm for head in early for prm in head.parameters()]
        run_epochs(
            head_params, loss_heads, early, x, y, args, args.head_epochs, args.seed + 1, "heads "
        )
        for prm in backbone:
            prm.requires_grad_(True)
    train_seconds = time.perf_counter() - t0
    return train_seconds


def save_with_card(
    model: nn.Module,
    args: argparse.Namespace,
    argv: list[str],
    *,
    family: str,
    model_id: str,
    title: str,
    config: dict,
    n_train: int,
    n_test: int,
    class_names,
    exit_names: list[str],
    weights: list[float],
    alpha: float,
    train_seconds: float,
    metrics: dict,
) -> Path:
    """Weights + model card for the image multi-exit families (CNN and cascade) share one shape."""
    card = {
        "model_id": model_id,
        "title": args.title or title,
        "family": family,
        "module": f"engine.families.{family}.model",
        "config": config,
        "dataset": args.dataset,
        "split": split_description(args, n_train, n_test),
        "class_names": list(class_names),
        "exit_names": exit_names,
        "seed": args.seed,
        "epochs": args.epochs,
        "training": {
            "mode": args.mode,
            "head_epochs": args.head_epochs if args.mode == "heads_only" else 0,
            "exit_weights": weights,
            "distill": args.distill,
            "distill_alpha": alpha,
            "temperature": args.temperature,
            "optimizer": f"AdamW lr={args.lr} wd={args.weight_decay}, warm-up + cosine",
            "batch_size": args.batch_size,
            "threads": args.threads,
            "preprocessing": "engine.data.images.to_model_input, no augmentation",
        },
        "training_command": command_line(family, argv),
        "train_seconds": round(train_seconds, 1),
        "metrics": metrics,
    }
    return save_model(model, card, args.out_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train multi_exit_cnn", description=__doc__)
    add_common_args(p)
    p.add_argument("--mode", choices=("joint", "heads_only", "jei"), default="joint")
    p.add_argument("--head-epochs", type=int, default=1, help="heads_only: epochs for the heads")
    p.add_argument("--exit-weights", default=None, help="comma-separated, one per exit")
    p.add_argument("--distill", action="store_true", help="self-distil from the last exit")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--widths", default="16,32,64,64")
    p.add_argument("--strides", default="2,2,2,1")
    p.add_argument("--head-pool", type=int, default=1)
    jei = p.add_argument_group("--mode jei (JEI-DNN joint gates on a frozen backbone)")
    jei.add_argument("--backbone", default=None, help="bundled multi_exit_cnn whose stages to use")
    jei.add_argument("--cost-weight", type=float, default=1.0, help="lambda of the cost term")
    jei.add_argument("--mix", type=float, default=0.5, help="uniform share of head weights")
    jei.add_argument("--warmup-epochs", type=int, default=2, help="heads alone, all samples")
    jei.add_argument("--gate-lr", type=float, default=3e-2)
    return p


def train_and_save(
    argv: list[str],
    args: argparse.Namespace,
    *,
    family: str,
    build: Callable[[dict], nn.Module],
    exit_names: Callable[[dict], list[str]],
    make_config: Callable[[int], dict],
    title: Callable[[int], str],
    card_config: Callable[[nn.Module, dict], dict] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Train an image multi-exit family (CNN or cascade), evaluate every exit, write the card.

    ``make_config(num_classes)`` builds the network's config; ``card_config(model, config)``
    may add what the built model decided (the cascade's members); ``title(num_exits)``.
    """
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    model_id = args.model_id or f"{args.dataset}_{family}"

    x, y, class_names, _ = image_split(args.dataset, "train", args.max_train, args.seed)
    xt, yt, _, _ = image_split(args.dataset, "test", args.max_test, args.seed)
    config = make_config(len(class_names))
    model = build(config)
    if card_config is not None:
        config = card_config(model, config)
    k = model.num_exits
    weights = parse_weights(args.exit_weights, k)
    alpha = args.distill_alpha if args.distill else 0.0

    args.progress = progress  # run_epochs reports there (None: tqdm unless --quiet)
    train_seconds = fit(model, x, y, args, weights, alpha)

    acc = exit_accuracy(model, xt, yt)
    names = exit_names(config)
    metrics = exit_metrics(model, acc, len(yt), names)
    if not args.quiet:
        print("per-exit test accuracy:", " ".join(f"{a:.4f}" for a in acc))
        print("cumulative FLOPs:", metrics["flops_cumulative"])
        print(f"trained in {train_seconds:.1f}s")
    return save_with_card(
        model,
        args,
        argv,
        family=family,
        model_id=model_id,
        title=title(k),
        config=config,
        n_train=len(y),
        n_test=len(yt),
        class_names=class_names,
        exit_names=names,
        weights=weights,
        alpha=alpha,
        train_seconds=train_seconds,
        metrics=metrics,
    )


def main(argv: list[str], progress: Progress | None = None) -> Path:
    from engine.families.multi_exit_cnn.model import build, exit_names

    args = parser().parse_args(argv)
    if args.mode == "jei":
        from engine.families.multi_exit_cnn.train_jei import train_jei

        return train_jei(argv, args, progress)
    return train_and_save(
        argv,
        args,
        family=FAMILY,
        build=build,
        exit_names=exit_names,
        make_config=lambda num_classes: {
            "num_classes": num_classes,
            "widths": [int(v) for v in args.widths.split(",")],
            "strides": [int(v) for v in args.strides.split(",")],
            "head_pool": args.head_pool,
        },
        title=lambda k: f"Multi-exit residual CNN ({args.dataset}, {k} exits, {args.mode})",
        progress=progress,
    )
