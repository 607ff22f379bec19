"""``python -m engine.build MODEL``: build a bundled model's per-sample results, any family.

Early-exit models and cascades get their trace (every exit's probabilities on the split);
the other families write their per-sample results over their setting (``Results``, Parquet).
A model is refused on a data set it was not trained on unless ``--force``; a family that cannot
build results says why in one line. ``--ray [ADDRESS]`` builds the trace on Ray instead (a local
instance with ``--workers`` workers, or the cluster at ADDRESS; ``engine.run.ray_build``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine import families
from engine.core.family import FamilyError
from engine.core.progress import Progress, terminal
from engine.data.images import DatasetUnavailable
from engine.registry import RegistryError, get_card


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.split("\n")[0])
    p.add_argument("model", help="bundled model id (assets/models/<id>.json)")
    p.add_argument("--dataset", default=None, help="default: the data set in the model's card")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--out", type=Path, default=None, help="output .parquet (traces: or .csv)")
    p.add_argument("--force", action="store_true", help="allow a data set the model never saw")
    p.add_argument("--threads", type=int, default=1, help="torch threads (per Ray worker)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="build the trace on Ray: alone, a local instance on this machine; with ADDRESS "
        "(host:port of `ray start --head`, or auto), that cluster",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray workers (actors); with --ray")
    p.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="with --ray: keep the Parquet shards here (on a cluster: a directory every node "
        "shares); default a temp dir, removed after the gather",
    )
    return p


def write_trace(trace, out: Path) -> str:
    """Write a trace as .parquet or .csv (by suffix); returns the line to print."""
    if out.suffix.lower() == ".csv":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(trace.to_csv_bytes())
    else:
        trace.write_parquet(out)
    acc = " ".join(f"{a:.4f}" for a in trace.correct.mean(axis=0))
    return f"{out}: trace, {trace.num_samples} samples x {trace.num_exits} exits; accuracy {acc}"


def build_ray(args) -> str:
    """``--ray``: the trace built by Ray workers, written as the single-process build writes it."""
    from engine.run.ray_build import build_on_ray

    address = None if args.ray == "local" else args.ray
    done = build_on_ray(
        args.model,
        args.split,
        args.dataset,
        args.force,
        address,
        args.workers,
        args.threads,
        args.shards,
    )
    out = args.out or Path(f"{args.model}__{args.split}.parquet")
    where = f"; shards in {done.shard_dir}" if args.shards else ""
    workers = len(set(done.pids))
    return f"{write_trace(done.trace, out)} (Ray: {done.blocks} blocks, {workers} worker(s){where})"


def build(
    model_id: str,
    out: Path | None,
    split: str,
    dataset: str | None,
    force: bool,
    progress: Progress | None = None,
) -> str:
    """Build and write; returns the line to print. Raises FamilyError/RegistryError/... with
    a one-line reason. ``progress`` hears of the model runs (the command line's tqdm bars)."""
    card = get_card(model_id)
    fam = families.get(card.family)
    if fam.traces:
        trace = fam.checked_trace(card, split, dataset, force, progress=progress)
        return write_trace(trace, out or Path(f"{model_id}__{split}.parquet"))
    if dataset not in (None, card.dataset) and not force:
        raise FamilyError(
            f"{model_id} was trained on {card.dataset}, not {dataset} (add --force to try)"
        )
    if dataset not in (None, card.dataset):
        raise FamilyError(f"{model_id}: its results are recorded on {card.dataset} only")
    try:
        results = fam.results(card)
    except FileNotFoundError:
        fam.build_results(card, progress=progress)
        results = fam.results(card)
    if results is None:
        raise FamilyError(f"{model_id}: {fam.title} has no setting to sweep, so no results")
    out = out or Path(f"{model_id}__results__{split}.parquet")
    results.write_parquet(out)
    best = results.accuracy.max()
    return (
        f"{out}: results, {results.num_samples} samples x {results.num_settings} settings of "
        f"{results.setting}; best accuracy {best:.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    from engine.run.ray_build import RayBuildError

    try:
        if args.ray:
            print(build_ray(args))
        else:
            print(
                build(
                    args.model, args.out, args.split, args.dataset, args.force, terminal(args.quiet)
                )
            )
    except (
        FamilyError,
        RegistryError,
        DatasetUnavailable,
        FileNotFoundError,
        ValueError,
        RayBuildError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
