"""What one generated token costs in time, per layer count, for the profiler's "layers" axis.

A decoder's compute per token is counted in layers, but on a CPU a layer is not the only cost:
the head that reads a state (576 x 49,152 in SmolLM2) costs about as much as three of its
layers, and CALM reads it at every layer it asks. So the profile times what a decoding really
runs, through the generator's own code, on a prompt's KV cache (``PROMPT_TOKENS`` positions,
cropped back after every run so each run decodes at the same context length):

- point d (1 .. L): one decode step of the next token that runs layers 1 .. d (the exit fixed
  after layer d, nothing asked), fills the K/V of the layers above by CALM's propagation and
  reads the token through the final norm and head (``walk(stop_after=d - 1)``);
- part "read": what asking a confidence (max-prob: final norm, head, softmax) costs at a layer:
  a full-depth step that asks at every layer and never stops, less one that asks nowhere;
- part "fill": what propagating one layer's K/V costs: an exit after layer 1 with
  "propagate", less layer 1 alone with every other layer skipped (no K/V written above, as a
  lazy fill or a skip set leaves them);
- part "token" (batch 1): the generator's own work per token besides the step (softmax, the
  token's records): ``analysis.generate`` of 1 + T tokens, less 1 token and T bare steps (on a
  short prompt, so that its prefill, in both, adds little noise to the difference).

Batch 1 decodes through ``model.walk`` as the page's generation does; batch B through
``batched.walk_batch``, every row at the same depth. ``costs.decode_ms`` adds the pieces up
for any rule; ``bench/lm_decode_time.py`` checks the sum against real generations.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core import costs
from engine.core.family import Part, Timed
from engine.families.hf_causal_lm.analysis import ExitRule, generate
from engine.families.hf_causal_lm.batched import BatchCache, walk_batch
from engine.families.hf_causal_lm.model import CausalLM, LayerCache, walk

PROMPT_TOKENS = 64  # the context each timed step decodes at
TOKENS = 8  # generated tokens of the "token" part's run


def prompt_ids(lm: CausalLM, n: int = PROMPT_TOKENS) -> list[int]:
    """A fixed prompt of ``n`` ordinary token ids (the time does not depend on which)."""
    vocab = int(lm.hf.config.vocab_size)
    return [int(i) for i in (np.arange(n) * 7919 + 1000) % vocab]


def decode_timed(lm: CausalLM, batch: int, prompt_tokens: int = PROMPT_TOKENS) -> Timed:
    """The profiler's work for ``lm`` at ``batch`` sequences (see the module docstring)."""
    n = lm.n_layer
    ids = prompt_ids(lm, prompt_tokens)
    tok = ids[-1]
    never = ExitRule("max_prob", 1.01)  # asks at every layer, never stops
    depth = lambda d: None if d == n else d - 1  # noqa: E731 - the exit of point d
    above_1 = frozenset(range(1, n))
    if batch == 1:
        cache = LayerCache(n)
        walk(lm, cache, ids)
        base = cache.length
        asks = never.stop(lm)

        def decode(d: int, **kw):
            cache.crop(base)
            return walk(lm, cache, [tok], stop_after=depth(d), **kw).logits

        short = ids[:4]

        def bare(t: int):
            generate(lm, short, 1, stop_at_eos=False)
            return [decode(n) for _ in range(t)]

        parts = {
            "read": Part(lambda: decode(n, stop=asks), lambda: decode(n), n - 1),
            "fill": Part(lambda: decode(1), lambda: decode(n, skip=above_1), n - 1),
            "token": Part(
                lambda: generate(lm, short, 1 + TOKENS, stop_at_eos=False),
                lambda: bare(TOKENS),
                TOKENS,
            ),
        }
    else:
        rows = torch.arange(batch)
        cache = BatchCache.empty(lm, [0] * batch, prompt_tokens + 1)
        walk_batch(lm, cache, rows, torch.tensor([ids] * batch))
        base = cache.length
        nxt = torch.full((batch, 1), tok, dtype=torch.long)

        def decode(d: int, **kw):
            cache.length = base
            return walk_batch(lm, cache, rows, nxt, stop_after=depth(d), **kw).logits

        parts = {
            "read": Part(lambda: decode(n, rule=never), lambda: decode(n), n - 1),
            "fill": Part(lambda: decode(1), lambda: decode(n, skip=above_1), n - 1),
        }
    return Timed(
        "layers",
        np.arange(1, n + 1, dtype=np.float64),
        lambda i: decode(i + 1),
        batch,
        parts=parts,
    )


# --- the language page's time axis: what the study's methods and a live run take -------------

READS = {"max_prob": True, "margin": True, "saturation": False, "gate": False}  # head per ask


def static_ms(profile, unit: str, layers) -> np.ndarray:
    """Per token time of a static plan running ``layers`` layers and writing no K/V for the
    others (a fixed exit with a lazy fill, or a skip set)."""
    return costs.decode_ms(profile, unit, layers, 0.0, 0.0)


def exits_ms(profile, unit: str, exit_layer, n_layer: int, measure: str, min_layer: int = 0):
    """Per token time of CALM exits ``exit_layer`` [N] under a lazy fill: the layers run, and a
    confidence read at each layer the rule asked (a head read for max-prob and margin)."""
    e = np.asarray(exit_layer)
    asked = costs.asked_reads(e, n_layer, min_layer, READS[measure])
    return costs.decode_ms(profile, unit, e + 1, asked, 0.0)


def study_curves_ms(study, profile, unit: str) -> np.ndarray:
    """[rows of ``study.curves``] mean ms per token of each curve point on this machine: static
    plans from their layers, CALM rows re-simulated on the records (their exits per token, so
    the reads they ask are counted per token). The study's exits are a lazy fill's (exact, see
    ``study.simulate_exits``); the catch-up rows a lazy fill later runs ride in layer calls
    that run anyway and are not counted."""
    from engine.families.hf_causal_lm.study import exit_layers

    n = study.n_layer
    out = np.empty(study.curves.height)
    for i, row in enumerate(study.curves.iter_rows(named=True)):
        method = row["method"]
        if method.startswith("calm_"):
            m = method.removeprefix("calm_")
            e = exit_layers(study.records, m, float(row["setting"]))
            out[i] = exits_ms(profile, unit, e, n, m).mean()
        else:
            out[i] = static_ms(profile, unit, row["layers"])
    return out


def live_ms(res, profile, unit: str) -> float:
    """Mean ms per generated token that the profile predicts for a live run (``live.run``'s
    result), the first token (the prompt's prefill) left out, as its measured time leaves it;
    NaN for self-speculation (its cost is rounds of verification, not a depth per token)."""
    s, n = res.setting, res.n_layer
    e = np.asarray(res.exit_layer[1:])
    if s.mode == "speculate" or not len(e):
        return float("nan")
    if s.mode == "skip":
        return float(static_ms(profile, unit, np.full(len(e), n - len(s.skip))).mean())
    asked = costs.asked_reads(e, n, s.min_layer, READS.get(s.measure, True))
    filled = n - 1 - e if s.fill == "propagate" else 0.0
    return float(costs.decode_ms(profile, unit, e + 1, asked, filled).mean())


def measured_ms(res) -> float:
    """The live run's own wall-clock per generated token after the first (the prompt's prefill
    and the token it gives left out, as ``live_ms`` leaves them); NaN when not measured."""
    if len(res.tokens) < 2 or res.prefill_seconds <= 0:
        return float("nan")
    return 1e3 * (res.seconds - res.prefill_seconds) / (len(res.tokens) - 1)
