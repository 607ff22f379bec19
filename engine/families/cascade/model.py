"""A model cascade: progressively larger classifiers run in sequence, each one an "exit".

The oldest form of adaptive inference (Viola-Jones-style cascades): try a small, cheap model
first and run the big one only when the small one is not confident. Unlike a multi-exit network
the members share no computation, so a late exit pays for every earlier member too.

To make every policy, trace and page work on cascades unchanged, the cascade is written with the
same contract as the multi-exit CNN (engine.families.multi_exit_cnn.model):

    h_k = stages[k](h_{k-1}) = x     identity: every member sees the input   [B, 1, 28, 28]
    z_k = heads[k](h_k)              the whole k-th classifier               [B, num_classes]

so the cost of reaching exit k is the sum of the members' costs up to k.

Each member is a plain CNN (conv / batch-norm / ReLU, stride-2 downsampling, then a linear
classifier on the flattened or globally pooled feature map). Defaults on 28x28 inputs:

    small: conv 1->4 s2 [4,14,14], conv 4->8 s2 [8,7,7], flatten 392 -> linear   (~0.04 MFLOPs)
    large: conv 1->32 s2 [32,14,14], conv 32->64 s2 [64,7,7], conv 64->64 [64,7,7],
           flatten 3136 -> linear                                               (~5.6 MFLOPs)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

INPUT_SIZE = 28


def _default_members() -> list[dict]:
    return [
        {"name": "small CNN", "widths": [4, 8], "strides": [2, 2], "pool": "flatten"},
        {"name": "large CNN", "widths": [32, 64, 64], "strides": [2, 2, 1], "pool": "flatten"},
    ]


@dataclass
class Config:
    num_classes: int = 10
    members: list[dict] = field(default_factory=_default_members)  # smallest first

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class PlainCNN(nn.Module):
    """conv-bn-relu layers, then a linear classifier on the flattened (or averaged) map."""

    def __init__(self, widths: list[int], strides: list[int], pool: str, num_classes: int):
        super().__init__()
        layers, c_in, size = [], 1, INPUT_SIZE
        for c_out, s in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, s, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            c_in, size = c_out, (size + 2 - 3) // s + 1
        self.features = nn.Sequential(*layers)
        if pool == "gap":
            self.pool = nn.AvgPool2d(size)  # fixed kernel = global average pool, [B, C, 1, 1]
            n_feat = c_in
        elif pool == "flatten":
            self.pool = nn.Identity()
            n_feat = c_in * size * size
        else:
            raise ValueError(f"pool must be 'gap' or 'flatten', not {pool!r}")
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(n_feat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))  # [B, num_classes]


class Cascade(nn.Module):
    """Members as heads behind identity stages; ``forward`` returns every member's logits."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(nn.Identity() for _ in config.members)
        self.heads = nn.ModuleList(
            PlainCNN(m["widths"], m["strides"], m.get("pool", "gap"), config.num_classes)
            for m in config.members
        )

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        h = x
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)  # identity: each member classifies the input itself
            logits.append(head(h))
        return logits


def exit_names(config: dict | Config) -> list[str]:
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return [m.get("name", f"member {k + 1}") for k, m in enumerate(cfg.members)]


def build(config: dict) -> Cascade:
    return Cascade(Config.from_dict(config))
