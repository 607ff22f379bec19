"""SkipNet-style layer skipping: a small gate per residual block decides, per input, run or skip.

SkipNet (Wang et al. 2018) puts a gate in front of every residual block; the gate looks at the
block's input and says whether to execute the block. A skipped block is the identity, because a
residual block computes ``h + F(h)`` and skipping drops ``F``:

    h_0 = stem(x)                                   [B, C_0, 14, 14]  (x from to_model_input)
    for block b (in stage s):  g_b = gate_b(h)      [B] in (0, 1), the "execute" probability
                               h   = h + 1[g_b >= t] * F_b(h)
    stage transitions (a strided conv) always run   [B, C_1, 7, 7]
    z = head(h)                                     [B, num_classes]

**Training choice (documented as the issue asks).** SkipNet trains the gates with a hybrid of
supervised pre-training and REINFORCE. We use the *relaxed* alternative of ConvNet-AIG (Veit &
Belongie 2018): a Gumbel-sigmoid sample of the gate with a straight-through estimator (hard 0/1
decision forward, sigmoid gradient backward), plus a compute penalty lambda * (expected fraction
of block FLOPs executed). It trains in minutes on a CPU, where REINFORCE needs many more steps.
See ``engine/families/skipnet/train.py``.

**Exit heads.** A linear classifier after every block (global average pool + linear), trained
jointly, so that the same backbone can also do early exit (stop after block k). The skipping page
compares the two on the same weights: skipping keeps going to the end with holes in the middle;
early exit drops the whole tail.

**Inference really skips.** ``run_skipnet`` gathers, for each block, the subset of the batch
whose gate says "run", runs the block on that subset only and scatters the result back; FLOPs
are counted by torch (``engine.core.costs.count_flops``) on exactly what ran and split evenly over
the samples that ran it. The gate threshold ``t`` is the inference knob: a block runs when
``g_b >= t``, so ``t = 0`` runs everything and a higher ``t`` skips more.

**Training-free variants** (as studied for decoder LMs by Glavas et al. 2024): skip a fixed set of
blocks for every input (``skip_fixed``), or per input the ``k`` blocks whose gate score is the
lowest (``skip_lowest``), so static skipping, per-input skipping and early exit can be compared
on one backbone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from engine.core.costs import count_flops

INPUT_SIZE = 28


@dataclass
class Config:
    num_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32])  # channels of each stage
    blocks_per_stage: list[int] = field(default_factory=lambda: [3, 3])  # gated blocks per stage
    gate_hidden: int = 16  # width of the gate's hidden layer
    gate_bias_init: float = 2.0  # sigmoid(2) ~ 0.88: start with every block executing

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Gate(nn.Module):
    """SkipNet's feed-forward gate, small: global average pool -> MLP -> one logit.

    Costs a few hundred FLOPs, nothing next to the block it controls (thousands of times more).
    """

    def __init__(self, channels: int, hidden: int, bias_init: float):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.constant_(self.fc2.bias, bias_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = h.mean(dim=(2, 3))  # [B, C]
        return self.fc2(torch.relu(self.fc1(pooled)))[:, 0]  # [B] logit of "execute"


class Branch(nn.Module):
    """The residual function F of a basic block (no final ReLU, so skip == identity exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))


