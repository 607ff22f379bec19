"""Train a mixture-of-experts ViT: ``python -m engine.train moe --variant topk|dynamic``.

* ``--variant topk`` (model id ``<dataset>_moe_vit``): softmax router, trained with top-k
  routing where k alternates between 1 and 2 from step to step, so that k=1 (Switch) and k=2
  (Shazeer) are two routing modes of the *same* weights; Switch load-balancing loss
  (``--aux-weight``), capacity factor ``--capacity-factor`` per image during training.
* ``--variant dynamic`` (model id ``<dataset>_d2dmoe_vit``), as D2DMoE: (1) train the dense
  model (every MLP = the sum of its 8 experts), optionally with an L1 penalty on the MLP
  activations to sparsify them (``--act-l1``); (2) freeze it and train one small router per
  layer to regress each expert's output L2 norm on the dense model's tokens (MSE,
  ``--router-epochs``). At inference tau picks the experts (engine.families.moe.model.dynamic_k).

After training, the test accuracy and counted FLOPs of every routing setting of the sweep grid
are measured (engine.families.moe.analysis.sweep) and written to the card; ``--sweep-out`` also writes the
sweep (with per-layer loads, per-class usage, experts-per-token histograms) for the app.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.progress import Meter, Progress, terminal, track
from engine.core.stats import seeded_subset
from engine.core.training import command_line, cosine_lr, save_model, seed_everything
from engine.data import images
from engine.families.moe import analysis as moe_analysis
from engine.families.moe.model import Config, MoEViT, default_routing, patchify
from engine.paths import MODELS_DIR

FAMILY = "moe"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.train moe", description=__doc__)
    p.add_argument("--variant", choices=("topk", "dynamic"), default="topk")
    p.add_argument("--dataset", default="fashion_mnist", choices=images.DATASETS)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--router-epochs", type=int, default=2, help="dynamic: router regression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--aux-weight", type=float, default=0.01, help="topk: load-balancing loss")
    p.add_argument("--capacity-factor", type=float, default=2.0, help="topk; 0 = no limit")
    p.add_argument(
        "--no-cluster",
        dest="cluster",
        action="store_false",
        help="dynamic: keep contiguous slices as experts (default: cluster units)",
    )
    p.add_argument("--act-l1", type=float, default=0.0, help="dynamic: activation L1 penalty")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-train", type=int, default=None, help="use only N training images")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--sweep-samples", type=int, default=moe_analysis.SWEEP_SAMPLES)
    p.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--sweep-out", type=Path, default=None, help="write the routing sweep JSON")
    p.add_argument("--model-id", default=None)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def subset(data: images.ImageSet, limit: int | None, seed: int) -> images.ImageSet:
    if limit is None or limit >= len(data):
        return data
    idx = seeded_subset(len(data), limit, seed)
    return images.ImageSet(
        data.name, data.split, data.images[idx], data.labels[idx], data.class_names
    )


def cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return cosine_lr(opt, total, warmup=max(1, min(100, total // 10)))


def train_loop(params, loss_fn, n: int, args, epochs: int, label: str, progress=None) -> None:
    """AdamW + warm-up/cosine over ``epochs`` of ``n`` samples; ``loss_fn(idx, step)``; one
    bar of steps per epoch, with the epoch's loss so far."""
    progress = progress or terminal(args.quiet)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps = math.ceil(n / args.batch_size)
    sched = cosine(opt, epochs * steps)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        bar = f"{label} epoch {epoch + 1}/{epochs}"
        meter = Meter(progress, bar)
        for i in track(range(steps), bar, progress):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = loss_fn(idx, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            meter.add(len(idx), loss=loss.item())


def train_topk(model: MoEViT, x, y, args, progress=None) -> None:
    def loss_fn(idx, step):
        out = model.forward_train(x[idx], k=1 + step % 2)  # k alternates: both modes work
        return F.cross_entropy(out.logits, y[idx]) + args.aux_weight * out.aux_loss

    model.train()
    train_loop(list(model.parameters()), loss_fn, len(y), args, args.epochs, "topk", progress)


def train_dynamic(model: MoEViT, x, y, args, progress=None) -> None:
    cfg = model.config
    model.train()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    dense = [p for n, p in model.named_parameters() if ".router." not in n]

    def dense_loss(idx, step):
        out = model.forward_train(x[idx])
        loss = F.cross_entropy(out.logits, y[idx])
        if args.act_l1 > 0:  # D2DMoE's sparsification phase: sparse ReLU activations
            loss = loss + args.act_l1 * hidden_l1(model, x[idx])
        return loss

    train_loop(dense, dense_loss, len(y), args, args.epochs, "dense", progress)
    for p in dense:
        p.requires_grad_(False)
    model.eval()  # no dropout/batch-norm here, but the dense model is now fixed
    if args.cluster:
        gen = torch.Generator().manual_seed(args.seed)
        sample = x[torch.randperm(len(y), generator=gen)[:512]]
        for layer, z in zip(model.moe_layers, model.expert_inputs(sample), strict=True):
            acts = layer.experts.hidden(z.reshape(-1, cfg.dim))  # [tokens, E*h]
            perm = balanced_clusters(acts.T, cfg.num_experts, args.seed)
            layer.experts.regroup(perm)

    def router_loss(idx, step):
        with torch.no_grad():
            inputs = model.expert_inputs(x[idx])
        loss = torch.zeros(())
        for layer, z in zip(model.moe_layers, inputs, strict=True):
            z = z.reshape(-1, cfg.dim)
            with torch.no_grad():
                target = layer.experts.all_outputs(z).norm(dim=-1)  # [n, E]
            loss = loss + F.mse_loss(layer.router(z), target)
        return loss / cfg.depth

    train_loop(routers, router_loss, len(y), args, args.router_epochs, "router", progress)


@torch.no_grad()
def balanced_clusters(feats: torch.Tensor, k: int, seed: int, iters: int = 15) -> torch.Tensor:
    """Balanced k-means of hidden units by their activation patterns (MoEfication / D2DMoE).

    feats [units, tokens] -> a permutation of the units, cluster by cluster, each cluster of
    equal size; units that fire on the same tokens land in the same expert, so an expert's
    output norm varies more from token to token and dynamic-k can skip more.
    """
    n = len(feats)
    size = n // k
    f = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-8)
    gen = torch.Generator().manual_seed(seed)
    centres = f[torch.randperm(n, generator=gen)[:k]]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = f @ centres.T  # [units, k]
        order = sim.flatten().argsort(descending=True)  # greedy: best (unit, cluster) pairs first
        assign.fill_(-1)
        room = torch.full((k,), size)
        for flat in order.tolist():
            u, c = divmod(flat, k)
            if assign[u] < 0 and room[c] > 0:
                assign[u] = c
                room[c] -= 1
        centres = torch.stack([f[assign == c].mean(0) for c in range(k)])
        centres = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return torch.cat([(assign == c).nonzero().squeeze(1) for c in range(k)])


