"""JEI-DNN (Regol, Chataoui & Coates, ICLR 2024): gates and heads trained jointly, backbone frozen.

``python -m engine.train multi_exit_cnn --mode jei --backbone fashion_multi_exit_cnn ...``

The backbone (the stages of a bundled multi-exit CNN) is frozen; new inference heads (same
architecture as the backbone's own) and one gate per exit but the last (``JointGates``: a
logistic unit on the features of its head's output) are trained together. The gates define a
distribution over exits,

    q_k = g_k * prod_{j<k} (1 - g_j)        (g_K = 1, so the q_k sum to 1),

and the objective is the expected loss under it plus a cost term,

    L = E_q[CE_k] + lambda * E_q[c_k / c_K].

The training is bi-level, as in the paper (here both levels take a step on every batch): the
gates minimise ``L`` with the heads' losses held fixed (detached), so they learn where stopping pays;
the heads minimise their cross-entropy weighted by where the gates send each sample (``q``,
detached), so each head specialises on the samples that actually leave through it, the
train–test mismatch JEI-DNN removes. Weighting by ``q`` alone starves a head of the samples the
gates route past it early in training, so the heads first warm up on every sample (plain
multi-exit loss, ``--warmup-epochs``) and afterwards keep a uniform share ``--mix`` of it:
head k's weight of a sample is ``mix / K + (1 - mix) * q_k``.

What was adopted from the paper and what was not: the exit distribution, the expected-loss
plus cost objective, the frozen backbone with new heads, and gates that read their head's
output are JEI-DNN's; the warm-up and the uniform share are this trainer's way of keeping every
head trained on every sample (the paper's text at hand did not say how it does this). lambda is
one number per model: the bundled Fashion model uses 1 (0.5 was tried first; its gates lost
to max-prob at every budget up to half the cost).

Because the backbone is frozen and a head is a fixed pooling and one linear layer, each head's
input is the pooled feature map of its stage; those are computed once (``pooled_features``)
and the training runs on them, exactly, in seconds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.core import calibration, tradeoff
from engine.core.gates import with_joint_gates
from engine.core.policies import Policy, exit_index
from engine.core.progress import Progress, terminal
from engine.core.training import (
    command_line,
    image_split,
    save_model,
    seed_everything,
    train_epochs,
)

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.8)  # fractions of the full model's mean cost
COMPARED = ("max_prob", "entropy", "patience", "gate")


@dataclass(frozen=True)
class JointConfig:
    """What the joint phase optimises and for how long."""

    cost_weight: float = 1.0  # lambda, in nats per full-model cost
    mix: float = 0.5  # uniform share of the heads' per-sample weights
    warmup_epochs: int = 2
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    gate_lr: float = 3e-2
    weight_decay: float = 1e-4
    seed: int = 0
    detach_gates: bool = False  # for tests: the gates get no gradient (must then not learn)


def exit_distribution(g: torch.Tensor) -> torch.Tensor:
    """[B, K] q_k = g_k prod_{j<k} (1 - g_j) from gate probabilities g [B, K] (g_K = 1)."""
    survive = torch.cumprod(1 - g, dim=1)
    reach = torch.cat([torch.ones_like(g[:, :1]), survive[:, :-1]], dim=1)
    return g * reach


def joint_losses(
    logits: list[torch.Tensor],
    y: torch.Tensor,
    gates: nn.Module,
    cost_fraction: torch.Tensor,
    cfg: JointConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads' loss, gates' loss) of one batch: the two levels of JEI-DNN's objective."""
    z = torch.stack(logits, dim=1)  # [B, K, C]
    ce = F.cross_entropy(z.flatten(0, 1), y.repeat_interleave(z.shape[1]), reduction="none")
    ce = ce.view(z.shape[:2])  # [B, K]
    q = exit_distribution(gates(torch.softmax(z.detach(), dim=-1)))
    if cfg.detach_gates:
        q = q.detach()
    k = z.shape[1]
    gate_loss = (q * (ce.detach() + cfg.cost_weight * cost_fraction)).sum(1).mean()
    w = cfg.mix / k + (1 - cfg.mix) * q.detach()
    head_loss = (w * ce).sum(1).mean()
    return head_loss, gate_loss


