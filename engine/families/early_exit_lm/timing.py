"""What one generated character costs in time, per layer count, for the profiler's "layers" axis.

The same measurement as SmolLM2's (``engine.families.hf_causal_lm.timing``), through this
model's own decoder (``model.step``) on a prompt's KV cache of ``PROMPT_CHARS`` positions:

- point d (1 .. L): one decode step that runs layers 1 .. d and nothing above (a static plan
  skipping layers d+1 .. L, no confidence asked); the K/V of the layers above are written from
  the state, as this generator always does (CALM's propagation), and the character is read
  through the shared head once. It has no lazy fill, so no "fill" part;
- part "read": what asking a confidence costs at a layer, bookkeeping included: a full-depth
  step that asks at every layer (top-2 margin against a threshold of 1, which a float32
  softmax does not reach) less one that asks nowhere;
- part "token" (batch 1): the generator's own work per character besides the step (softmax,
  sampling, the records): ``model.generate`` of 1 + T characters, less 1 and T bare steps (on
  a short prompt, so that its prefill, in both, adds little noise to the difference).

In this model's batched decoder a layer runs while any row of the batch still needs it, so a
batch's step costs what its deepest row costs (``costs.decode_ms`` is per row at one depth).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core.family import Part, Timed
from engine.families.early_exit_lm.model import (
    EarlyExitLM,
    ExitPolicy,
    KVCache,
    generate,
    prefill,
    step,
)
from engine.families.early_exit_lm.model import decode as decode_text

PROMPT_CHARS = 64
TOKENS = 16  # generated characters of the "token" part's run


def decode_timed(model: EarlyExitLM, batch: int, prompt_chars: int = PROMPT_CHARS) -> Timed:
    """The profiler's work for ``model`` at ``batch`` sequences (see the module docstring)."""
    n = model.n_layer
    vocab = model.config.vocab_size
    ids = torch.tensor([[(7 * i + 11) % vocab for i in range(prompt_chars)]] * batch)
    cache = KVCache.empty(model, batch)
    prefill(model, ids, cache)
    base = cache.length
    tok = ids[:, -1]
    plans = [ExitPolicy(measure=None, static_skip=tuple(range(d, n))) for d in range(1, n + 1)]
    never = ExitPolicy(measure="margin", threshold=1.0)  # asks at every layer, never stops

    def decode(plan: ExitPolicy):
        cache.length = base
        logits, layers_run, _, _ = step(model, tok, cache, plan)
        if plan is never and int(layers_run.min()) < n:
            raise RuntimeError("the never-stopping timing plan stopped")
        return logits

    parts = {"read": Part(lambda: decode(never), lambda: decode(plans[-1]), n - 1)}
    if batch == 1:  # the generator decodes one sequence
        text = decode_text(ids[0, :4].tolist(), model.config.vocab)

        def bare(t: int):
            generate(model, text, 1)
            return [decode(plans[-1]) for _ in range(t)]

        parts["token"] = Part(
            lambda: generate(model, text, 1 + TOKENS), lambda: bare(TOKENS), TOKENS
        )
    return Timed(
        "layers", np.arange(1, n + 1, dtype=np.float64), lambda i: decode(plans[i]), batch, parts
    )
