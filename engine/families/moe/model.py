"""A small Vision Transformer whose MLP blocks are mixture-of-experts layers.

One network, two kinds of router (chosen by ``Config.router``):

* ``"softmax"`` — the sparsely-gated MoE of Shazeer et al. (2017) and the Switch Transformer
  (Fedus et al. 2021): a linear router gives a softmax over experts, each token runs its top-k
  experts (k=1 is Switch, k=2 is Shazeer/GShard), scaled by their router probabilities. Each
  expert has a *capacity* of ``ceil(capacity_factor * tokens * k / experts)`` tokens per group
  (one group = one image's patches, so a sample's routing never depends on its batch-mates);
  tokens beyond it are *dropped* by that expert and pass through the residual only. Within an
  expert, tokens with the higher router probability are kept first (V-MoE's batch prioritized
  routing). Training adds the Switch load-balancing loss ``E * sum_e f_e * P_e``.
* ``"norm"`` — dynamic-k routing as in D2DMoE (Szatkowski et al. 2024): the experts are slices of
  one dense ReLU MLP (their outputs *sum* to the dense MLP's output), a small 2-layer router
  regresses the L2 norm of each expert's output, and a token runs every expert whose predicted
  norm is at least ``tau`` times the largest. ``tau = 0`` runs all experts (exactly the dense
  model), ``tau = 1`` runs one, and in between the number of experts varies per token.

Shapes (defaults: 28x28 images, 7x7 patches, 16 tokens, dim 64, 4 layers, 8 experts of 32)::

    x       [B, 1, 28, 28]   engine.data.images.to_model_input
    patches [B, 16, 49]      non-overlapping 7x7 patches, row-major over the 4x4 grid
    h       [B, 16, 64]      linear patch embedding + learned position embedding
    block:  h = h + Attn(LN(h));  h = h + MoE(LN(h))        (pre-norm, x depth)
    logits  [B, 10]          LN, mean over tokens, linear

Execution is truly sparse: tokens are grouped per expert and only the selected experts run on
their token group (``MoELayer.forward``); ``MoELayer.forward_dense_masked`` computes every
expert for every token and masks, and exists only to check the sparse path and to train.
``forward(..., meter=FlopMeter(B))`` counts the FLOPs of every module call with torch's
FlopCounterMode and attributes expert FLOPs to the tokens (hence samples) that ran them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from engine.core.costs import count_flops

INPUT_SIZE = 28
ROUTERS = ("softmax", "norm")


@dataclass
class Config:
    num_classes: int = 10
    patch: int = 7  # 28 / 7 = 4 -> a 4x4 grid of 16 tokens
    dim: int = 64
    depth: int = 4
    heads: int = 4
    num_experts: int = 8
    expert_hidden: int = 32  # 8 x 32 = 256 = 4 x dim, the usual dense MLP width
    router: str = "softmax"  # "softmax" (top-k) or "norm" (D2DMoE dynamic-k)
    top_k: int = 2  # default k of the softmax router
    capacity_factor: float | None = 2.0  # default capacity of the softmax router; None = no limit
    tau: float = 0.5  # default tau of the norm router
    router_hidden: int = 32  # width of D2DMoE's 2-layer router

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def grid(self) -> int:
        return INPUT_SIZE // self.patch

    @property
    def tokens(self) -> int:
        return self.grid**2


@dataclass(frozen=True)
class Routing:
    """How to route at inference: ``k`` and ``capacity_factor`` (softmax) or ``tau`` (norm)."""

    k: int | None = None
    capacity_factor: float | None = None
    tau: float | None = None

    def label(self) -> str:
        if self.tau is not None:
            return f"tau={self.tau:g}"
        cf = "none" if self.capacity_factor is None else f"{self.capacity_factor:g}"
        return f"top-{self.k}, capacity {cf}"


def default_routing(config: Config) -> Routing:
    if config.router == "norm":
        return Routing(tau=config.tau)
    return Routing(k=config.top_k, capacity_factor=config.capacity_factor)


@dataclass
class LayerRouting:
    """What one MoE layer decided for a batch (B samples x T tokens x E experts)."""

    scores: torch.Tensor  # [B, T, E] router probability (softmax) or predicted norm / max (norm)
    chosen: torch.Tensor  # [B, T, E] bool: the expert ran on the token
    dropped: torch.Tensor  # [B, T] int: router choices dropped by expert capacity
    pred_norm: torch.Tensor | None = None  # [B, T, E] predicted expert output norms (norm router)


@dataclass
class Output:
    logits: torch.Tensor  # [B, C]
    layers: list[LayerRouting] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None  # Switch load-balancing loss (softmax router, training)


class FlopMeter:
    """Per-sample FLOPs, counted by FlopCounterMode on each module call as executed.

    Shared computation (embedding, attention, routers, head) costs the same for every sample of
    a batch and is split evenly; an expert call's FLOPs are split over the tokens it ran on.
    """

    def __init__(self, batch: int):
        self.flops = torch.zeros(batch, dtype=torch.float64)

    def shared(self, fn, *args):
        total, out = count_flops(fn, *args)
        self.flops += total / len(self.flops)
        return out

    def rows(self, fn, x: torch.Tensor, sample_of_row: torch.Tensor):
        total, out = count_flops(fn, x)
        share = torch.full((len(sample_of_row),), total / max(1, len(sample_of_row)))
        self.flops.index_add_(0, sample_of_row, share.double())
        return out


def _call(meter: FlopMeter | None, fn, *args):
    return fn(*args) if meter is None else meter.shared(fn, *args)


class Experts(nn.Module):
    """E two-layer ReLU MLPs stored stacked, so that together they are one dense MLP.

    Expert e computes ``relu(x @ w1[e] + b1[e]) @ w2[e]``; the output bias ``b2`` is shared and
    always added. Concatenating the experts' hidden units gives a dense MLP of width E * h whose
    output is exactly the sum of all experts' outputs (how D2DMoE splits a dense MLP).
    """

    def __init__(self, dim: int, num_experts: int, hidden: int):
        super().__init__()
        s1, s2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden * num_experts)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden).uniform_(-s1, s1))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-s2, s2))
        self.b2 = nn.Parameter(torch.zeros(dim))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its token group: [n, D] -> [n, D]."""
        return torch.relu(x @ self.w1[e] + self.b1[e]) @ self.w2[e]

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: [n, D] -> [n, E, D] (dense; for masks and targets)."""
        h = torch.relu(torch.einsum("nd,edh->neh", x, self.w1) + self.b1)
        return torch.einsum("neh,ehd->ned", h, self.w2)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The dense MLP's hidden activations, experts side by side: [n, D] -> [n, E * h]."""
        e, d, h = self.w1.shape
        return torch.relu(x @ self.w1.permute(1, 0, 2).reshape(d, e * h) + self.b1.reshape(-1))

    @torch.no_grad()
    def regroup(self, perm: torch.Tensor) -> None:
        """Reassign hidden units to experts: unit ``perm[j]`` becomes unit j (expert j // h).

        The dense MLP (sum of all experts) is unchanged; only the split into experts moves.
        """
        e, d, h = self.w1.shape
        w1 = self.w1.permute(1, 0, 2).reshape(d, e * h)[:, perm]
        self.w1.copy_(w1.reshape(d, e, h).permute(1, 0, 2))
        self.b1.copy_(self.b1.reshape(-1)[perm].reshape(e, h))
        self.w2.copy_(self.w2.reshape(e * h, d)[perm].reshape(e, h, d))

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The equivalent dense MLP (all experts, summed): [n, D] -> [n, D]."""
        e, d, h = self.w1.shape
        w1 = self.w1.permute(1, 0, 2).reshape(d, e * h)
        w2 = self.w2.reshape(e * h, d)
        return torch.relu(x @ w1 + self.b1.reshape(-1)) @ w2 + self.b2


class NormRouter(nn.Module):
    """D2DMoE's router: a 2-layer MLP regressing each expert's output L2 norm, [n, D] -> [n, E]."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def top_k_with_capacity(
    probs: torch.Tensor, k: int, capacity_factor: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k choice per token, then per-expert capacity within each sample.

    probs [B, T, E] -> (chosen [B, T, E] bool, dropped [B, T] int). An expert keeps at most
    ``ceil(capacity_factor * T * k / E)`` of a sample's tokens, those with the highest router
    probability first.
    """
    b, t, e = probs.shape
    idx = probs.topk(k, dim=-1).indices  # [B, T, k]
    wanted = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
    if capacity_factor is None:
        return wanted, torch.zeros(b, t, dtype=torch.long)
    capacity = math.ceil(capacity_factor * t * k / e)
    score = torch.where(wanted, probs, torch.full_like(probs, -1.0))
    order = score.argsort(dim=1, descending=True, stable=True)  # tokens by priority, per expert
    rank = order.argsort(dim=1)  # [B, T, E] rank of each token within each expert's queue
    chosen = wanted & (rank < capacity)
    return chosen, (wanted & ~chosen).sum(-1)


def dynamic_k(pred_norm: torch.Tensor, tau: float) -> torch.Tensor:
    """D2DMoE's rule: run experts whose predicted norm >= tau * the token's largest.

    pred_norm [..., E] (clamped at 0) -> chosen [..., E] bool. tau=0 selects every expert,
    tau>=1 only the largest; the largest always runs.
    """
    if tau <= 0:
        return torch.ones_like(pred_norm, dtype=torch.bool)
    top = pred_norm.argmax(-1, keepdim=True)
    best = torch.zeros_like(pred_norm, dtype=torch.bool).scatter_(-1, top, True)
    if tau >= 1:
        return best
    peak = pred_norm.gather(-1, top)
    return best | ((pred_norm >= tau * peak) & (pred_norm > 0))


class MoELayer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        d, e = config.dim, config.num_experts
        self.experts = Experts(d, e, config.expert_hidden)
        if config.router == "softmax":
            self.router = nn.Linear(d, e, bias=False)
        elif config.router == "norm":
            self.router = NormRouter(d, config.router_hidden, e)
        else:
            raise ValueError(f"router must be one of {ROUTERS}, got {config.router!r}")

    def route(
        self, x: torch.Tensor, routing: Routing, meter: FlopMeter | None = None
    ) -> tuple[torch.Tensor, LayerRouting]:
        """x [B, T, D] -> (combine weights [B, T, E], zero where an expert does not run)."""
        if self.config.router == "softmax":
            probs = torch.softmax(_call(meter, self.router, x), dim=-1)
            k = routing.k or self.config.top_k
            chosen, dropped = top_k_with_capacity(probs, k, routing.capacity_factor)
            return probs * chosen, LayerRouting(probs.detach(), chosen, dropped)
        pred = _call(meter, self.router, x).clamp_min(0)
        tau = self.config.tau if routing.tau is None else routing.tau
        chosen = dynamic_k(pred, tau)
        scores = pred / pred.amax(-1, keepdim=True).clamp_min(1e-12)
        dropped = torch.zeros(x.shape[:2], dtype=torch.long)
        return chosen.to(x.dtype), LayerRouting(scores.detach(), chosen, dropped, pred.detach())

    def forward(
        self, x: torch.Tensor, routing: Routing, meter: FlopMeter | None = None
    ) -> tuple[torch.Tensor, LayerRouting]:
        """Sparse execution: gather each expert's tokens, run it on them only, scatter back."""
        b, t, d = x.shape
        combine, info = self.route(x, routing, meter)
        flat, w = x.reshape(b * t, d), combine.reshape(b * t, -1)
        out = self.experts.b2.expand(b * t, d).clone()
        for e in range(w.shape[1]):
            rows = w[:, e].nonzero().squeeze(1)  # the token group of expert e
            if len(rows) == 0:
                continue
            xe = flat.index_select(0, rows)
            if meter is None:
                ye = self.experts.expert(e, xe)
            else:
                ye = meter.rows(lambda z, e=e: self.experts.expert(e, z), xe, rows // t)
            out = out.index_add(0, rows, ye * w.index_select(0, rows)[:, e : e + 1])
        return out.reshape(b, t, d), info

    def forward_dense_masked(
        self, x: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, LayerRouting]:
        """Reference: compute all experts on all tokens, then mask (what sparse must equal)."""
        b, t, d = x.shape
        combine, info = self.route(x, routing)
        outs = self.experts.all_outputs(x.reshape(b * t, d)).reshape(b, t, -1, d)
        return (combine.unsqueeze(-1) * outs).sum(2) + self.experts.b2, info


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))  # [B, T, D]


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config.dim, config.heads)
        self.ln2 = nn.LayerNorm(config.dim)
        self.moe = MoELayer(config)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 1, H, W] -> [B, (H/p)*(W/p), p*p], patches in row-major order of the grid."""
    b, c, h, w = x.shape
    g = h // patch
    x = x.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, g * g, c * patch * patch)


class MoEViT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.patch**2, config.dim)
        self.pos = nn.Parameter(torch.randn(1, config.tokens, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.ln_f = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [blk.moe for blk in self.blocks]

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing | None = None,
        meter: FlopMeter | None = None,
        dense_masked: bool = False,
    ) -> Output:
        routing = routing or default_routing(self.config)
        h = _call(meter, self.embed, patchify(x, self.config.patch)) + self.pos
        layers = []
        for blk in self.blocks:
            h = h + _call(meter, blk.attn, blk.ln1(h))
            if dense_masked:
                y, info = blk.moe.forward_dense_masked(blk.ln2(h), routing)
            else:
                y, info = blk.moe(blk.ln2(h), routing, meter)
            h = h + y
            layers.append(info)
        logits = _call(meter, self.head, self.ln_f(h).mean(1))
        return Output(logits, layers)

    def forward_dense(self, x: torch.Tensor, meter: FlopMeter | None = None) -> torch.Tensor:
        """The dense-equivalent model: every MLP as one matmul pair, no router. -> logits."""
        h = _call(meter, self.embed, patchify(x, self.config.patch)) + self.pos
        for blk in self.blocks:
            h = h + _call(meter, blk.attn, blk.ln1(h))
            h = h + _call(meter, blk.moe.experts.dense, blk.ln2(h))
        return _call(meter, self.head, self.ln_f(h).mean(1))

    def forward_train(self, x: torch.Tensor, k: int | None = None) -> Output:
        """Training pass (autograd): compute-then-mask MoE + Switch aux loss (softmax router),
        or the dense MLP (norm router: D2DMoE starts from a dense model)."""
        cfg = self.config
        h = self.embed(patchify(x, cfg.patch)) + self.pos
        aux = torch.zeros(())
        for blk in self.blocks:
            h = h + blk.attn(blk.ln1(h))
            z = blk.ln2(h)
            if cfg.router == "norm":
                h = h + blk.moe.experts.dense(z)
                continue
            routing = Routing(k=k or cfg.top_k, capacity_factor=cfg.capacity_factor)
            y, info = blk.moe.forward_dense_masked(z, routing)
            h = h + y
            probs = torch.softmax(blk.moe.router(z), -1).reshape(-1, cfg.num_experts)
            frac = info.chosen.reshape(-1, cfg.num_experts).float().mean(0) / routing.k
            aux = aux + cfg.num_experts * (frac * probs.mean(0)).sum()  # Switch eq. (4)
        return Output(self.head(self.ln_f(h).mean(1)), [], aux / cfg.depth)

    def expert_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The MoE layers' inputs [B, T, D] in the dense model (D2DMoE router targets)."""
        cfg = self.config
        h = self.embed(patchify(x, cfg.patch)) + self.pos
        inputs = []
        for blk in self.blocks:
            h = h + blk.attn(blk.ln1(h))
            z = blk.ln2(h)
            inputs.append(z)
            h = h + blk.moe.experts.dense(z)
        return inputs


def build(config: dict) -> MoEViT:
    return MoEViT(Config.from_dict(config))
