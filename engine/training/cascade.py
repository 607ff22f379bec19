"""Train a model cascade: ``python -m engine.train cascade --dataset mnist``.

The members share no parameters, so ``joint`` training (the default) is the same as training
each member on its own on the same minibatches: the summed loss gives each member exactly its
own gradient. ``heads_only`` trains the largest member first, then the smaller ones with it
frozen, which only matters with ``--distill`` (the small members then learn from the large
one's softened outputs, i.e. classic knowledge distillation into the cheap first stage).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine.training.common import seed_everything
from engine.training.multi_exit_cnn import (
    add_common_args,
    exit_accuracy,
    exit_metrics,
    fit,
    load_split,
    parse_weights,
    save_with_card,
)

FAMILY = "cascade"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train cascade", description=__doc__)
    add_common_args(p)
    p.add_argument("--mode", choices=("joint", "heads_only"), default="joint")
    p.add_argument("--head-epochs", type=int, default=1, help="heads_only: epochs, small members")
    p.add_argument("--exit-weights", default=None, help="comma-separated, one per member")
    p.add_argument("--distill", action="store_true", help="distil small members from the last")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    return p


def main(argv: list[str]) -> Path:
    from engine.models.cascade import build, exit_names

    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    model_id = args.model_id or f"{args.dataset}_{FAMILY}"

    x, y, class_names = load_split(args.dataset, "train", args.max_train, args.seed)
    xt, yt, _ = load_split(args.dataset, "test", args.max_test, args.seed)
    config = {"num_classes": len(class_names)}
    model = build(config)
    config = {"num_classes": len(class_names), "members": model.config.members}
    k = model.num_exits
    weights = parse_weights(args.exit_weights, k)
    alpha = args.distill_alpha if args.distill else 0.0

    train_seconds = fit(model, x, y, args, weights, alpha)

    acc = exit_accuracy(model, xt, yt)
    names = exit_names(config)
    metrics = exit_metrics(model, acc, len(yt), names)
    if not args.quiet:
        print("per-member test accuracy:", " ".join(f"{a:.4f}" for a in acc))
        print("cumulative FLOPs:", metrics["flops_cumulative"])
        print(f"trained in {train_seconds:.1f}s")
    return save_with_card(
        model,
        args,
        argv,
        family=FAMILY,
        model_id=model_id,
        title=f"Cascade of {k} CNNs, small to large ({args.dataset})",
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
