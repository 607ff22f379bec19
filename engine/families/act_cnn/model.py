"""Adaptive Computation Time on images: one weight-shared conv block, pondered per image.

The same ACT as ``engine.families.act.model`` (Graves 2016; the halting rule, remainder and ponder cost
are imported from there), with a convolutional state instead of a vector. A stem runs once; then
one residual block, the *same weights every step*, refines the state until the halting unit
says stop:

    e     = stem(x)                                     runs once              [B, W, 7, 7]
    s^0   = e
    s^n   = s^{n-1} + conv2(relu(norm(conv1([e, s^{n-1}]))))   the pondered block  [B, W, 7, 7]
    r^n   = pool(s^n)                                   what the heads see     [B, W]
    h^n   = sigmoid(w_h . r^n + b_h)                    halting probability    [B]
    y^n   = softmax(W_y r^n + b_y)                      the step's answer      [B, C]

then N, R, p^n and the mean-field answer exactly as in ``act.py``; the loss is the task loss plus
tau * (N + R). Feeding ``e`` to every step (as Graves feeds x to every ponder step) keeps the
image in view however long the network ponders.

Why images: each step widens the receptive field by 4 pixels and adds one more round of
computation, so a clean, typical digit can be answered after a step or two while an ambiguous
one gains from more. The number of steps is then a per-image measure of difficulty that can be
set against the early-exit CNN's oracle exit on the same test images (``engine.families.act.records``), and a
digit drawn on the canvas can be pondered live.

GroupNorm rather than BatchNorm: the block is applied to a different mix of inputs at every
step (halted images leave the batch), and a per-sample norm keeps each image's answer
independent of the rest of its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from engine.families.act.model import mean_field

INPUT_SIZE = 28


@dataclass
class Config:
    num_classes: int = 10
    width: int = 32  # W, channels of the pondered state
    stem_width: int = 16
    groups: int = 4  # GroupNorm groups in the pondered block
    max_steps: int = 8  # M
    eps: float = 0.01  # halt when cumulative halting >= 1 - eps
    halt_bias_init: float = -1.0  # sigmoid(-1) ~ 0.27: a few steps at the start
    readout: str = "pool"  # "pool": heads see the pooled state; "flatten": the whole 7x7 map

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


class PonderBlock(nn.Module):
    """s' = s + conv2(relu(norm(conv1([e, s])))); the weights are shared by every step."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.norm = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s + self.conv2(torch.relu(self.norm(self.conv1(torch.cat([e, s], 1)))))


class ACTConvNet(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(1, config.stem_width, 3, stride=2, padding=1),  # [B, 16, 14, 14]
            nn.ReLU(),
            nn.Conv2d(config.stem_width, w, 3, stride=2, padding=1),  # [B, W, 7, 7]
            nn.ReLU(),
        )
        self.block = PonderBlock(w, config.groups)
        d = w if config.readout == "pool" else w * 7 * 7
        self.halt = nn.Linear(d, 1)
        nn.init.constant_(self.halt.bias, config.halt_bias_init)
        self.out = nn.Linear(d, config.num_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, INPUT_SIZE, INPUT_SIZE)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The stem, run once per image: [B, 1, 28, 28] -> e [B, W, 7, 7]."""
        return self.stem(x)

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return e.clone()  # s^0 = e (a copy: run_act updates the state in place)

    def step(self, e: torch.Tensor, s: torch.Tensor, first: bool):
        """One ponder step: (new state [B, W, 7, 7], halting score [B], class logits [B, C]).

        ``first`` is unused (the state already differs at step 1); it keeps the signature of
        ``ACTNet.step`` so ``act.run_act`` drives both.
        """
        s = self.block(e, s)
        r = s.mean((2, 3)) if self.config.readout == "pool" else s.flatten(1)
        return s, torch.sigmoid(self.halt(r))[:, 0], self.out(r)

    def forward(self, x: torch.Tensor, eps: float | None = None) -> dict[str, torch.Tensor]:
        """Training pass (every image unrolled M steps); ``act.run_act`` really stops."""
        return mean_field(self, x, eps)


def build(config: dict) -> ACTConvNet:
    return ACTConvNet(Config.from_dict(config))
