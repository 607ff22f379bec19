"""Which prompt tokens drove a generated token, read at its exit layer versus the last layer.

Layer Integrated Gradients (Captum) on the token embeddings, for the logit of one token at one
position as the logit lens reads it after layer ``e`` (final norm + head on ``h_e``): the same
question asked of the model cut after ``e`` and of the whole model. The forward is a plain one
(no KV walk): embed, layers 0..e at full sequence length, norm, head.

Captum hooks the layer it attributes to. The model is shared by every session (the app caches
one copy per process), so the hook goes on a fresh wrapper around the shared embedding, never
on the shared module itself: another session's forward at the same moment is not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.families.hf_causal_lm.model import CausalLM, rotary


@dataclass(frozen=True)
class Attribution:
    layer: int  # the logit is read after this layer (n_layer - 1: the whole model)
    scores: np.ndarray  # [n] per attributed position (the prompt's tokens)
    logit: float  # the target's logit on the real input
    baseline_logit: float  # ... and on the baseline (attributed tokens replaced)
    delta: float  # Captum's convergence delta: sum(scores) - (logit - baseline_logit)


class _Embed(nn.Module):
    """The shared embedding's lookup, as a module of its own for Captum to hook."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _logit_after(lm: CausalLM, embed: _Embed, layer: int, token: int):
    """f(ids [B, T]) -> [B]: the logit of ``token`` at the last position after ``layer``."""

    def f(ids: torch.Tensor) -> torch.Tensor:
        h = embed(ids)
        t = h.shape[1]
        cos_sin, pos = rotary(lm, h, 0)
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()[None, None]
        for j in range(layer + 1):
            h = lm.layers[j](h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        return lm.logits(h[:, -1])[:, token]

    return f


def attribute(
    lm: CausalLM,
    context: Sequence[int],
    token: int,
    layer: int,
    positions: Sequence[int] | None = None,
    baseline_id: int = 0,
    n_steps: int = 24,
) -> Attribution:
    """Attribute the logit of ``token`` (predicted after the last id of ``context``) read after
    ``layer`` to the ``positions`` of ``context`` (default: all of them), whose embeddings are
    integrated from ``baseline_id``'s; the other positions keep their tokens. The ``n_steps``
    interpolation points run as one batch."""
    from captum.attr import LayerIntegratedGradients

    if not 0 <= layer < lm.n_layer:
        raise ValueError(f"layers are 0 .. {lm.n_layer - 1}")
    ids = torch.as_tensor(list(context), dtype=torch.long)[None]
    if ids.shape[1] == 0:
        raise ValueError("nothing to attribute: the context is empty")
    pos = list(range(ids.shape[1])) if positions is None else [int(p) for p in positions]
    base = ids.clone()
    base[0, pos] = int(baseline_id)
    embed = _Embed(lm.hf.model.embed_tokens.weight)
    f = _logit_after(lm, embed, int(layer), int(token))
    lig = LayerIntegratedGradients(f, embed)
    with torch.enable_grad():
        attr, delta = lig.attribute(
            ids,
            baselines=base,
            n_steps=int(n_steps),
            internal_batch_size=int(n_steps),
            return_convergence_delta=True,
        )
    with torch.no_grad():
        logit, base_logit = (float(v) for v in f(torch.cat([ids, base])))
    scores = attr[0].sum(-1).detach().numpy().astype(np.float64)
    return Attribution(int(layer), scores[pos], logit, base_logit, float(delta[0]))
