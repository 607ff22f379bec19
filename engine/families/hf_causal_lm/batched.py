"""A batch of prompts through the layer walk: left padding, per-row early exit, static skips.

The reference implementations of CALM, LayerSkip and EE-LLM decode one sequence at a time. Here
B prompts are left-padded to one length and share one time axis (``BatchCache``), so every row
feeds its next token at the same position; each row has its own rotary positions (counted from
its first real token) and a key mask that hides its padding.

Per-row early exit is where batching and adaptive depth pull apart: a layer is a batched call,
so without care it runs while *any* row still needs it and an exited row saves nothing. With
``compact=True`` (the default) each layer runs on the rows still active only (gathered into a
smaller batch), so an exited row really skips the layers above its exit; its K/V there are
CALM's propagation from its exit state (``model.project_kv``). ``compact=False`` keeps every row
in every layer the batch still runs, its state frozen at its exit (the layer then writes exactly
the propagated K/V): the same tokens, no saving - the benchmark's "what batching does" row.

Per row, the results equal ``analysis.generate`` on that prompt alone (the tests check it token
for token); padding changes only float rounding (a batched matmul, masked keys in the softmax).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.families.hf_causal_lm.analysis import ExitRule, Generation, _check_prompt
from engine.families.hf_causal_lm.model import CausalLM, eos_ids, project_kv

PAD_ID = 0  # what padding positions feed; masked out, so any id does


@dataclass
class BatchCache:
    """K/V per layer [B, kv_heads, T_max, head_dim] on a time axis shared by all rows; row b's
    first ``pad[b]`` positions are padding (``valid`` False). The attention modules call
    ``update`` with the K/V of the rows in ``rows`` (the layer call in progress)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pad: torch.Tensor  # [B] left padding per row
    valid: torch.Tensor  # [B, T_max] False at padding
    length: int = 0  # positions fed so far (padding included)
    rows: torch.Tensor | slice = field(default_factory=lambda: slice(None))

    @classmethod
    def empty(cls, lm: CausalLM, pad: Sequence[int], t_max: int) -> BatchCache:
        attn = lm.layers[0].self_attn
        kvh = lm.hf.config.num_key_value_heads
        shape = (len(pad), kvh, t_max, attn.head_dim)
        pad_t = torch.as_tensor(list(pad), dtype=torch.long)
        valid = torch.arange(t_max)[None, :] >= pad_t[:, None]
        k = [torch.zeros(shape) for _ in range(lm.n_layer)]
        v = [torch.zeros(shape) for _ in range(lm.n_layer)]
        return cls(k, v, pad_t, valid)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *_, **__):
        """Write this call's K/V [b, kvh, n, hd] at the current positions; return all of it."""
        t0, end = self.length, self.length + k.shape[2]
        self.k[layer_idx][self.rows, :, t0:end] = k
        self.v[layer_idx][self.rows, :, t0:end] = v
        return self.k[layer_idx][self.rows, :, :end], self.v[layer_idx][self.rows, :, :end]


def _as_index(rows: torch.Tensor) -> torch.Tensor | slice:
    """A contiguous run of rows as a slice (a view of the cache, no copy)."""
    r = rows.tolist()
    if r == list(range(r[0], r[0] + len(r))):
        return slice(r[0], r[0] + len(r))
    return rows


@dataclass
class BatchStep:
    """One ``walk_batch`` call: per row, its newest position's outcome."""

    logits: torch.Tensor  # [b, V] next-token logits at each row's exit
    exit_layer: list[int]  # last layer each row ran (n_layer - 1: full depth)
    confidence: list[float]  # the rule's score at the exit (NaN: full depth)
    layers_run: list[int]  # layers each row needed (skips left out)
    layer_rows: list[int]  # per layer: positions it computed in this call, padding included


def _scores(lm: CausalLM, rule: ExitRule, j: int, h: torch.Tensor, h_prev: torch.Tensor):
    """The rule's confidence for rows h [b, D] after layer j, and their logits when the measure
    computed them. One head call for all rows (the head costs several layers); a rule with a
    lens of its own is asked row by row through ``rule.stop``."""
    if getattr(rule, "lens", None) not in (None, "logit"):
        decide = rule.stop(lm)
        s = [decide(j, h[i], h_prev[i])[1] for i in range(h.shape[0])]
        return torch.tensor(s, dtype=torch.float32), None
    if rule.measure == "saturation":
        return torch.nn.functional.cosine_similarity(h, h_prev, dim=-1), None
    logits = lm.logits(h)
    p = torch.softmax(logits, dim=-1)
    if rule.measure == "max_prob":
        return p.max(-1).values, logits
    top2 = p.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1], logits


