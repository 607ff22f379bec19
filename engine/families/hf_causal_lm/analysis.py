"""What a pretrained decoder does when it is cut short: logit lens, per-token early exit (CALM),
layer skipping and self-speculative decoding (LayerSkip), on any model ``model.walk`` can walk.

All functions are pure (a model, token ids and settings in; a dataclass out) and greedy: the
quality of a cheaper decoding is its agreement with the full model, token for token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.families.hf_causal_lm.model import CausalLM, Fill, LayerCache, eos_ids, walk

MEASURES = ("max_prob", "margin", "saturation")


# --- confidence measures (CALM) ---------------------------------------------------------------


def read_out(lm: CausalLM, h: torch.Tensor, layer: int, lens=None) -> torch.Tensor:
    """Layer ``layer``'s state h [..., D] -> logits [..., V]: the logit lens, or ``lens`` (any
    object with ``.logits(lm, h, layer)``, e.g. ``tuned_lens.TunedLens``)."""
    return lm.logits(h) if lens is None else lens.logits(lm, h, layer)


def confidence(
    lm: CausalLM,
    h: torch.Tensor,
    h_prev: torch.Tensor,
    measure: str,
    lens=None,
    layer: int | None = None,
) -> float:
    """How sure the state h [D] after ``layer`` is of its next token: softmax max-prob or top-2
    margin of its distribution through ``lens`` (default: the logit lens), or saturation
    (cosine of h and the state before the layer; no lens)."""
    if measure == "saturation":
        return float(F.cosine_similarity(h, h_prev, dim=-1))
    if lens is not None and layer is None:
        raise ValueError("a tuned lens reads one layer's state: pass its layer")
    p = torch.softmax(read_out(lm, h, layer, lens), dim=-1)
    if measure == "max_prob":
        return float(p.max())
    if measure == "margin":
        top2 = p.topk(2).values
        return float(top2[0] - top2[1])
    raise ValueError(f"unknown confidence measure {measure!r}; one of {MEASURES}")


@dataclass(frozen=True)
class ExitRule:
    """Stop a token after the first layer >= ``min_layer`` whose confidence >= threshold; a
    threshold above 1 never fires (every measure is at most 1): full depth. ``lens``: read the
    confidence (and the exiting token) through it instead of the logit lens."""

    measure: str = "max_prob"
    threshold: float = 0.9
    min_layer: int = 0
    lens: object | None = None

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r}; one of {MEASURES}")

    def stop(self, lm: CausalLM):
        def decide(j: int, h: torch.Tensor, h_prev: torch.Tensor):
            if j < self.min_layer:
                return False, math.nan
            c = confidence(lm, h, h_prev, self.measure, self.lens, j)
            return c >= self.threshold, c

        return decide


# --- teacher-forced evaluation: logit lens and static plans ----------------------------------


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T-1] negative log-likelihood of ids[1:] under logits[:-1]."""
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


@dataclass
class Lens:
    """The logit lens over one text: each layer's state read through the final norm + head."""

    agreement: np.ndarray  # [L] top-1 equal to the full model's, over the T positions
    kl: np.ndarray  # [L] mean KL(full || layer) in nats
    nll: np.ndarray  # [L] mean NLL of the text's next tokens
    top1: np.ndarray  # [L, T] each layer's top-1 token per position
    max_prob: np.ndarray  # [L, T] its probability

    @property
    def perplexity(self) -> np.ndarray:
        return np.exp(self.nll)