def _epochs(
    params_groups, loss_fn, n: int, cfg: JointConfig, epochs: int, seed: int, label, progress
):
    """AdamW with warm-up + cosine over ``epochs`` of minibatches of ``range(n)``; a bar of
    steps per epoch with the epoch's loss so far."""
    from engine.families.multi_exit_cnn.loop import cosine_schedule

    opt = torch.optim.AdamW(params_groups, weight_decay=cfg.weight_decay)
    train_epochs(
        opt, lambda b: (loss_fn(b), {}), n, cfg.batch_size, epochs, seed, progress,
        label=f"{label} ", schedule=cosine_schedule,
    )  # fmt: skip


def fit_joint(
    feats: list[torch.Tensor],
    y: torch.Tensor,
    heads: list[nn.Module],
    gates: nn.Module,
    cost_fraction: np.ndarray,
    cfg: JointConfig,
    progress: Progress | None = None,
) -> None:
    """Warm the heads up on every sample, then train heads and gates jointly (in place).

    ``feats[k]`` [N, D_k] is head k's input, ``heads[k]`` maps it to logits; ``gates`` maps
    probabilities [B, K, C] to gate probabilities [B, K] (``JointGates``).
    """
    torch.manual_seed(cfg.seed)
    c = torch.as_tensor(np.asarray(cost_fraction, dtype=np.float32))
    head_params = [p for h in heads for p in h.parameters()]
    k = len(heads)

    def logits_of(b):
        return [h(f[b]) for h, f in zip(heads, feats, strict=True)]

    def warmup(b):
        return sum(F.cross_entropy(z, y[b]) for z in logits_of(b)) / k

    heads_only = [{"params": head_params, "lr": cfg.lr}]
    _epochs(heads_only, warmup, len(y), cfg, cfg.warmup_epochs, 0, "warm-up", progress)

    def joint(b):
        head_loss, gate_loss = joint_losses(logits_of(b), y[b], gates, c, cfg)
        return head_loss + gate_loss

    groups = [
        {"params": head_params, "lr": cfg.lr},
        {"params": list(gates.parameters()), "lr": cfg.gate_lr},
    ]
    _epochs(groups, joint, len(y), cfg, cfg.epochs, cfg.seed + 1, "joint", progress)


@torch.no_grad()
def pooled_features(model: nn.Module, x: torch.Tensor, batch: int = 500) -> list[torch.Tensor]:
    """Each head's input through its own pooling: [N, C_k * pool^2] per exit (frozen stages)."""
    model.eval()
    out: list[list[torch.Tensor]] = [[] for _ in model.heads]
    for i in range(0, len(x), batch):
        h = x[i : i + batch]
        for k, (stage, head) in enumerate(zip(model.stages, model.heads, strict=True)):
            h = stage(h)
            out[k].append(head.flatten(head.pool(h)))
    return [torch.cat(o) for o in out]


def bias_at_gate(trace, threshold: float = 0.5) -> dict:
    """Signed confidence gap (calibration.exit_gaps) of the gate at ``threshold`` and of
    max-prob at matched cost: does the joint gate change the bias thresholding gives?"""
    g_exits = exit_index(trace, Policy("gate", threshold=threshold))
    g_stats = tradeoff.evaluate(trace, g_exits)
    c = tradeoff.curve(trace, "max_prob")
    mp = c.policy(tradeoff.nearest_cost(c, g_stats.mean_cost))
    m_exits = exit_index(trace, mp)
    out = {}
    for name, pol, ex in (
        ("gate", Policy("gate", threshold=threshold), g_exits),
        ("max_prob", mp, m_exits),
    ):
        s = tradeoff.evaluate(trace, ex)
        gaps = calibration.exit_gaps(trace, ex)
        out[name] = {
            "policy": pol.to_dict(),
            "accuracy": round(s.accuracy, 4),
            "cost_fraction": round(s.cost_fraction, 4),
            "overall_gap": round(gaps.overall_gap, 4),
        }
    return out


