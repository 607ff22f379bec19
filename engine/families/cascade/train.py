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

from engine.core.progress import Progress
from engine.families.multi_exit_cnn.loop import add_common_args
from engine.families.multi_exit_cnn.train import train_and_save

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


def main(argv: list[str], progress: Progress | None = None) -> Path:
    from engine.families.cascade.model import build, exit_names

    args = parser().parse_args(argv)
    return train_and_save(
        argv,
        args,
        family=FAMILY,
        build=build,
        exit_names=exit_names,
        make_config=lambda num_classes: {"num_classes": num_classes},
        title=lambda k: f"Cascade of {k} CNNs, small to large ({args.dataset})",
        card_config=lambda model, config: {**config, "members": model.config.members},
        progress=progress,
    )