@torch.no_grad()
def logit_lens(lm: CausalLM, ids: Sequence[int], lens=None) -> Lens:
    """Run the text once at full depth and read every layer (one layer's logits at a time),
    through the logit lens or ``lens`` (a tuned lens)."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    if ids_t.numel() < 2:
        raise ValueError("the logit lens needs a text of at least two tokens")
    w = walk(lm, LayerCache(lm.n_layer), ids_t, keep_states=True)
    final = torch.log_softmax(w.logits, -1)
    ref = final.argmax(-1)
    agree, kl, nll, top1, pmax = [], [], [], [], []
    for j, h in enumerate(w.states):
        logp = torch.log_softmax(read_out(lm, h, j, lens), -1)
        t1 = logp.argmax(-1)
        agree.append(float((t1 == ref).float().mean()))
        kl.append(float((final.exp() * (final - logp)).sum(-1).mean()))
        nll.append(float(_nll(logp, ids_t).mean()))
        top1.append(t1.numpy())
        pmax.append(logp.max(-1).values.exp().numpy())
    return Lens(np.array(agree), np.array(kl), np.array(nll), np.stack(top1), np.stack(pmax))


@dataclass(frozen=True)
class PlanQuality:
    """A static plan (layers skipped for every token, or an exit layer) on one text."""

    skip: tuple[int, ...]
    exit_layer: int  # last layer run (n_layer - 1: full depth)
    layers_run: int
    agreement: float  # next-token top-1 equal to the full model's
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def evaluate_plan(
    lm: CausalLM,
    ids: Sequence[int],
    skip: Sequence[int] = (),
    exit_layer: int | None = None,
    reference: torch.Tensor | None = None,
) -> PlanQuality:
    """Teacher-forced quality of a static plan; ``reference``: the full model's top-1 [T]
    (computed when not given)."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    n = lm.n_layer
    skip = tuple(sorted(set(int(j) for j in skip)))
    if any(not 0 <= j < n for j in skip):
        raise ValueError(f"layers are 0 .. {n - 1}")
    if reference is None:
        reference = walk(lm, LayerCache(n), ids_t).logits.argmax(-1)
    last = n - 1 if exit_layer is None else int(exit_layer)
    w = walk(lm, LayerCache(n), ids_t, skip=frozenset(skip), stop_after=exit_layer, fill="lazy")
    run = sum(1 for j in range(last + 1) if j not in skip)
    agree = float((w.logits.argmax(-1) == reference).float().mean())
    return PlanQuality(skip, last, run, agree, float(_nll(w.logits, ids_t).mean()))


def middle_block(n_layer: int, n_skip: int) -> tuple[int, ...]:
    """A contiguous block of n_skip layers centred in the stack (first and last kept)."""
    if not 0 <= n_skip <= n_layer - 2:
        raise ValueError(f"skip 0 .. {n_layer - 2} of {n_layer} layers")
    lo = (n_layer - n_skip) // 2
    return tuple(range(lo, lo + n_skip))


def evenly_spaced(n_layer: int, n_skip: int) -> tuple[int, ...]:
    """n_skip layers spread evenly over layers 1 .. n_layer - 2 (first and last kept)."""
    if not 0 <= n_skip <= n_layer - 2:
        raise ValueError(f"skip 0 .. {n_layer - 2} of {n_layer} layers")
    if n_skip == 0:
        return ()
    inner = np.arange(1, n_layer - 1)
    picks = np.round(np.linspace(0, len(inner) - 1, n_skip + 2)[1:-1]).astype(int)
    if len(set(picks)) < n_skip:  # too dense to space: take a block of the inner layers
        picks = np.arange(n_skip)
    return tuple(int(inner[i]) for i in picks)


@torch.no_grad()
def greedy_skip_order(lm: CausalLM, ids: Sequence[int], n_skip: int) -> list[PlanQuality]:
    """Grow a skip set one layer at a time, each time adding the layer whose removal hurts the
    text's NLL least. Returns the plan after each addition (the order is the layers' harm)."""
    n = lm.n_layer
    if not 0 <= n_skip <= n - 1:
        raise ValueError(f"skip 0 .. {n - 1} of {n} layers")
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    ref = walk(lm, LayerCache(n), ids_t).logits.argmax(-1)
    chosen: list[int] = []
    out = []
    for _ in range(n_skip):
        trials = [
            evaluate_plan(lm, ids_t, (*chosen, j), reference=ref)
            for j in range(n)
            if j not in chosen
        ]
        best = min(trials, key=lambda q: q.nll)
        chosen = list(best.skip)
        out.append(best)
    return out


# --- generation: greedy, per-token early exit, static skipping -------------------------------