def train_jei(argv: list[str], args: argparse.Namespace, progress: Progress | None = None):
    """The ``--mode jei`` run: load the backbone, train heads and gates, write card + weights."""
    from engine.families import load_model
    from engine.families.multi_exit_cnn.loop import exit_accuracy, exit_metrics, split_description
    from engine.families.multi_exit_cnn.model import build, exit_names
    from engine.registry import get_card
    from engine.run.trace_build import trace_of_inputs

    if not args.backbone:
        raise SystemExit("--mode jei needs --backbone MODEL (a bundled multi_exit_cnn)")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    bcard = get_card(args.backbone)
    if bcard.family != "multi_exit_cnn":
        raise SystemExit(f"--backbone {args.backbone} is a {bcard.family}, not a multi_exit_cnn")
    if bcard.dataset != args.dataset:
        raise SystemExit(f"--backbone {args.backbone} was trained on {bcard.dataset}")
    backbone = load_model(args.backbone)
    config = {**bcard.config, "gates": True}
    model = build(config)
    model.stages.load_state_dict(backbone.stages.state_dict())  # frozen; heads and gates new
    for p in model.stages.parameters():
        p.requires_grad_(False)
    model.eval()  # batch-norm statistics stay the backbone's

    x, y, class_names, _ = image_split(args.dataset, "train", args.max_train, args.seed)
    xt, yt, _, _ = image_split(args.dataset, "test", args.max_test, args.seed)
    cfg = JointConfig(
        cost_weight=args.cost_weight,
        mix=args.mix,
        warmup_epochs=args.warmup_epochs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        gate_lr=args.gate_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    feats = pooled_features(model, x)
    cum = np.asarray(bcard.raw["metrics"]["flops_cumulative"], dtype=np.float64)
    heads = [h.fc for h in model.heads]
    fit_joint(feats, y, heads, model.gates, cum / cum[-1], cfg, progress or terminal(args.quiet))
    train_seconds = time.perf_counter() - t0
    model.eval()

    names = exit_names(config)
    acc = exit_accuracy(model, xt, yt)
    metrics = exit_metrics(model, acc, len(yt), names)
    trace = trace_of_inputs(
        model, xt, yt.numpy(), class_names, args.dataset, "test", "jei", 256, names
    )
    trace = with_joint_gates(trace, model.gates.scores(trace.probs))
    model_id = args.model_id or f"{args.backbone}_jei"
    card = {
        "model_id": model_id,
        "title": args.title
        or f"Multi-exit residual CNN ({args.dataset}, {len(names)} exits, JEI-DNN joint gates)",
        "family": "multi_exit_cnn",
        "module": "engine.families.multi_exit_cnn.model",
        "config": config,
        "dataset": args.dataset,
        "split": split_description(args, len(y), len(yt)),
        "class_names": list(class_names),
        "exit_names": names,
        "seed": args.seed,
        "epochs": args.epochs,
        "training": {
            "mode": "jei",
            "backbone": args.backbone,
            "backbone_weights_sha256": bcard.raw.get("weights_sha256"),
            "frozen": "the backbone's stages (and batch-norm statistics); heads and gates new",
            "warmup_epochs": cfg.warmup_epochs,
            "joint_epochs": cfg.epochs,
            "cost_weight": cfg.cost_weight,
            "mix": cfg.mix,
            "objective": "E_q[CE_k] + cost_weight * E_q[c_k / c_K], q_k = g_k prod_{j<k}(1-g_j)",
            "optimizer": f"AdamW lr={cfg.lr} (gates {cfg.gate_lr}) wd={cfg.weight_decay}, "
            "warm-up + cosine",
            "batch_size": cfg.batch_size,
            "threads": args.threads,
            "preprocessing": "engine.data.images.to_model_input, no augmentation",
        },
        "training_command": command_line("multi_exit_cnn", argv),
        "train_seconds": round(train_seconds, 1),
        "metrics": metrics,
        "jei": {
            "gate_flops": "not counted: one 14-input logistic unit per exit, ~30 FLOPs",
            "accuracy_within_budget": tradeoff.accuracy_within_budgets(trace, COMPARED, BUDGETS),
            "bias_at_gate_0.5": bias_at_gate(trace),
            "oracle": {
                "accuracy": round(tradeoff.oracle_stats(trace).accuracy, 4),
                "cost_fraction": round(tradeoff.oracle_stats(trace).cost_fraction, 4),
            },
        },
    }
    if not args.quiet:
        print("per-exit test accuracy:", " ".join(f"{a:.4f}" for a in acc))
        print("within budgets:", card["jei"]["accuracy_within_budget"])
        print("bias:", card["jei"]["bias_at_gate_0.5"])
        print(f"trained in {train_seconds:.1f}s")
    return save_model(model, card, args.out_dir)
