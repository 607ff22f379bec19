"""A user's Hugging Face encoder (BERT-like) with an exit classifier after every layer.

The backbone is whatever ``AutoModel`` loads from the user's folder (offline, safetensors
only); it is not rewritten here, only cut into its own modules and run one layer at a time, as
DeeBERT does: stage 0 is the embeddings and layer 0, stage k is layer k, and head k mean-pools
layer k's hidden states over the real tokens and classifies them (LayerNorm -> Linear -> GELU
-> Linear, as the bundled MiniLM's exits).

The runtime's contract (``engine.run.runtime``) passes one float tensor between stages, so the
attention mask rides along with the activations instead of beside them::

    x      = [ids, mask]                    [B, 2, T] float32 (ids are exact below 2^24)
    h_k    = stages[k](h_{k-1})             [B, T, H + 1]: hidden states, then the mask
    z_k    = heads[k](h_k)                  [B, C] logits of exit k

Every text of one model is padded to the same length (``Config.seq_length``), and attention
runs in the eager implementation with an additive mask: the kernels are then the same whatever
batch a text is in, which the runtime's bit-for-bit agreement with the trace relies on.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing file fails at once, no network

import torch  # noqa: E402
from torch import nn  # noqa: E402

# (embeddings, layer list) attribute paths on the base model: BERT, RoBERTa, ELECTRA, XLM-R,
# CamemBERT, ... keep ``embeddings`` + ``encoder.layer``
LAYOUTS = (("embeddings", "encoder.layer"),)


class WalkError(RuntimeError):
    """The encoder's modules are not laid out as a walkable layer list."""


@dataclass
class Config:
    path: str  # the user's checkpoint folder (config.json, safetensors, tokenizer)
    num_classes: int = 2
    seq_length: int = 64  # every text padded / truncated to this many tokens
    head_hidden: int = 128
    hidden_size: int = 0  # as in the checkpoint's config.json (checked on load)
    num_layers: int = 0
    joint: bool = False  # backbone fine-tuned with the heads (and saved with them)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_parts(base: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(embeddings, layers) of a base encoder; WalkError when neither layout fits."""
    for emb_name, layers_name in LAYOUTS:
        emb, layers = _get(base, emb_name), _get(base, layers_name)
        if isinstance(emb, nn.Module) and isinstance(layers, nn.ModuleList) and len(layers):
            return emb, layers
    names = ", ".join(f"{e} + {layers}" for e, layers in LAYOUTS)
    raise WalkError(
        f"{type(base).__name__} has no layer list this code can walk (looked for {names})"
    )


def load_backbone(path: str | Path) -> nn.Module:
    """The base encoder from the user's folder: local files only, safetensors only, float32,
    eager attention (see the module docstring)."""
    from transformers import AutoModel
    from transformers.utils import logging

    # a classifier checkpoint's own head is not loaded (ours replace it): no report about it
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with torch.no_grad():
        base = AutoModel.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            attn_implementation="eager",
        )
    return base.eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 1/0 -> [B, 1, 1, T]: 0 where attended, the dtype's minimum where padded."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class Stage(nn.Module):
    """One exit's worth of backbone: (embeddings +) one of the checkpoint's own layers."""

    def __init__(self, layer: nn.Module, embeddings: nn.Module | None = None):
        super().__init__()
        self.embeddings = embeddings
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embeddings is not None:
            mask = x[:, 1].contiguous()
            h = self.embeddings(input_ids=x[:, 0].long())
        else:
            mask = x[..., -1].contiguous()
            h = x[..., :-1].contiguous()
        out = self.layer(h, attention_mask=additive_mask(mask, h.dtype))
        out = out[0] if isinstance(out, tuple) else out
        return torch.cat([out, mask[..., None].to(out.dtype)], dim=-1)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of h [B, T, H] over positions where mask [B, T] is 1 -> [B, H]."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class ExitHead(nn.Module):
    """Mean-pool over real tokens, then a two-layer MLP."""

    def __init__(self, hidden: int, head_hidden: int, num_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(hidden),
            nn.Linear(hidden, head_hidden),
            nn.GELU(),
            nn.Linear(head_hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(x[..., :-1], x[..., -1]))

    def from_features(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


class HFEncoderExits(nn.Module):
    """The checkpoint's layers as stages, an exit head per stage. ``state_dict`` holds the
    heads, plus the backbone when it was fine-tuned (``Config.joint``)."""

    def __init__(self, config: Config, base: nn.Module | None = None):
        super().__init__()
        self.config = config
        base = load_backbone(config.path) if base is None else base
        emb, layers = find_parts(base)
        hidden = int(base.config.hidden_size)
        if config.hidden_size and config.hidden_size != hidden:
            raise WalkError(
                f"{config.path}: hidden size {hidden}, but the card says {config.hidden_size}"
            )
        if config.num_layers and config.num_layers != len(layers):
            raise WalkError(
                f"{config.path}: {len(layers)} layers, but the card says {config.num_layers}"
            )
        config.hidden_size, config.num_layers = hidden, len(layers)
        self.hf_config = base.config
        self.stages = nn.ModuleList(
            [Stage(layers[0], emb)] + [Stage(layer) for layer in layers[1:]]
        )
        self.heads = nn.ModuleList(
            [ExitHead(hidden, config.head_hidden, config.num_classes) for _ in layers]
        )
        self.stages.requires_grad_(config.joint)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @property
    def word_embeddings(self) -> nn.Module:
        """The token-embedding table (what Captum attributes to)."""
        return self.stages[0].embeddings.word_embeddings

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        out = self.heads.state_dict(prefix=prefix + "heads.", keep_vars=keep_vars)
        if self.config.joint:
            out.update(self.stages.state_dict(prefix=prefix + "stages.", keep_vars=keep_vars))
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        parts = {"heads": self.heads, "stages": self.stages}
        want = ("heads", "stages") if self.config.joint else ("heads",)
        other = [k for k in state_dict if k.split(".", 1)[0] not in want]
        if strict and other:
            raise RuntimeError(f"unexpected tensors in the exit weights: {other[:3]}")
        for name in want:
            sub = {k[len(name) + 1 :]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            parts[name].load_state_dict(sub, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All exits' logits, K tensors [B, C]."""
        logits, h = [], x
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            logits.append(head(h))
        return logits

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the heads read, every layer: [B, K, H] (heads not run)."""
        out, h = [], x
        for stage in self.stages:
            h = stage(h)
            out.append(masked_mean(h[..., :-1], h[..., -1]))
        return torch.stack(out, dim=1)


def encode(tokenizer, texts: list[str], seq_length: int) -> torch.Tensor:
    """Texts -> the model input [B, 2, T] float32 (ids, mask), padded to ``seq_length``."""
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=seq_length,
        return_tensors="pt",
    )
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).float()


def token_counts(tokenizer, texts: list[str], max_length: int) -> list[int]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


def exit_names(config: dict | Config) -> list[str]:
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return [f"layer {k + 1}" for k in range(cfg.num_layers)]


def build(config: dict) -> HFEncoderExits:
    return HFEncoderExits(Config.from_dict(config))
