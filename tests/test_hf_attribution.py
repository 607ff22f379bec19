"""Captum attributions of a generated token's logit read at an exit layer and at the last layer
(engine.families.hf_causal_lm.attribution), on the tiny random Llama of test_hf_causal_lm."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from engine.families.hf_causal_lm import model as M  # noqa: E402
from engine.families.hf_causal_lm.attribution import attribute  # noqa: E402
from tests.test_hf_causal_lm import N_LAYER, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return M.load(d)


CONTEXT = [5, 17, 99, 3, 42, 7, 8, 120, 64]
PROMPT = range(6)  # the first six positions are "the prompt"; the rest keep their tokens
TOKEN = 11


def test_attributions_add_up_to_the_logit_change_from_the_baseline(lm):
    for layer in (1, N_LAYER - 1):
        a = attribute(lm, CONTEXT, TOKEN, layer, PROMPT, n_steps=24)
        assert a.scores.shape == (len(PROMPT),)
        change = a.logit - a.baseline_logit
        assert abs(change) > 1e-3  # something to explain
        assert a.scores.sum() == pytest.approx(change, abs=1e-4 + 1e-3 * abs(change))
        assert abs(a.delta) < 1e-3 * max(1.0, abs(change))


def test_the_logit_is_the_logit_lens_after_that_layer(lm):
    """The plain forward for attribution reads what the KV walk reads after the same layer."""
    for layer in (0, 2, N_LAYER - 1):
        a = attribute(lm, CONTEXT, TOKEN, layer, PROMPT, n_steps=4)
        w = M.walk(lm, M.LayerCache(N_LAYER), CONTEXT, stop_after=layer)
        assert a.logit == pytest.approx(float(w.logits[-1, TOKEN]), abs=1e-5)
    full = float(lm.hf(torch.tensor([CONTEXT])).logits[0, -1, TOKEN])
    assert attribute(lm, CONTEXT, TOKEN, N_LAYER - 1, PROMPT, n_steps=4).logit == pytest.approx(
        full, abs=1e-5
    )


def test_an_exit_layer_and_the_last_layer_credit_the_prompt_differently(lm):
    low = attribute(lm, CONTEXT, TOKEN, 1, PROMPT)
    last = attribute(lm, CONTEXT, TOKEN, N_LAYER - 1, PROMPT)
    assert low.layer == 1 and last.layer == N_LAYER - 1
    assert not np.allclose(low.scores, last.scores, atol=1e-3)
    cos = low.scores @ last.scores / np.linalg.norm(low.scores) / np.linalg.norm(last.scores)
    assert cos < 0.95


def test_positions_outside_the_prompt_get_no_credit_and_the_model_is_left_alone(lm):
    hooks = lambda: sum(  # noqa: E731
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.hf.modules()
    )
    before = hooks()
    a = attribute(lm, CONTEXT, TOKEN, 2, range(len(CONTEXT)))
    b = attribute(lm, CONTEXT, TOKEN, 2, PROMPT)
    assert hooks() == before  # Captum hooked a wrapper, never the shared model
    assert not any(p.requires_grad for p in lm.parameters())
    assert a.scores.shape == (len(CONTEXT),) and b.scores.shape == (len(PROMPT),)
    with pytest.raises(ValueError, match="layers are 0"):
        attribute(lm, CONTEXT, TOKEN, N_LAYER, PROMPT)
