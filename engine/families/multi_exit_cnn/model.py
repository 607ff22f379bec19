"""A residual CNN with a classifier ("exit", "internal classifier") after every stage.

In the style of BranchyNet (Teerapittayanon 2016) and Shallow-Deep Networks (Kaya 2019): a
plain ResNet-like backbone cut into K stages, and a lightweight classifier per stage, so a
prediction is available after each stage and an input can stop at the first exit that is
confident enough. The network is written as two lists so that every consumer (trace builder,
ONNX runtime, pages) can run it one piece at a time:

    h_{-1} = x                       [B, 1, 28, 28]   (engine.data.images.to_model_input)
    h_k    = stages[k](h_{k-1})      [B, C_k, S_k, S_k]
    z_k    = heads[k](h_k)           [B, num_classes] logits of exit k

The cost of reaching exit k is the sum over j <= k of stage_j + head_j (earlier heads are run
to decide whether to stop). Every stage and head uses only conv / batch-norm / ReLU / add /
average pooling / linear, so each exports on its own with ``torch.onnx.export``.

With the default widths on 28x28 inputs, stage by stage (FLOPs per sample counted by
``engine.core.costs``, a multiply-add = 2 FLOPs; the card records the measured values):

    stage 0: stem conv 1->16 @28x28, residual block 16->16 stride 2  -> [16, 14, 14]
    stage 1: residual block 16->32 stride 2                           -> [32,  7,  7]
    stage 2: residual block 32->64 stride 2                           -> [64,  4,  4]
    stage 3: residual block 64->64 stride 1                           -> [64,  4,  4]

Heads pool the feature map to ``head_pool`` x ``head_pool`` cells (average pooling with a fixed
kernel, as SDN's internal classifiers reduce feature maps to a fixed size) and apply one linear
layer: a few thousand FLOPs, negligible next to the stages, so early exits are nearly free.

With ``gates: true`` in the config the model also carries JEI-DNN gates (``JointGates``), one
per exit but the last, trained jointly with the heads (``train_jei``); the runtime runs the
``gate`` policy on their live scores, and the trace builder writes them to the trace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from engine.core.gates import features, features_torch

INPUT_SIZE = 28


@dataclass
class Config:
    num_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 64])  # channels per stage
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])  # stride of each block
    head_pool: int = 1  # heads average-pool to head_pool x head_pool cells (1 = global pool)
    gates: bool = False  # carry jointly trained exit gates (JEI-DNN, ``JointGates``)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with batch norm, identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + self.shortcut(x))


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class ExitHead(nn.Module):
    """Lightweight internal classifier: average-pool to pool x pool cells, then one linear layer.

    The pooling kernel is fixed from the known feature-map size (not adaptive pooling), so the
    head exports to ONNX as a plain AveragePool + Gemm.
    """

    def __init__(self, channels: int, size: int, pool: int, num_classes: int):
        super().__init__()
        pool = max(1, min(pool, size))
        kernel = -(-size // pool)  # ceil: the last cell may be smaller (ceil_mode)
        self.pool = nn.AvgPool2d(kernel, kernel, ceil_mode=True, count_include_pad=False)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(h)))  # [B, num_classes]


class JointGates(nn.Module):
    """JEI-DNN's gating mechanism: exit k's gate reads its head's output (the features of
    ``engine.core.gates``: sorted probabilities, entropy, margin, agreement with exit k-1 and
    exit k-1's max-prob) and gives g_k = P(stop at k | reached k) with one logistic unit. The
    last exit's gate is 1.

    ``forward`` (torch, differentiable) is what training uses; ``scores`` (numpy float64,
    elementwise products summed per row) is what the trace and the runtime use, so a sample's
    score does not depend on how many rows are computed with it.
    """

    def __init__(self, num_exits: int, num_classes: int):
        super().__init__()
        f = num_classes + 4
        self.linear = nn.ModuleList(nn.Linear(f, 1) for _ in range(num_exits - 1))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, K] gate probabilities from probabilities [B, K, C]."""
        x = features_torch(probs)
        g = [torch.sigmoid(lin(x[:, k]).squeeze(-1)) for k, lin in enumerate(self.linear)]
        return torch.stack([*g, torch.ones_like(g[0])], dim=1)

    @torch.no_grad()
    def score_at(self, probs: np.ndarray, k: int) -> np.ndarray:
        """[N] float32 gate score of exit k from probabilities [N, >k, C] (reads exits k-1, k)."""
        if k >= len(self.linear):
            return np.ones(len(probs), dtype=np.float32)
        x = features(probs[:, max(0, k - 1) : k + 1])[:, -1]
        lin = self.linear[k]
        w = lin.weight.detach().cpu().double().numpy()[0]
        b = float(lin.bias.detach().cpu().double().numpy()[0])
        logit = (x * w).sum(axis=-1) + b
        return (1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))).astype(np.float32)

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """[N, K] float32 gate scores from probabilities [N, K, C]; column k reads exits 0..k."""
        return np.stack([self.score_at(probs, k) for k in range(probs.shape[1])], axis=1)


def _out_size(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1  # 3x3 conv, padding 1


class MultiExitCNN(nn.Module):
    """K residual stages, one exit head per stage; ``forward`` returns all K logits."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        assert len(config.widths) == len(config.strides), "one stride per stage"
        stages, heads = [], []
        c_in, size = 1, INPUT_SIZE
        for k, (c_out, stride) in enumerate(zip(config.widths, config.strides, strict=True)):
            block = ResidualBlock(c_out if k == 0 else c_in, c_out, stride)
            # stage 0 starts with a stem conv at full resolution: [B,1,28,28] -> [B,C0,28,28]
            stages.append(nn.Sequential(conv_bn_relu(1, c_out), block) if k == 0 else block)
            size = _out_size(size, stride)
            heads.append(ExitHead(c_out, size, config.head_pool, config.num_classes))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.gates = JointGates(len(stages), config.num_classes) if config.gates else None

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        h = x
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            logits.append(head(h))
        return logits


def exit_names(config: dict | Config) -> list[str]:
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return [f"stage {k + 1}" for k in range(len(cfg.widths))]


def build(config: dict) -> MultiExitCNN:
    return MultiExitCNN(Config.from_dict(config))