def hidden_l1(model: MoEViT, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute MLP hidden activation over layers (a second pass; sparsity penalty)."""
    cfg = model.config
    h = model.embed(patchify(x, cfg.patch)) + model.pos
    total = torch.zeros(())
    for blk in model.blocks:
        h = h + blk.attn(blk.ln1(h))
        z = blk.ln2(h)
        ex = blk.moe.experts
        act = torch.relu(torch.einsum("btd,edh->bteh", z, ex.w1) + ex.b1)
        total = total + act.mean()
        h = h + torch.einsum("bteh,ehd->btd", act, ex.w2) + ex.b2
    return total / cfg.depth


@torch.no_grad()
def router_r2(model: MoEViT, imgs: np.ndarray) -> list[float]:
    """Per layer, R^2 of the norm router's predictions against the true expert norms."""
    x = images.to_model_input(imgs)
    out = []
    for layer, z in zip(model.moe_layers, model.expert_inputs(x), strict=True):
        z = z.reshape(-1, model.config.dim)
        target = layer.experts.all_outputs(z).norm(dim=-1)
        pred = layer.router(z)
        out.append(round(1 - float(((pred - target) ** 2).mean() / target.var()), 4))
    return out


def main(argv: list[str], progress: Progress | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train = subset(images.load(args.dataset, "train"), args.max_train, args.seed)
    test = subset(images.load(args.dataset, "test"), args.max_test, args.seed + 1)
    x = images.to_model_input(train.images)
    y = torch.as_tensor(train.labels)
    cf = args.capacity_factor if args.capacity_factor > 0 else None
    config = Config(
        num_classes=len(train.class_names),
        dim=args.dim,
        depth=args.depth,
        num_experts=args.experts,
        router="softmax" if args.variant == "topk" else "norm",
        top_k=2,
        capacity_factor=cf,
    )
    model = MoEViT(config)
    t0, cpu0 = time.perf_counter(), time.process_time()
    progress = progress or terminal(args.quiet)
    (train_topk if args.variant == "topk" else train_dynamic)(model, x, y, args, progress)
    train_seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0  # honest on a shared machine: wall time varies
    model.eval()

    idx = moe_analysis.sweep_subset(len(test), args.sweep_samples)
    points = moe_analysis.sweep(
        model,
        test.images[idx],
        test.labels[idx],
        progress=progress,
    )
    full = moe_analysis.stats(
        moe_analysis.run(model, test.images, default_routing(config)),
        test.labels,
        config.num_classes,
    )
    dense = moe_analysis.dense_flops(model)
    suffix = "moe_vit" if args.variant == "topk" else "d2dmoe_vit"
    prefix = {"fashion_mnist": "fashion"}.get(args.dataset, args.dataset)
    model_id = args.model_id or f"{prefix}_{suffix}"
    metrics = {
        "test_samples": len(test),
        "test_accuracy_default_routing": round(full["accuracy"], 5),
        "default_routing": full["setting"],
        "flops_per_sample_default_routing": round(full["flops_mean"]),
        "flops_per_sample_dense_equivalent": round(dense),
        "sweep_samples": len(idx),
        "sweep": [
            {
                "setting": p["setting"],
                "accuracy": round(p["accuracy"], 5),
                "flops_per_sample": round(p["flops_mean"]),
                "flops_ratio_to_dense": round(p["flops_mean"] / dense, 4),
                "experts_per_token": round(p["experts_per_token_mean"], 4),
                "dropped_fraction": p["dropped_fraction"],
            }
            for p in points
        ],
    }
    if args.variant == "dynamic":
        metrics["router_r2_per_layer"] = router_r2(model, test.images[idx[:500]])
    title = (
        f"MoE ViT, top-k softmax router ({test.name})"
        if args.variant == "topk"
        else f"D2DMoE ViT, dynamic-k norm router ({test.name})"
    )
    card = {
        "model_id": model_id,
        "title": title,
        "family": FAMILY,
        "module": "engine.families.moe.model",
        "config": config.to_dict(),
        "variant": args.variant,
        "dataset": args.dataset,
        "split": "test",
        "class_names": list(train.class_names),
        "seed": args.seed,
        "epochs": args.epochs,
        "router_epochs": args.router_epochs if args.variant == "dynamic" else None,
        "train_samples": len(train),
        "threads": args.threads,
        "training_command": command_line(FAMILY, argv),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "metrics": metrics,
    }
    path = save_model(model, card, args.out_dir)
    if args.sweep_out is not None:
        meta = {
            "dataset": args.dataset,
            "split": "test",
            "subset_seed": 0,
            "dense_flops": dense,
            "class_names": list(train.class_names),
        }
        moe_analysis.save_sweep(args.sweep_out, model_id, points, meta)
    if not args.quiet:
        print(f"wrote {path} ({train_seconds:.0f}s training, {cpu_seconds:.0f}s CPU)")
        for p in metrics["sweep"]:
            print(
                f"  {p['setting']:>24}  acc {p['accuracy']:.4f}  "
                f"FLOPs {p['flops_per_sample']:,} ({p['flops_ratio_to_dense']:.2f} of dense)  "
                f"experts/token {p['experts_per_token']:.2f}"
            )