@torch.no_grad()
def walk_batch(
    lm: CausalLM,
    cache: BatchCache,
    rows: torch.Tensor,
    ids: torch.Tensor,
    *,
    skip=frozenset(),
    rule: ExitRule | None = None,
    compact: bool = True,
    stop_after: int | None = None,
) -> BatchStep:
    """Feed ``ids`` [b, n] (new positions of cache rows ``rows``) through the decoder.

    With ``rule``, each row's newest position stops after the first layer >= ``rule.min_layer``
    whose confidence reaches the threshold; ``compact`` decides whether the layers above run on
    the remaining rows only (see the module docstring). Layers in ``skip`` never run.
    ``stop_after``: every row exits after that layer, no confidence asked (the profiler's fixed
    depth).
    """
    base = lm.hf.model
    n_layer = lm.n_layer
    b, n = ids.shape
    t0, end = cache.length, cache.length + ids.shape[1]
    q = torch.arange(t0, end)
    pos = (q[None, :] - cache.pad[rows][:, None]).clamp(min=0)
    keys = torch.arange(end)
    # causal, padding hidden: [b, 1, n, end]. A padding query sees itself, so no softmax row is
    # empty (torch 2.13's CPU kernel gives zeros there, other kernels NaN, which would spread)
    mask = (cache.valid[rows, :end][:, None, :] & (keys[None, :] <= q[:, None])[None]) | (
        keys[None, :] == q[:, None]
    )[None]
    mask = mask[:, None]
    h = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(h, position_ids=pos)
    exit_layer = [n_layer - 1] * b
    conf = [math.nan] * b
    logits: list[torch.Tensor | None] = [None] * b
    layer_rows = [0] * n_layer
    active = torch.arange(b)  # rows of this call still running
    last_run = -1
    for j, layer in enumerate(lm.layers):
        if j in skip:
            continue
        sel = _as_index(active) if compact else slice(None)
        cache.rows = _as_index(rows[sel])
        h_in = h[sel]
        h_out = layer(
            h_in,
            attention_mask=mask[sel],
            position_ids=pos[sel],
            past_key_values=cache,
            position_embeddings=(cos[sel], sin[sel]),
        )
        layer_rows[j] = h_in.shape[0] * n
        last_run = j
        scored = rule is not None and rule.min_layer <= j < n_layer - 1
        if scored:  # the newest position of the rows still active, after and before layer j
            now, before = (h_out, h_in) if compact else (h_out[active], h_in[active])
            s, lg = _scores(lm, rule, j, now[:, -1], before[:, -1])
        if compact:
            h = h_out if h_in.shape[0] == b else h.index_copy(0, active, h_out)
        else:  # exited rows keep their exit state (the layer wrote their propagated K/V)
            keep = torch.zeros(b, dtype=torch.bool)
            keep[active] = True
            h = torch.where(keep[:, None, None], h_out, h)
        if stop_after is not None and stop_after <= j < n_layer - 1:
            for r in active.tolist():
                exit_layer[r] = j
            break
        if not scored:
            continue
        hit = s >= rule.threshold
        for i in torch.nonzero(hit).flatten().tolist():
            r = int(active[i])
            exit_layer[r], conf[r] = j, float(s[i])
            if lg is not None:
                logits[r] = lg[i]
            elif getattr(rule, "lens", None) is not None:  # the token from the lens that exited
                logits[r] = rule.lens.logits(lm, now[i, -1], j)
        active = active[~hit]
        if active.numel() == 0:
            break
    cache.rows = slice(None)
    # CALM: K/V of the layers a row did not run, from its exit state
    ran_all = -1 if compact else last_run
    for j in range(n_layer):
        if j in skip:
            continue
        need = [r for r in range(b) if exit_layer[r] < j and j > ran_all]
        if not need:
            continue
        idx = torch.tensor(need)
        k, v = project_kv(lm.layers[j], h[idx], (cos[idx], sin[idx]))
        cache.k[j][rows[idx], :, t0:end] = k
        cache.v[j][rows[idx], :, t0:end] = v
    cache.length = end
    todo = [r for r in range(b) if logits[r] is None]
    if todo:
        for r, lg in zip(todo, lm.logits(h[todo, -1]), strict=True):
            logits[r] = lg
    depth = [sum(1 for j in range(e + 1) if j not in skip) for e in exit_layer]
    return BatchStep(torch.stack(logits), exit_layer, conf, depth, layer_rows)