@dataclass
class Generation:
    """A greedy generation; per generated token, what the step that chose it spent."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    exit_layer: list[int] = field(default_factory=list)  # layer whose state chose it
    confidence: list[float] = field(default_factory=list)  # the rule's score there (NaN: none)
    prob: list[float] = field(default_factory=list)  # probability of the token at its exit
    layer_rows: list[int] = field(default_factory=list)  # layer computations of that step
    prefill_rows: int = 0  # layer computations of the prompt (the first token's step)
    seconds: float = 0.0  # wall-clock, the prompt's prefill included
    prefill_seconds: float = 0.0  # of which the prompt's prefill (and the first token)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else math.nan

    @property
    def mean_layers(self) -> float:
        return float(np.mean(self.layer_rows)) if self.layer_rows else math.nan


def _check_prompt(lm: CausalLM, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    limit = getattr(lm.hf.config, "max_position_embeddings", None)
    if limit and len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt + generation exceed the model's {limit} positions")
    return ids


@torch.no_grad()
def generate(
    lm: CausalLM,
    prompt: Sequence[int],
    max_new_tokens: int = 32,
    rule: ExitRule | None = None,
    skip: Sequence[int] = (),
    fill: Fill = "propagate",
    stop_at_eos: bool = True,
) -> Generation:
    """Greedy decoding with a KV cache; with ``rule``, each token stops at its first confident
    layer (CALM) and the layers above it are not run (their K/V filled per ``fill``); ``skip``:
    layers never run. The first token comes from the prompt's full-depth prefill."""
    ids = _check_prompt(lm, prompt, max_new_tokens)
    n = lm.n_layer
    skip = frozenset(int(j) for j in skip)
    stop = rule.stop(lm) if rule is not None else None
    eos = eos_ids(lm) if stop_at_eos else set()
    out = Generation(ids)
    t = time.perf_counter()
    cache = LayerCache(n)
    w = walk(lm, cache, ids, skip=skip)
    out.prefill_seconds = time.perf_counter() - t
    while True:
        logits = w.logits[-1]
        if rule is not None and rule.lens is not None and w.exit_layer < n - 1:
            logits = rule.lens.logits(lm, w.hidden[-1], w.exit_layer)  # the lens that exited
        p = torch.softmax(logits, -1)
        tok = int(p.argmax())
        out.tokens.append(tok)
        out.exit_layer.append(w.exit_layer)
        out.confidence.append(w.confidence[w.exit_layer] if w.exit_layer < n - 1 else math.nan)
        out.prob.append(float(p[tok]))
        if len(out.tokens) == 1:  # from the prefill: count its last position only
            out.prefill_rows = sum(w.rows)
            out.layer_rows.append(sum(w.ran))
        else:
            out.layer_rows.append(sum(w.rows))  # lazy catch-up of earlier positions included
        if len(out.tokens) == max_new_tokens or tok in eos:
            break
        w = walk(lm, cache, [tok], skip=skip, stop=stop, fill=fill)
    out.seconds = time.perf_counter() - t
    return out


def greedy(lm: CausalLM, prompt: Sequence[int], max_new_tokens: int = 32, **kw) -> list[int]:
    """Plain greedy decoding at full depth (the reference every cheaper decoding is held to)."""
    return generate(lm, prompt, max_new_tokens, **kw).tokens


@dataclass(frozen=True)
class GenerationQuality:
    """A cheaper generation judged against the full model's own greedy one."""

    agreement: float  # positions where it has the full model's greedy token
    prefix_match: int  # leading tokens equal to the full model's greedy generation
    next_token_agreement: float  # tokens equal to the full model's top-1 on the *same* prefix;
    # flattered by degenerate text (an exit at layer 0 repeats its input, and so would the model)
    perplexity: float  # of the generated tokens, under the full model (same caveat)


