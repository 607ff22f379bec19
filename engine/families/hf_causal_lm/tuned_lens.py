"""The tuned lens (Belrose et al. 2023, "Eliciting latent predictions with the tuned lens").

The logit lens reads layer l's state through the final norm and head as if it were the last
layer's; early layers are not in that basis, so it reads them badly. The tuned lens learns one
affine *translator* per layer, in the paper's residual form

    logits_l = lm_head(norm(h_l + A_l h_l + b_l)),

trained so that its distribution matches the final layer's (KL(final || lens_l)); the model
stays frozen. A_l is low-rank here (A_l = U_l V_l, rank r) to keep the shipped file small;
U_l = 0 and b_l = 0 at init, so an untrained tuned lens *is* the logit lens. The last layer
has no translator (its state is the model's output).

A lens is anything with ``.logits(lm, h, layer)``: ``analysis.logit_lens``, ``confidence`` and
``ExitRule`` take one as ``lens=`` (default: the logit lens). The lens ships as
``assets/models/lenses/<base>_tuned_lens.{safetensors,json}``, a card like a model's, kept out
of ``assets/models`` itself because it is not a model the registry can run, only a read-out of
one (``config.base``). Its trainer is ``train_lens`` (never imported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import torch
from torch import nn

from engine import paths
from engine.families.hf_causal_lm import analysis
from engine.families.hf_causal_lm.model import CausalLM, encode
from engine.paths import user_lenses_dir
from engine.registry import ModelCard, RegistryError, get_card, verified_weights

DATASETS = ("bbc", "tweets")  # held-out text the comparison reads


@dataclass(frozen=True)
class TunedLensConfig:
    n_layer: int  # layers of the base model; translators for layers 0 .. n_layer - 2
    d_model: int  # its hidden size D
    rank: int = 64  # r of A_l = U_l V_l (r = D: a full-rank translator, as in the paper)
    base: str = ""  # model id of the base model's card

    def __post_init__(self):
        if not 1 <= self.rank <= self.d_model:
            raise ValueError(f"rank must be 1 .. {self.d_model}, got {self.rank}")
        if self.n_layer < 2:
            raise ValueError("a tuned lens needs a model of at least two layers")


class TunedLens(nn.Module):
    def __init__(self, cfg: TunedLensConfig):
        super().__init__()
        self.cfg = cfg
        n, d, r = cfg.n_layer - 1, cfg.d_model, cfg.rank
        gen = torch.Generator().manual_seed(0)
        self.up = nn.Parameter(torch.zeros(n, d, r))  # [L-1, D, r] U_l: zero, so A_l = 0
        self.down = nn.Parameter(torch.randn(n, r, d, generator=gen) / math.sqrt(d))  # [L-1, r, D]
        self.bias = nn.Parameter(torch.zeros(n, d))  # [L-1, D] b_l

    def translate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s state h [..., D] -> h + U_l V_l h + b_l [..., D] (last layer: h)."""
        layer = _layer_index(layer, self.cfg.n_layer)
        if layer == self.cfg.n_layer - 1:
            return h
        a = (h @ self.down[layer].T) @ self.up[layer].T  # [..., r] -> [..., D]
        return h + a + self.bias[layer]

    def logits(self, lm: CausalLM, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The tuned lens: layer ``layer``'s state [..., D] -> next-token logits [..., V]."""
        return lm.logits(self.translate(h, layer))

    def rounded(self) -> TunedLens:
        """A copy whose weights are what the float16 file stores (the shipped numbers are
        measured on this)."""
        out = TunedLens(self.cfg)
        out.load_state_dict({k: v.detach().half().float() for k, v in self.state_dict().items()})
        return out.eval().requires_grad_(False)


def _layer_index(layer: int, n_layer: int) -> int:
    j = layer + n_layer if layer < 0 else layer
    if not 0 <= j < n_layer:
        raise ValueError(f"layers are 0 .. {n_layer - 1}, got {layer}")
    return j


def read(lm: CausalLM, h: torch.Tensor, layer: int, lens: TunedLens | None = None):
    """Layer ``layer``'s state h [..., D] -> logits [..., V] through ``lens`` (None: the logit
    lens), so callers can switch lenses with one argument."""
    return analysis.read_out(lm, h, layer, lens)


# --- the shipped file ------------------------------------------------------------------------


def card_id(base: str) -> str:
    return f"{base}_tuned_lens"


def lens_card(base: str = "smollm2_135m", lenses_dir: Path | None = None) -> ModelCard:
    """The card of the tuned lens trained for the base model ``base`` (RegistryError if none)."""
    card = get_card(card_id(base), paths.LENSES_DIR if lenses_dir is None else lenses_dir)
    if card.config.get("kind") != "tuned_lens" or card.config.get("base") != base:
        raise RegistryError(f"{card.path.name}: not a tuned lens for {base}")
    return card


def lens_for(card: ModelCard) -> ModelCard | None:
    """The tuned lens trained for the model ``card`` (bundled: in LENSES_DIR; the user's: in
    the user's lens folder), or None when it has none."""
    if card.family != "hf_causal_lm":
        return None
    try:
        return lens_card(card.model_id, user_lenses_dir() if card.user else paths.LENSES_DIR)
    except RegistryError:
        return None


def save_user_lens(lens: TunedLens, raw: dict, overwrite: bool = False) -> ModelCard:
    """Write a user model's lens (float16 safetensors, then its card with their SHA-256, each
    through a temporary file) into the user's lens folder; an existing one only with
    ``overwrite``."""
    import copy

    from engine.core.training import save_model

    if not overwrite:
        check_new_user_lens(raw["config"]["base"])
    folder = user_lenses_dir()
    save_model(copy.deepcopy(lens).half(), {**raw, "user": True}, folder)
    return get_card(raw["model_id"], folder)


def check_new_user_lens(model_id: str) -> None:
    """RegistryError if the user model ``model_id`` already has a lens (or a part of one)."""
    card = user_lenses_dir() / f"{card_id(model_id)}.json"
    if card.exists() or card.with_suffix(".safetensors").exists():
        raise RegistryError(f"the tuned lens {card.name} exists; pass --overwrite to replace it")


def remove_user_lens(model_id: str) -> None:
    """Delete the user model ``model_id``'s lens (its model was replaced without one)."""
    for suffix in (".json", ".safetensors"):
        (user_lenses_dir() / f"{card_id(model_id)}{suffix}").unlink(missing_ok=True)


def config_of(card: ModelCard) -> TunedLensConfig:
    c = card.config
    return TunedLensConfig(c["n_layer"], c["d_model"], c["rank"], c["base"])


def load(card: ModelCard) -> TunedLens:
    """The card's translators (SHA-checked safetensors, float16 on disk), float32, frozen."""
    lens = TunedLens(config_of(card))
    state = {k: v.float() for k, v in verified_weights(card).items()}
    lens.load_state_dict(state)
    return lens.eval().requires_grad_(False)


def config_dict(cfg: TunedLensConfig) -> dict:
    return {"kind": "tuned_lens", **asdict(cfg), "storage": "float16"}


# --- the comparison --------------------------------------------------------------------------


def held_out(dataset: str) -> list[str]:
    """Held-out text in a fixed order: the BBC News test articles (every 10th) or the test
    tweets."""
    from engine.data import text

    if dataset == "bbc":
        arts = text.bbc_articles()
        return [t.strip() for i, (_, t) in enumerate(arts) if i % 10 == 9]
    if dataset == "tweets":
        return list(text.load_tweets("test").texts)
    raise ValueError(f"unknown data set {dataset!r}; one of {DATASETS}")


@torch.no_grad()
def compare(
    lm: CausalLM,
    lens: TunedLens,
    texts: Sequence[str | Sequence[int]],
    dataset: str,
    max_len: int = 128,
    max_tokens: int | None = None,
) -> pl.DataFrame:
    """Both lenses on the same texts (strings, or token ids; each cut to ``max_len`` tokens; taken in order
    until ``max_tokens`` positions): per lens and layer, top-1 agreement with the full model and
    KL(full || lens) over every position, perplexity of the texts' next tokens; pooled over
    positions. Columns: dataset, lens, layer (0-based), agreement, kl, perplexity, tokens."""
    n = lm.n_layer
    sums = {name: torch.zeros(3, n, dtype=torch.float64) for name in ("logit", "tuned")}
    positions = predicted = 0
    for t in texts:
        ids = list(encode(lm, t) if isinstance(t, str) else t)[:max_len]
        if len(ids) < 2:
            continue
        for name, lz in (("logit", None), ("tuned", lens)):
            r = analysis.logit_lens(lm, ids, lz)
            s = sums[name]
            s[0] += torch.as_tensor(r.agreement) * len(ids)
            s[1] += torch.as_tensor(r.kl) * len(ids)
            s[2] += torch.as_tensor(r.nll) * (len(ids) - 1)
        positions += len(ids)
        predicted += len(ids) - 1
        if max_tokens is not None and positions >= max_tokens:
            break
    if positions == 0:
        raise ValueError("no text of at least two tokens to compare the lenses on")
    rows = []
    for name, s in sums.items():
        for j in range(n):
            rows.append(
                {
                    "dataset": dataset,
                    "lens": name,
                    "layer": j,
                    "agreement": float(s[0, j] / positions),
                    "kl": float(s[1, j] / positions),
                    "perplexity": math.exp(float(s[2, j] / predicted)),
                    "tokens": positions,
                }
            )
    return pl.DataFrame(rows)


def lens_comparison(card: ModelCard, which: str = "comparison") -> pl.DataFrame:
    """The comparison stored in the card (``"comparison"``: the held-out sets; ``"slice"``: the
    small slice a test recomputes), without recomputing it."""
    try:
        return pl.DataFrame(card.raw["metrics"][which]["rows"])
    except KeyError:
        raise RegistryError(f"{card.path.name}: no stored lens comparison {which!r}") from None
