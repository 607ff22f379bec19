"""Train the gated skip network: ``python -m engine.train skipnet --dataset mnist``.

Two phases:

1. **Warm-up** (``--warmup-epochs``): every block runs; the loss is the mean cross-entropy of all
   exit heads (deep supervision), so every block and head is useful before gates start to cut.
   SkipNet also pre-trains the backbone before training its gates.
2. **Gated** (``--epochs``): gates are Gumbel-sigmoid samples at temperature ``--gumbel-tau``,
   made hard with a straight-through estimator (ConvNet-AIG's relaxation, chosen over SkipNet's
   REINFORCE because it trains in minutes on a CPU). Loss:

       CE(final head) + exit_weight * mean_k CE(head_k) + lambda * E[executed block FLOPs] / total

   where the expectation uses the gates' sigmoid probabilities (``--compute-penalty`` = lambda).

Afterwards the test split is measured with *real* skipping (``run_skipnet``), and unless
``--no-traces`` the bundled files are written: the early-exit trace of the same backbone
(``<traces-dir>/<model_id>__test.parquet``) and the skip records and variant curves
(``<traces-dir>/records/``), see ``engine.families.skipnet.records``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from engine.core.costs import count_flops
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
from engine.families.skipnet import model as skipnet

FAMILY = "skipnet"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train skipnet", description=__doc__)
    p.add_argument("--dataset", default="mnist", choices=images.DATASETS)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3, help="gated epochs")
    p.add_argument("--compute-penalty", type=float, default=0.5, help="lambda")
    p.add_argument("--exit-weight", type=float, default=0.5, help="weight of the earlier exits")
    p.add_argument("--gumbel-tau", type=float, default=1.0)
    p.add_argument(
        "--gate-logit-l2",
        type=float,
        default=0.0,
        help="penalty on squared gate logits: keeps gate scores off 0/1 so the threshold matters",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-train", type=int, default=None, help="use only N training images")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--max-steps-train", type=int, default=None, help="stop each phase early")
    add_output_args(p, None, "default: <dataset>_skipnet")
    return p


def block_flops(model: skipnet.SkipNet) -> torch.Tensor:
    """[blocks] FLOPs per sample of each residual branch (counted by torch), as weights."""
    out, h = [], torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        for b in range(model.num_blocks):
            h = model.entries[b](h)
            out.append(count_flops(model.branches[b], h)[0])
    return torch.tensor(out, dtype=torch.float32)


def train_phase(
    model, x, y, args, epochs: int, gated: bool, weights: torch.Tensor, seed: int, progress=None
):
    share = weights / weights.sum()

    def batch_loss(b: torch.Tensor):
        logits, probs, applied = model(x[b], tau=args.gumbel_tau, all_on=not gated)
        ce = [F.cross_entropy(z, y[b]) for z in logits]
        if gated:
            compute = (probs * share).sum(1).mean()  # expected fraction of block FLOPs
            loss = ce[-1] + args.exit_weight * torch.stack(ce[:-1]).mean()
            loss = loss + args.compute_penalty * compute
            if args.gate_logit_l2 > 0:
                sq = torch.stack(model.last_gate_logits, 1).pow(2).mean()
                loss = loss + args.gate_logit_l2 * sq
        else:
            loss = torch.stack(ce).mean()
        return loss, {"executed": applied.detach().mean()}  # the share of blocks run

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    model.train()
    train_epochs(
        opt, batch_loss, len(y), args.batch_size, epochs, seed, progress or terminal(args.quiet),
        label=f"{'gated' if gated else 'warm-up'} ", max_steps=args.max_steps_train,
    )  # fmt: skip
    model.eval()


def main(argv: list[str] | None = None, progress: Progress | None = None) -> dict:
    argv = list(argv or [])
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    model_id = args.model_id or f"{args.dataset}_skipnet"
    x, y, class_names, _ = image_split(args.dataset, "train", args.max_train, args.seed)
    xt, yt, _, test_idx = image_split(args.dataset, "test", args.max_test, args.seed)

    config = skipnet.Config(num_classes=len(class_names))
    model = skipnet.SkipNet(config)
    weights = block_flops(model)
    t0 = time.perf_counter()
    train_phase(model, x, y, args, args.warmup_epochs, False, weights, args.seed, progress)
    train_phase(model, x, y, args, args.epochs, True, weights, args.seed + 1, progress)
    train_seconds = time.perf_counter() - t0

    from engine.families.skipnet import records as skipping

    rec = skipnet.run_skipnet(model, xt, threshold=0.5)
    yt_np = yt.numpy()
    exit_probs, exit_cost = skipnet.exit_outputs(model, xt)
    full = skipnet.full_flops(model)
    metrics = {
        "test_samples": len(yt_np),
        "default_threshold": 0.5,
        "accuracy_at_default": round(float((rec["pred"] == yt_np).mean()), 5),
        "mean_flops_at_default": float(rec["flops"].mean()),
        "skip_rate_per_block_at_default": [round(float(v), 4) for v in 1 - rec["executed"].mean(0)],
        "accuracy_all_blocks": round(float((exit_probs[:, -1].argmax(1) == yt_np).mean()), 5),
        "flops_all_blocks": full,
        "exit_accuracy_all_blocks": [
            round(float(v), 5) for v in (exit_probs.argmax(2) == yt_np[:, None]).mean(0)
        ],
        "exit_flops_cumulative": [float(v) for v in exit_cost[0]],
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    card = {
        "model_id": model_id,
        "title": f"Gated skip ResNet ({args.dataset})",
        "family": FAMILY,
        "module": "engine.families.skipnet.model",
        "config": config.to_dict(),
        "dataset": args.dataset,
        "split": "train",
        "class_names": list(class_names),
        "seed": args.seed,
        "epochs": args.warmup_epochs + args.epochs,
        "training": {
            "gate_training": "Gumbel-sigmoid straight-through (ConvNet-AIG relaxation)",
            "warmup_epochs": args.warmup_epochs,
            "gated_epochs": args.epochs,
            "compute_penalty": args.compute_penalty,
            "exit_weight": args.exit_weight,
            "gumbel_tau": args.gumbel_tau,
            "gate_logit_l2": args.gate_logit_l2,
            "threads": args.threads,
            "max_train": args.max_train,
            "max_steps_train": args.max_steps_train,
        },
        "training_command": command_line(FAMILY, argv),
        "train_seconds": round(train_seconds, 1),
        "metrics": metrics,
    }
    path = save_model(model, card, args.out_dir)
    if not args.no_traces:
        skipping.write_assets(
            model,
            model_id,
            args.dataset,
            xt,
            yt_np,
            test_idx,
            class_names,
            args.traces_dir,
            progress or terminal(args.quiet),
        )
    if not args.quiet:
        print_saved(path, f"{train_seconds:.0f}s training", metrics)
    return card