class ExitHead(nn.Module):
    """Global average pool + linear: an exit after a block (also the final classifier)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean(dim=(2, 3)))


class SkipNet(nn.Module):
    """Stem, gated residual blocks with a stride-2 transition between stages, one head per block.

    ``entries[b]`` is the non-skippable module run before block ``b`` (the stem before block 0, a
    transition conv before the first block of a later stage, else None).
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        entries, gates, branches, heads = [], [], [], []
        c_prev = 1
        for c, n in zip(config.widths, config.blocks_per_stage, strict=True):
            for j in range(n):
                # stem: 1 -> C_0 at stride 2 (28 -> 14); transition: C_{s-1} -> C_s (14 -> 7)
                entries.append(conv_bn_relu(c_prev, c, 2) if j == 0 else nn.Identity())
                gates.append(Gate(c, config.gate_hidden, config.gate_bias_init))
                branches.append(Branch(c))
                heads.append(ExitHead(c, config.num_classes))
            c_prev = c
        self.entries = nn.ModuleList(entries)
        self.gates = nn.ModuleList(gates)
        self.branches = nn.ModuleList(branches)
        self.heads = nn.ModuleList(heads)

    @property
    def num_blocks(self) -> int:
        return len(self.branches)

    def forward(
        self, x: torch.Tensor, tau: float = 1.0, hard: bool = True, all_on: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Training forward pass (every branch is computed and multiplied by its gate).

        Returns (logits of every exit [B, C] each, gate probabilities [B, blocks], gate values
        actually applied [B, blocks]). In train mode the gate is a Gumbel-sigmoid sample at
        temperature ``tau`` made hard (0/1) with a straight-through gradient; in eval mode it is
        the hard decision ``prob >= 0.5``. ``all_on`` runs every block (warm-up, early exit).
        """
        h = x
        logits, probs, applied = [], [], []
        self.last_gate_logits = []  # for the trainer's logit penalty
        for entry, gate, branch, head in zip(
            self.entries, self.gates, self.branches, self.heads, strict=True
        ):
            h = entry(h)
            logit = gate(h)
            p = torch.sigmoid(logit)
            self.last_gate_logits.append(logit)
            if all_on:
                g = torch.ones_like(p)
            elif self.training:
                u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
                soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / tau)
                g = soft if not hard else (soft >= 0.5).float() + soft - soft.detach()
            else:
                g = (p >= 0.5).float()
            h = h + g[:, None, None, None] * branch(h)
            probs.append(p)
            applied.append(g)
            logits.append(head(h))
        return logits, torch.stack(probs, 1), torch.stack(applied, 1)


def build(config: dict) -> SkipNet:
    return SkipNet(Config.from_dict(config))


def exit_names(model: SkipNet) -> list[str]:
    return [f"block {b + 1}" for b in range(model.num_blocks)]


# --- inference that really skips -------------------------------------------------------------


def _flops_each(fn, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(FLOPs per sample of fn on the batch x, fn(x)), counted by torch."""
    total, out = count_flops(fn, x)
    return total / max(1, x.shape[0]), out


@torch.no_grad()
def run_skipnet(
    model: SkipNet,
    x: torch.Tensor,
    threshold: float = 0.5,
    execute: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 1000,
) -> dict[str, np.ndarray]:
    """Run with per-input skipping; return a per-sample record (numpy arrays).

    A block runs for a sample when its gate score ``>= threshold``; or, when ``execute`` (bool
    [N, blocks]) is given, exactly where it says (the training-free variants). Skipped samples
    are not computed at all: each block sees only the gathered subset that runs it.

    Record: ``gate`` [N, blocks] float32 (execute probability, as seen on this path),
    ``executed`` [N, blocks] bool, ``flops`` [N] float64 (stem, transitions, gates of every block,
    branches that ran, final head), ``probs`` [N, C] float32 of the final head, ``pred`` [N].
    Gate FLOPs are not counted when ``execute`` is given (those variants do not consult gates).
    """
    model.eval()
    x = torch.as_tensor(x, dtype=torch.float32)
    fixed = None if execute is None else torch.as_tensor(np.asarray(execute), dtype=torch.bool)
    out: dict[str, list] = {"gate": [], "executed": [], "flops": [], "probs": []}
    for i in range(0, len(x), batch_size):
        h = x[i : i + batch_size]
        n = len(h)
        flops = torch.zeros(n, dtype=torch.float64)
        gates, ran = [], []
        for b in range(model.num_blocks):
            f, h = _flops_each(model.entries[b], h)
            flops += f
            if fixed is None:
                f, logit = _flops_each(model.gates[b], h)
                flops += f
                p = torch.sigmoid(logit)
                run = p >= threshold
            else:
                p = torch.sigmoid(model.gates[b](h))  # shown, not charged
                run = fixed[i : i + n, b]
            idx = torch.nonzero(run)[:, 0]
            if len(idx):
                f, delta = _flops_each(model.branches[b], h[idx])  # only the running subset
                h = h.index_add(0, idx, delta)
                flops[idx] += f
            gates.append(p)
            ran.append(run)
        f, logits = _flops_each(model.heads[-1], h)
        flops += f
        out["gate"].append(torch.stack(gates, 1))
        out["executed"].append(torch.stack(ran, 1))
        out["flops"].append(flops)
        out["probs"].append(torch.softmax(logits, 1))
    rec = {k: torch.cat(v).numpy() for k, v in out.items()}
    rec["gate"] = rec["gate"].astype(np.float32)
    rec["probs"] = rec["probs"].astype(np.float32)
    rec["pred"] = rec["probs"].argmax(1)
    return rec


def skip_fixed(model: SkipNet, x: torch.Tensor, skip: list[int] | tuple[int, ...]):
    """Training-free static skipping: the same blocks are skipped for every input."""
    mask = np.ones((len(x), model.num_blocks), dtype=bool)
    mask[:, list(skip)] = False
    return run_skipnet(model, x, execute=mask)


@torch.no_grad()
def skip_lowest(model: SkipNet, x: torch.Tensor, k: int, batch_size: int = 1000):
    """Per input, skip the ``k`` blocks whose gate score is lowest (a fixed budget per input).

    Scores are read from one all-blocks pass (every gate sees the unskipped features), then the
    network is run again skipping the chosen blocks; only the second pass is charged.
    """
    model.eval()
    scores = []
    for i in range(0, len(x), batch_size):
        _, probs, _ = model(x[i : i + batch_size], all_on=True)
        scores.append(probs)
    s = torch.cat(scores).numpy()
    order = np.argsort(s, axis=1, kind="stable")[:, :k]
    mask = np.ones_like(s, dtype=bool)
    np.put_along_axis(mask, order, False, axis=1)
    return run_skipnet(model, x, execute=mask)


@torch.no_grad()
def exit_outputs(model: SkipNet, x: torch.Tensor, batch_size: int = 1000):
    """Early exit on the same backbone: every block runs, every head is evaluated.

    Returns (probs [N, blocks, C] float32, cumulative FLOPs [N, blocks] of reaching each exit:
    entries + branches + every head up to and including that exit, no gates).
    """
    model.eval()
    probs = []
    step_flops = np.zeros(model.num_blocks)
    for i in range(0, len(x), batch_size):
        h = x[i : i + batch_size]
        p_b = []
        for b in range(model.num_blocks):
            f1, h = _flops_each(model.entries[b], h)
            f2, delta = _flops_each(model.branches[b], h)
            h = h + delta
            f3, z = _flops_each(model.heads[b], h)
            step_flops[b] = f1 + f2 + f3
            p_b.append(torch.softmax(z, 1))
        probs.append(torch.stack(p_b, 1))
    p = torch.cat(probs).numpy().astype(np.float32)
    cost = np.broadcast_to(np.cumsum(step_flops), (len(p), model.num_blocks)).astype(np.float64)
    return p, cost.copy()


def full_flops(model: SkipNet) -> float:
    """FLOPs per sample with every block run and only the final head (no gates)."""
    x = torch.zeros(1, 1, INPUT_SIZE, INPUT_SIZE)
    return float(run_skipnet(model, x, execute=np.ones((1, model.num_blocks), bool))["flops"][0])


@torch.no_grad()
def infer(model: SkipNet, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``run_skipnet``'s skipping with nothing counted or recorded (what a deployment runs, for
    the profiler): each block runs on the gathered inputs whose gate passes; final logits."""
    h = x
    for entry, gate, branch in zip(model.entries, model.gates, model.branches, strict=True):
        h = entry(h)
        idx = torch.nonzero(torch.sigmoid(gate(h)) >= threshold)[:, 0]
        if len(idx):
            h = h.index_add(0, idx, branch(h[idx]))
    return model.heads[-1](h)
