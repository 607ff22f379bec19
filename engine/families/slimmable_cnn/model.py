"""A slimmable CNN (Yu et al. 2019, "Slimmable Neural Networks"): one set of weights that runs at
several widths, with an exit after every stage, so compute adapts in width and in depth
(DynaBERT's two axes, Hou et al. 2020).

Every conv and linear layer holds the weight of the full width; at width multiplier w it uses
only the first ``ceil(w * C)`` output channels (and the first channels of its input, whatever
the previous layer produced). Batch-norm statistics differ from width to width, so each width
has its own ``BatchNorm2d`` (switchable batch norm); nothing else is width-specific.

    x                                   [B, 1, 28, 28]   (engine.data.images.to_model_input)
    h_s = stages[s](h_{s-1}, w)         [B, ceil(w C_s), S_s, S_s]
    z_s = exit_heads[s](h_s)            [B, num_classes] logits of exit s at width w

With the default widths on 28x28 inputs (each stage: conv 3x3 stride s, then conv 3x3 stride 1,
each followed by switchable BN and ReLU):

    stage 0: 1 -> 16 s2 @14x14, 16 -> 16      [16, 14, 14]
    stage 1: 16 -> 32 s2 @7x7, 32 -> 32       [32,  7,  7]
    stage 2: 32 -> 64 s2 @4x4, 64 -> 64       [64,  4,  4]
    stage 3: 64 -> 64 s1 @4x4, 64 -> 64       [64,  4,  4]

Exit heads: global average pool, then a slimmable linear layer (input channels sliced, all
classes out). The FLOPs of every width and exit are counted by torch on the card.

The multi-exit contract (``stages`` and ``heads``, see engine.run.exits) is the *width
cascade*: every stage is the identity and head ``i`` is the whole network at width ``i``, run
to its last exit. So the trace builder, the real early-exit runtime and every policy treat the
widths as the exits of a cascade, narrowest first, with no width-specific code: an input that
stops at width ``i`` never runs the wider networks. The heads hold no parameters of their own
(they call back into the shared layers), so the state dict is the slimmable network's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 28


@dataclass
class Config:
    num_classes: int = 10
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])  # full width per stage
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])  # first conv of each stage
    width_mults: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # ascending

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


def slim(channels: int, mult: float) -> int:
    """Channels kept at width multiplier ``mult``: ceil(mult * channels), at least 1."""
    return max(1, math.ceil(mult * channels - 1e-9))


class SlimConv2d(nn.Conv2d):
    """A conv whose output width is chosen per call; the input width is whatever arrives.

    ``forward(x, c_out)`` uses ``weight[:c_out, :x.shape[1]]``: the first channels of the
    full weight, so the narrow networks are sub-networks of the wide one.
    """

    def forward(self, x: torch.Tensor, c_out: int) -> torch.Tensor:
        w = self.weight[:c_out, : x.shape[1]]
        b = None if self.bias is None else self.bias[:c_out]
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class SlimLinear(nn.Linear):
    """A linear layer that reads the first ``x.shape[1]`` input features; all outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


class SwitchableBatchNorm2d(nn.Module):
    """One ``BatchNorm2d`` per width (Yu et al.'s switchable BN): ``bns[i]`` has
    ``slim(C, mults[i])`` channels and is used at width ``i`` only."""

    def __init__(self, channels: int, mults: list[float]):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(slim(channels, m)) for m in mults)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return self.bns[width](x)


class SlimStage(nn.Module):
    """conv 3x3 (stride) + BN + ReLU, conv 3x3 + BN + ReLU, at the width asked for."""

    def __init__(self, c_in: int, c_out: int, stride: int, mults: list[float]):
        super().__init__()
        self.c_out, self.mults = c_out, list(mults)
        self.conv1 = SlimConv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = SwitchableBatchNorm2d(c_out, mults)
        self.conv2 = SlimConv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = SwitchableBatchNorm2d(c_out, mults)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        c = slim(self.c_out, self.mults[width])
        h = torch.relu(self.bn1(self.conv1(x, c), width))  # [B, c, S, S]
        return torch.relu(self.bn2(self.conv2(h, c), width))


class ExitHead(nn.Module):
    """Global average pool + slimmable linear: [B, c, S, S] -> [B, num_classes]."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = SlimLinear(channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean(dim=(2, 3)))


class AtWidth(nn.Module):
    """The whole slimmable network at one width, run to its last exit: one "exit" of the width
    cascade. Holds the network without registering it (no duplicate parameters)."""

    def __init__(self, net: SlimmableCNN, width: int):
        super().__init__()
        self._net = (net,)  # a tuple hides the shared network from nn.Module's registry
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net[0].last_exit(x, self.width)


class SlimmableCNN(nn.Module):
    """Shared slimmable stages and exit heads; ``forward`` returns the last exit's logits at
    every width, narrowest first (the width cascade's exits)."""

    def __init__(self, config: Config):
        super().__init__()
        assert len(config.channels) == len(config.strides), "one stride per stage"
        m = list(config.width_mults)
        assert m == sorted(m) and 0 < m[0] and m[-1] == 1.0, "width_mults ascending, up to 1.0"
        self.config = config
        c_in, stages, heads = 1, [], []
        for c, s in zip(config.channels, config.strides, strict=True):
            stages.append(SlimStage(c_in, c, s, m))
            heads.append(ExitHead(c, config.num_classes))
            c_in = c
        self.blocks = nn.ModuleList(stages)
        self.exit_heads = nn.ModuleList(heads)
        # the multi-exit contract: the width cascade (identity stages, one width per head)
        self.stages = nn.ModuleList(nn.Identity() for _ in m)
        self.heads = nn.ModuleList(AtWidth(self, i) for i in range(len(m)))

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def num_widths(self) -> int:
        return len(self.config.width_mults)

    @property
    def num_stages(self) -> int:
        return len(self.blocks)

    def run(self, x: torch.Tensor, width: int, depth: int | None = None) -> list[torch.Tensor]:
        """Logits of exits 0..depth-1 (default: all) at width index ``width``."""
        out, h = [], x
        for block, head in list(zip(self.blocks, self.exit_heads, strict=True))[:depth]:
            h = block(h, width)
            out.append(head(h))
        return out

    def last_exit(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """Logits of the last exit at width index ``width``, without the earlier exit heads."""
        h = x
        for block in self.blocks:
            h = block(h, width)
        return self.exit_heads[-1](h)

    def grid(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """[W][S] logits of every (width, exit): width × depth."""
        return [self.run(x, i) for i in range(self.num_widths)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(stage(x)) for stage, head in zip(self.stages, self.heads, strict=True)]


def width_names(config: dict | Config) -> list[str]:
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return [f"width {m:g}" for m in cfg.width_mults]


def grid_names(config: dict | Config) -> list[str]:
    """Names of the width-major (width, exit) pairs of the width × depth trace."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return [f"w{m:g} · stage {s + 1}" for m in cfg.width_mults for s in range(len(cfg.channels))]


def build(config: dict) -> SlimmableCNN:
    return SlimmableCNN(Config.from_dict(config))