@torch.no_grad()
def generation_quality(
    lm: CausalLM, prompt: Sequence[int], tokens: Sequence[int], reference: Sequence[int]
) -> GenerationQuality:
    """Judge a generation by the full model's greedy ``reference`` and by one teacher-forced
    full-depth pass over prompt + tokens."""
    if not tokens or not reference:
        raise ValueError("nothing to compare")
    ids = torch.as_tensor([*prompt, *tokens], dtype=torch.long)
    logits = walk(lm, LayerCache(lm.n_layer), ids).logits[len(prompt) - 1 : -1]
    toks = torch.as_tensor(list(tokens), dtype=torch.long)
    same = [a == b for a, b in zip(tokens, reference, strict=False)]
    agree = sum(same) / max(len(tokens), len(reference))
    prefix = same.index(False) if False in same else len(same)
    next_agree = float((logits.argmax(-1) == toks).float().mean())
    ppl = math.exp(float(F.cross_entropy(logits, toks)))
    return GenerationQuality(agree, prefix, next_agree, ppl)


# --- self-speculative decoding (LayerSkip) ----------------------------------------------------


@dataclass
class Speculation:
    tokens: list[int]
    drafted: int  # draft tokens proposed
    accepted: int  # of them, accepted by the full model
    rounds: int  # verification passes
    seconds: float

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else math.nan


def accepted_prefix(drafts: Sequence[int], full: Sequence[int]) -> int:
    """How many leading drafts equal the full model's choices at their positions."""
    a = 0
    for d, f in zip(drafts, full, strict=False):
        if d != f:
            break
        a += 1
    return a


@torch.no_grad()
def self_speculate(
    lm: CausalLM,
    prompt: Sequence[int],
    max_new_tokens: int = 32,
    draft_len: int = 4,
    exit_layer: int | None = None,
    draft_skip: Sequence[int] = (),
    stop_at_eos: bool = True,
) -> Speculation:
    """Draft ``draft_len`` tokens with the model's own first layers (exit after ``exit_layer``)
    or with ``draft_skip`` layers left out, then verify them with the full model in one pass.

    Early-exit drafts park their states, so the verification runs only the layers above the
    exit, for all drafts at once (their lower-layer K/V are the full model's already); skip-set
    drafts are cropped and re-run at full depth. The longest agreeing prefix plus the full
    model's next token are kept and the cache is cropped there: the output is plain greedy
    decoding, token for token.
    """
    ids = _check_prompt(lm, prompt, max_new_tokens)
    n = lm.n_layer
    if draft_len < 1:
        raise ValueError("draft_len must be at least 1")
    skip = frozenset(int(j) for j in draft_skip)
    if (exit_layer is None) == (not skip):
        raise ValueError("draft with either an exit layer or a set of skipped layers")
    if exit_layer is not None and not 0 <= exit_layer < n - 1:
        raise ValueError(f"the draft's exit layer must be 0 .. {n - 2}")
    eos = eos_ids(lm) if stop_at_eos else set()
    t = time.perf_counter()
    cache = LayerCache(n)
    nxt = int(walk(lm, cache, ids).logits[-1].argmax())
    out = [nxt]
    drafted = accepted = rounds = 0
    while len(out) < max_new_tokens and nxt not in eos:
        base = cache.length  # position of nxt, not yet fed
        d = min(draft_len, max_new_tokens - len(out) - 1)
        drafts, cur = [], nxt
        for _ in range(d):
            if skip:
                w = walk(lm, cache, [cur], skip=skip)
            else:
                w = walk(lm, cache, [cur], stop_after=exit_layer, fill="lazy")
            cur = int(w.logits[-1].argmax())
            drafts.append(cur)
        if skip:
            cache.crop(base)
            v = walk(lm, cache, [nxt, *drafts])
        else:
            v = walk(lm, cache, [cur] if d else [nxt])
        assert v.first == base, (v.first, base)
        full = v.logits.argmax(-1).tolist()  # full[i]: the token after position base + i
        a = accepted_prefix(drafts, full)
        cache.crop(base + a + 1)
        nxt = full[a]
        new = [*drafts[:a], nxt]
        drafted, accepted, rounds = drafted + d, accepted + a, rounds + 1
        for tok in new:
            out.append(tok)
            if tok in eos:
                nxt = tok
                break
    return Speculation(out[:max_new_tokens], drafted, accepted, rounds, time.perf_counter() - t)
