"""A small character-level GPT whose every layer can emit the next token (CALM / LayerSkip).

Decoder-only, pre-LayerNorm (GPT-2 / nanoGPT layout), with *one* output head shared by all
layers: ``logits_l = head(ln_f(h_l))``. Trained with LayerSkip's early-exit loss (Elhoushi
2024: a weighted cross-entropy at every layer through the shared head, plus layer dropout that
grows with depth), so intermediate layers are readable and a token can stop early::

    h_{-1} = wte[x_t] + wpe[t]                              [B, T, D]
    h_l    = h_{l-1} + attn_l(ln1_l(h_{l-1}))               (causal, n_head heads)
    h_l    = h_l + mlp_l(ln2_l(h_l))                        D -> 4D -> D
    z_l    = head(ln_f(h_l))                                [B, T, V]   every layer

Generation keeps a key/value cache per layer and decides *per token* how deep to go:

- early exit (CALM, Schuster 2022): after layer l, stop when a confidence measure passes a
  threshold: softmax max-prob, top-2 margin of the shared head's distribution, or hidden-state
  saturation (cosine between the states before and after layer l). Layers above the exit are
  not run for this token, but later tokens attend to every layer, so their key/value entries
  at this position are filled by *propagating the exit layer's state*: K_j, V_j computed from
  ln1_j(h_exit) for every skipped layer j > l, as CALM does.
- layer skipping: when confident after layer l, skip layer l+1 (its K/V filled the same way
  from the current state) and continue; the last layer always runs. Glavas et al. (2024)
  found decoder LMs far more robust to skipping than to exiting; the page compares the two.
- static skip patterns (a fixed set of layers skipped for every token), used by the
  per-sequence oracle in ``engine.families.early_exit_lm.train``.

The batched decoder below keeps every row in step: a row that has exited (or skips a layer)
still has its K/V written from its frozen state, and its residual update is masked out, which
is exactly the batch-size-1 semantics (tests check it against per-row decoding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# The vocabulary: newline, printable ASCII and the pound sign (the BBC corpus uses it);
# anything else becomes "?".
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127)) + "£"
UNKNOWN = "?"
MEASURES = ("max_prob", "margin", "saturation")
MODES = ("exit", "skip")


@dataclass
class Config:
    vocab: str = VOCAB
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 160
    block_size: int = 256  # longest context (prompt + generated characters)
    layer_dropout: float = 0.1  # LayerSkip: drop layer l with p = layer_dropout * l / (L-1)
    exit_loss_scale: float = 0.5  # weight of the intermediate layers' losses (see exit_weights)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def encode(text: str, vocab: str = VOCAB) -> list[int]:
    table = {c: i for i, c in enumerate(vocab)}
    unk = table[UNKNOWN]
    return [table.get(c, unk) for c in text]


def decode(ids, vocab: str = VOCAB) -> str:
    return "".join(vocab[int(i)] for i in ids)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_head = c.n_head
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model)
        )

    def kv_q(self, h: torch.Tensor):
        """q, k, v [B, nh, T, hd] from the residual stream h [B, T, D]."""
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        shape = (b, t, self.n_head, d // self.n_head)
        return (x.view(shape).transpose(1, 2) for x in (q, k, v))

    def finish(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual attention output y [B, nh, T, hd], then the MLP sub-layer."""
        b, _, t, _ = y.shape
        h = h + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.ln2(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.kv_q(h)
        return self.finish(h, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def exit_weights(c: Config) -> torch.Tensor:
    """LayerSkip-style loss weights: growing with depth, the last layer weighted most; sum 1."""
    n = c.n_layer
    w = torch.tensor([c.exit_loss_scale * (i + 1) for i in range(n - 1)] + [float(n)])
    return w / w.sum()


class EarlyExitLM(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.block_size, c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = idx.shape[-1]
        if start + t > self.config.block_size:
            raise ValueError(
                f"context of {start + t} characters exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(start, start + t, device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit: any layer's state -> next-token logits (tied to the embedding)."""
        return F.linear(self.ln_f(h), self.wte.weight)

    # --- parallel forward (training, teacher-forced evaluation) ------------------------------
    def forward(self, idx: torch.Tensor, layer_dropout: float = 0.0) -> list[torch.Tensor]:
        """Logits after every layer: L tensors [B, T, V]. Layer dropout only when asked."""
        h = self.embed(idx)
        out = []
        n = self.n_layer
        for i, block in enumerate(self.blocks):
            p = layer_dropout * i / max(1, n - 1)
            if p > 0:
                keep = (torch.rand(h.shape[0], 1, 1, device=h.device) >= p).to(h.dtype)
                h = h + keep * (block(h) - h)
            else:
                h = block(h)
            out.append(self.logits(h))
        return out

    def forward_config(
        self, idx: torch.Tensor, run: list[bool] | None = None, exit_at: int | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V] with a static plan: layers with run[l] False are skipped for every
        token, and the output is read after layer ``exit_at`` (default: the last)."""
        n = self.n_layer
        run = [True] * n if run is None else list(run)
        exit_at = n - 1 if exit_at is None else exit_at
        h = self.embed(idx)
        for i in range(exit_at + 1):
            if run[i]:
                h = self.blocks[i](h)
        return self.logits(h)


# --- incremental decoding with a KV cache -----------------------------------------------------


@dataclass
class KVCache:
    """Per-layer keys and values [B, nh, block_size, hd], filled up to ``length`` positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, model: EarlyExitLM, batch: int) -> KVCache:
        c = model.config
        shape = (batch, c.n_head, c.block_size, c.d_model // c.n_head)
        w = model.wte.weight
        return cls(
            [w.new_zeros(shape) for _ in range(c.n_layer)],
            [w.new_zeros(shape) for _ in range(c.n_layer)],
        )


@dataclass
class ExitPolicy:
    """How deep each generated token goes.

    mode "exit": stop after the first layer whose confidence >= threshold (CALM).
    mode "skip": after a confident layer, skip the next one (the last layer always runs).
    ``static_skip``: layers skipped for every token (applied in both modes).
    ``threshold`` > 1 (or measure None) disables the dynamic decision: plain full depth.
    """

    measure: str | None = "max_prob"
    threshold: float = 2.0
    mode: str = "exit"
    static_skip: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.measure is not None and self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r}; one of {MEASURES}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; one of {MODES}")


def confidence(model: EarlyExitLM, h: torch.Tensor, h_prev: torch.Tensor, measure: str):
    """[B] confidence of the state h [B, D] (h_prev: the state before the layer just run)."""
    if measure == "saturation":
        return F.cosine_similarity(h, h_prev, dim=-1)
    p = torch.softmax(model.logits(h), dim=-1)
    if measure == "max_prob":
        return p.max(-1).values
    top2 = p.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


@torch.no_grad()
def prefill(
    model: EarlyExitLM, idx: torch.Tensor, cache: KVCache, skip: tuple[int, ...] = ()
) -> torch.Tensor:
    """Run the prompt [B, T] in parallel, storing every layer's K/V: at full depth, except
    for the layers of a static plan ``skip`` (skipped for every token, the prompt included).

    Returns the last layer's logits at the last position [B, V].
    """
    t0 = cache.length
    h = model.embed(idx, t0)
    t = idx.shape[1]
    for i, block in enumerate(model.blocks):
        q, k, v = block.kv_q(h)
        cache.k[i][:, :, t0 : t0 + t] = k
        cache.v[i][:, :, t0 : t0 + t] = v
        kk, vv = cache.k[i][:, :, : t0 + t], cache.v[i][:, :, : t0 + t]
        # causal within the new chunk, full view of the cached past
        mask = torch.ones(t, t0 + t, dtype=torch.bool, device=idx.device).tril(t0)
        if i not in skip:
            h = block.finish(h, F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask))
    cache.length = t0 + t
    return model.logits(h[:, -1])


@torch.no_grad()
def step(model: EarlyExitLM, tok: torch.Tensor, cache: KVCache, policy: ExitPolicy):
    """Decode one position for every row: tok [B] -> (logits [B, V], layers_run [B],
    exit_layer [B], confidences [B, L] (NaN where not measured))."""
    pos = cache.length
    b = tok.shape[0]
    n = model.n_layer
    h = model.embed(tok[:, None], pos)  # [B, 1, D]
    active = torch.ones(b, dtype=torch.bool, device=tok.device)  # not yet exited
    skip_next = torch.zeros(b, dtype=torch.bool, device=tok.device)
    layers_run = torch.zeros(b, dtype=torch.long, device=tok.device)
    exit_layer = torch.full((b,), n - 1, dtype=torch.long, device=tok.device)
    conf = torch.full((b, n), float("nan"), device=tok.device)
    dynamic = policy.measure is not None and policy.threshold <= 1.0
    for i, block in enumerate(model.blocks):
        # K/V at this position for *every* row: for exited or skipping rows they come from
        # the propagated (frozen) state h, CALM's state propagation.
        q, k, v = block.kv_q(h)
        cache.k[i][:, :, pos : pos + 1] = k
        cache.v[i][:, :, pos : pos + 1] = v
        run = active & ~skip_next
        if policy.mode == "skip" and i == n - 1:
            run = active.clone()  # skipping never drops the last layer
        if i in policy.static_skip:
            run = torch.zeros_like(run)
        if run.any():
            y = F.scaled_dot_product_attention(
                q, cache.k[i][:, :, : pos + 1], cache.v[i][:, :, : pos + 1]
            )
            h_new = block.finish(h, y)
            h_prev = h
            h = torch.where(run[:, None, None], h_new, h)
            layers_run += run.long()
            skip_next = torch.zeros_like(skip_next)
            if dynamic and i < n - 1:
                c = confidence(model, h[:, 0], h_prev[:, 0], policy.measure)
                conf[:, i] = torch.where(run, c, conf[:, i])
                hit = run & (c >= policy.threshold)
                if policy.mode == "exit":
                    exit_layer = torch.where(
                        hit & active, torch.full_like(exit_layer, i), exit_layer
                    )
                    active = active & ~hit
                else:
                    skip_next = hit
        else:
            skip_next = torch.zeros_like(skip_next)
    cache.length = pos + 1
    return model.logits(h[:, 0]), layers_run, exit_layer, conf


@dataclass
class Generation:
    prompt: str
    text: str  # the generated characters (prompt excluded)
    tokens: list[int]
    layers_run: list[int]  # per generated token
    exit_layer: list[int]  # per generated token (n_layer - 1 = full depth)
    confidence: list[list[float]]  # per token, per layer (NaN where not measured)
    prob: list[float]  # probability of the chosen token at its exit


@torch.no_grad()
def generate(
    model: EarlyExitLM,
    prompt: str,
    max_new_tokens: int = 100,
    policy: ExitPolicy | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> Generation:
    """Greedy (temperature 0) or sampled generation with per-token early exit / skipping.

    The prompt is truncated from the left so prompt + generation fit in block_size. Token t's
    prediction comes from the state its exit layer produced for token t-1 (the first one from
    the full-depth prefill), as in CALM.
    """
    policy = policy or ExitPolicy(measure=None)
    c = model.config
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if max_new_tokens >= c.block_size:
        raise ValueError(f"at most {c.block_size - 1} new characters")
    ids = encode(prompt or "\n", c.vocab)
    ids = ids[-(c.block_size - max_new_tokens) :]
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache.empty(model, 1)
    logits = prefill(model, torch.tensor([ids]), cache)
    out = Generation(prompt, "", [], [], [], [], [])
    lr, el, cf = c.n_layer, c.n_layer - 1, [float("nan")] * c.n_layer
    for _ in range(max_new_tokens):
        p = torch.softmax(logits[0], -1)
        if temperature > 0:
            tok = int(
                torch.multinomial(torch.softmax(logits[0] / temperature, -1), 1, generator=gen)
            )
        else:
            tok = int(p.argmax())
        out.tokens.append(tok)
        out.prob.append(float(p[tok]))
        out.layers_run.append(int(lr))
        out.exit_layer.append(int(el))
        out.confidence.append([float(x) for x in cf])
        if len(out.tokens) == max_new_tokens:
            break
        logits, lr_t, el_t, cf_t = step(model, torch.tensor([tok]), cache, policy)
        lr, el, cf = int(lr_t[0]), int(el_t[0]), cf_t[0].tolist()
    out.text = decode(out.tokens, c.vocab)
    return out


@torch.no_grad()
def plain_generate(model: EarlyExitLM, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference greedy decoding: the whole context re-run at full depth for every token."""
    c = model.config
    ids = encode(prompt or "\n", c.vocab)[-(c.block_size - max_new_tokens) :]
    out = []
    for _ in range(max_new_tokens):
        tok = int(model.forward_config(torch.tensor([ids]))[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
    return out


@torch.no_grad()
def decode_teacher_forced(
    model: EarlyExitLM, idx: torch.Tensor, prefix: int, policy: ExitPolicy
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the true tokens idx [B, T] one position at a time under ``policy`` after a
    full-depth prefill of ``prefix`` tokens. Returns next-token logits for positions
    prefix-1 .. T-2 [B, T-prefix, V] and layers run per position [B, T-prefix] (the prefill's
    last position counts as full depth)."""
    b, t = idx.shape
    cache = KVCache.empty(model, b)
    first = prefill(model, idx[:, :prefix], cache, tuple(policy.static_skip))
    logits = [first]
    layers = [torch.full((b,), model.n_layer - len(set(policy.static_skip)), dtype=torch.long)]
    for pos in range(prefix, t - 1):
        lg, lr, _, _ = step(model, idx[:, pos], cache, policy)
        logits.append(lg)
        layers.append(lr)
    return torch.stack(logits, 1), torch.stack(layers, 1)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean cross-entropy) of logits [..., V] against targets [...]."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return float(math.exp(float(ce)))


def exit_names(config: dict | Config) -> list[str]:
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    return [f"layer {k + 1}" for k in range(cfg.n_layer)]


def build(config: dict) -> EarlyExitLM:
    return EarlyExitLM(Config.from_dict(config))