@dataclass
class BatchGeneration:
    """Greedy generations of a batch: per row a ``Generation`` (its ``layer_rows``: the layers
    its token needed; ``seconds``: the whole batch's), and what the batch physically computed."""

    generations: list[Generation]
    seconds: float = 0.0
    layer_rows: list[int] = field(default_factory=list)  # per layer: positions computed
    padding: int = 0  # padding positions in the prefill

    @property
    def n_tokens(self) -> int:
        return sum(len(g.tokens) for g in self.generations)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else math.nan


def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    width = max(len(s) for s in seqs)
    pads = [width - len(s) for s in seqs]
    ids = torch.tensor([[PAD_ID] * p + s for p, s in zip(pads, seqs, strict=True)])
    return ids, pads


def _check_batch(lm, prompts, max_new_tokens) -> list[list[int]]:
    ps = [_check_prompt(lm, p, max_new_tokens) for p in prompts]
    if not ps:
        raise ValueError("no prompts")
    return ps


@torch.no_grad()
def generate_batch(
    lm: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    rule: ExitRule | None = None,
    skip: Sequence[int] = (),
    stop_at_eos: bool = True,
    compact: bool = True,
) -> BatchGeneration:
    """``analysis.generate`` for a batch (fill "propagate"): greedy with a KV cache, each row's
    token stopping at its own first confident layer; ``skip``: layers never run. A row that
    reaches EOS or ``max_new_tokens`` leaves the batch; the others go on."""
    ps = _check_batch(lm, prompts, max_new_tokens)
    n = lm.n_layer
    skip = frozenset(int(j) for j in skip)
    eos = eos_ids(lm) if stop_at_eos else set()
    t = time.perf_counter()
    ids, pads = _left_pad(ps)
    cache = BatchCache.empty(lm, pads, ids.shape[1] + max_new_tokens)
    out = BatchGeneration([Generation(p) for p in ps], layer_rows=[0] * n, padding=sum(pads))
    rows = torch.arange(len(ps))
    st = walk_batch(lm, cache, rows, ids, skip=skip)
    first = True
    while True:
        out.layer_rows = [a + c for a, c in zip(out.layer_rows, st.layer_rows, strict=True)]
        p = torch.softmax(st.logits, -1)
        toks = p.argmax(-1).tolist()
        live = []
        for i, r in enumerate(rows.tolist()):
            g, tok = out.generations[r], toks[i]
            g.tokens.append(tok)
            g.exit_layer.append(st.exit_layer[i])
            g.confidence.append(st.confidence[i])
            g.prob.append(float(p[i, tok]))
            g.layer_rows.append(st.layers_run[i])
            if first:
                g.prefill_rows = len(g.prompt) * st.layers_run[i]
            if len(g.tokens) < max_new_tokens and tok not in eos:
                live.append(i)
        first = False
        if not live:
            break
        nxt = torch.tensor([[toks[i]] for i in live])
        rows = rows[live]
        st = walk_batch(lm, cache, rows, nxt, skip=skip, rule=rule, compact=compact)
    out.seconds = time.perf_counter() - t
    for g in out.generations:
        g.seconds = out.seconds
    return out


@torch.no_grad()
def generate_batch_nocache(
    lm: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, stop_at_eos=True
) -> BatchGeneration:
    """The baseline a KV cache is measured against: greedy decoding that re-runs every
    sequence in full through the model's own ``forward`` for each new token."""
    ps = _check_batch(lm, prompts, max_new_tokens)
    n = lm.n_layer
    eos = eos_ids(lm) if stop_at_eos else set()
    t = time.perf_counter()
    out = BatchGeneration([Generation(p) for p in ps], layer_rows=[0] * n)
    live = list(range(len(ps)))
    while live:
        seqs = [ps[r] + out.generations[r].tokens for r in live]
        ids, pads = _left_pad(seqs)
        am = (torch.arange(ids.shape[1])[None, :] >= torch.tensor(pads)[:, None]).long()
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        lg = lm.hf(
            input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False, logits_to_keep=1
        ).logits[:, -1]
        out.layer_rows = [c + ids.numel() for c in out.layer_rows]
        p = torch.softmax(lg, -1)
        still = []
        for i, r in enumerate(live):
            g, tok = out.generations[r], int(p[i].argmax())
            g.tokens.append(tok)
            g.exit_layer.append(n - 1)
            g.confidence.append(math.nan)
            g.prob.append(float(p[i, tok]))
            g.layer_rows.append(n)
            if len(g.tokens) < max_new_tokens and tok not in eos:
                still.append(r)
        live = still
    out.seconds = time.perf_counter() - t
    for g in out.generations:
        g.seconds = out.seconds
    return out
