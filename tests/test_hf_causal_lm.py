"""A pretrained HF causal LM walked layer by layer: exits, skips and self-speculation.

Fast tests use a tiny random-initialised Llama saved with ``save_pretrained`` (no download);
the slow one loads the real SmolLM2-135M from its data package.
"""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from engine.families.hf_causal_lm import analysis as A  # noqa: E402
from engine.families.hf_causal_lm import model as M  # noqa: E402

torch.set_num_threads(1)
N_LAYER = 4
VOCAB = 256


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=N_LAYER,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return M.load(tiny_dir)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 10))] for _ in range(n)]


class MLPRows:
    """Forward hooks on every decoder layer's MLP: how many positions each one computed."""

    def __init__(self, lm):
        self.rows = [0] * lm.n_layer
        self.handles = [
            layer.mlp.register_forward_hook(self._hook(j)) for j, layer in enumerate(lm.layers)
        ]

    def _hook(self, j):
        def hook(module, args, output):
            self.rows[j] += args[0].shape[1]

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def median_threshold(lm, prompt, n_new=30) -> float:
    """A max-prob threshold that some layers reach and others do not, on this model."""
    lens = A.logit_lens(lm, prompt + A.greedy(lm, prompt, n_new, stop_at_eos=False))
    return float(np.median(lens.max_prob[:-1]))


# --- the layer walk ---------------------------------------------------------------------------


def test_the_layer_walk_reproduces_the_model_forward_stepwise_and_after_lazy_catch_up(lm):
    ids = torch.tensor(prompts(1, seed=3)[0] + list(range(40, 60)))
    ref = lm.hf(ids[None]).logits[0]
    cache = M.LayerCache(N_LAYER)
    w = M.walk(lm, cache, ids[:5])
    torch.testing.assert_close(w.logits, ref[:5], atol=1e-5, rtol=0)
    for t in range(5, 12):
        w = M.walk(lm, cache, ids[t : t + 1])
        torch.testing.assert_close(w.logits[0], ref[t], atol=1e-5, rtol=0)
    for t in range(12, 17):  # these stop after layer 1 and park their states
        M.walk(lm, cache, ids[t : t + 1], stop_after=1, fill="lazy")
    assert [cache.layer_length(j) for j in range(N_LAYER)] == [17, 17, 12, 12]
    w = M.walk(lm, cache, ids[17:18])  # full depth: catches the parked ones up in one chunk
    assert w.first == 12 and w.rows == [1, 1, 6, 6] and not cache.parked
    torch.testing.assert_close(w.logits, ref[12:18], atol=1e-5, rtol=0)


def test_pickled_weights_are_refused_and_never_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: opening it would fail loudly")
    with pytest.raises(M.LoadError, match="convert them to safetensors"):
        M.load(tmp_path)
    with pytest.raises(M.LoadError, match="no such"):
        M.load(tmp_path / "missing")


def test_the_family_loads_a_card_without_weights_of_ours(tiny_dir, tmp_path):
    from engine import families

    fam = families.get("hf_causal_lm")
    assert fam.kind == "lm" and fam.live_input(None) == "text" and fam.results(None) is None
    card = {
        "model_id": "tiny_llama",
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.model",
        "config": {"path": str(tiny_dir)},
        "dataset": "bbc_news",
    }
    (tmp_path / "tiny_llama.json").write_text(json.dumps(card))
    m = families.load_model("tiny_llama", models_dir=tmp_path)
    assert isinstance(m, M.CausalLM) and m.n_layer == N_LAYER and not m.training


# --- logit lens and static plans --------------------------------------------------------------


def test_logit_lens_reads_every_layer_and_the_last_is_the_model(lm):
    ids = prompts(1, seed=1)[0] + list(range(20))
    lens = A.logit_lens(lm, ids)
    t = len(ids)
    assert lens.agreement.shape == lens.kl.shape == lens.nll.shape == (N_LAYER,)
    assert lens.top1.shape == lens.max_prob.shape == (N_LAYER, t)
    assert lens.agreement[-1] == 1.0 and abs(lens.kl[-1]) < 1e-5 and (lens.kl[:-1] > 0).all()
    full = A.evaluate_plan(lm, ids)
    assert full.agreement == 1.0 and abs(full.nll - lens.nll[-1]) < 1e-4
    exit1 = A.evaluate_plan(lm, ids, exit_layer=1)
    assert exit1.layers_run == 2 and abs(exit1.agreement - lens.agreement[1]) < 1e-6


def test_skip_plans(lm):
    assert A.middle_block(30, 6) == (12, 13, 14, 15, 16, 17)
    spaced = A.evenly_spaced(30, 6)
    assert len(spaced) == 6 and 0 not in spaced and 29 not in spaced
    assert all(b - a >= 3 for a, b in zip(spaced, spaced[1:], strict=False))
    ids = prompts(1, seed=2)[0] + list(range(30))
    order = A.greedy_skip_order(lm, ids, 2)
    assert len(order[0].skip) == 1 and set(order[0].skip) < set(order[1].skip)
    for j in range(N_LAYER):  # the first pick is the least harmful single layer
        assert order[0].nll <= A.evaluate_plan(lm, ids, (j,)).nll + 1e-6
    with pytest.raises(ValueError):
        A.evaluate_plan(lm, ids, (N_LAYER,))


# --- early exit and skipping in generation ----------------------------------------------------


def test_early_exit_disabled_is_plain_greedy_decoding(lm):
    for p in prompts(4, seed=4):
        ref = lm.hf.generate(
            torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False
        )[0, len(p) :].tolist()
        assert A.greedy(lm, p, 20, stop_at_eos=False) == ref
        for measure in A.MEASURES:
            g = A.generate(lm, p, 20, A.ExitRule(measure, 1.01), stop_at_eos=False)
            assert g.tokens == ref and set(g.exit_layer) == {N_LAYER - 1}
            q = A.generation_quality(lm, p, g.tokens, ref)
            assert q.agreement == q.next_token_agreement == 1.0 and q.prefix_match == 20


@pytest.mark.parametrize("fill", ["propagate", "lazy"])
def test_exited_and_skipped_layers_are_not_run(lm, fill):
    p = prompts(1, seed=5)[0]
    rule = A.ExitRule("max_prob", median_threshold(lm, p))
    hooks = MLPRows(lm)
    try:
        g = A.generate(lm, p, 30, rule, fill=fill, stop_at_eos=False)
        rows = list(hooks.rows)
        hooks.rows = [0] * N_LAYER
        s = A.generate(lm, p, 30, skip=(1, 2), stop_at_eos=False)
        skip_rows = list(hooks.rows)
    finally:
        hooks.close()
    steps = g.exit_layer[1:]  # the first token came from the full-depth prefill
    assert len(set(steps)) > 1 and min(steps) < N_LAYER - 1  # the rule really decides
    ran = [len(p) + sum(e >= j for e in steps) for j in range(N_LAYER)]
    if fill == "propagate":
        assert rows == ran
        assert g.layer_rows == [N_LAYER] + [e + 1 for e in steps]
    else:  # lazy: deferred, not saved; what a token skipped is caught up by a deeper one
        assert rows[0] == ran[0] and all(r >= e for r, e in zip(rows, ran, strict=True))
        assert sum(rows) == g.prefill_rows + sum(g.layer_rows[1:])
    assert skip_rows == [len(p) + 29, 0, 0, len(p) + 29] and len(s.tokens) == 30


def test_calm_propagation_keeps_positions_and_cache_shapes_over_40_tokens(lm):
    p = prompts(1, seed=6)[0]
    rule = A.ExitRule("max_prob", median_threshold(lm, p, 40))
    stop = rule.stop(lm)
    cache = M.LayerCache(N_LAYER)
    w = M.walk(lm, cache, p)
    exits = []
    kvh = lm.hf.config.num_key_value_heads
    hd = lm.layers[0].self_attn.head_dim
    for i in range(40):
        tok = int(w.logits[-1].argmax())
        pos = cache.length
        w = M.walk(lm, cache, [tok], stop=stop)
        exits.append(w.exit_layer)
        assert w.first == pos and cache.length == len(p) + i + 1
        for j in range(N_LAYER):
            assert cache.k[j].shape == cache.v[j].shape == (1, kvh, cache.length, hd)
        if w.exit_layer < N_LAYER - 1:  # the K/V above the exit come from the exit state
            j = N_LAYER - 1
            k, v = M.project_kv(lm.layers[j], w.hidden[None], M.rotary(lm, w.hidden[None], pos)[0])
            torch.testing.assert_close(cache.k[j][:, :, pos:], k)
            torch.testing.assert_close(cache.v[j][:, :, pos:], v)
    assert min(exits) < N_LAYER - 1 and not cache.parked


def test_propagated_kv_is_what_the_layer_itself_writes_for_that_state(lm):
    torch.manual_seed(1)
    h = torch.randn(1, 3, lm.hidden_size)
    for j, layer in enumerate(lm.layers):
        cache = M.LayerCache(N_LAYER)
        cos_sin, pos = M.rotary(lm, h, 7)  # positions 7, 8, 9: the rotary phase matters
        mask = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
        layer(h, attention_mask=mask, position_ids=pos, past_key_values=cache,
              position_embeddings=cos_sin)  # fmt: skip
        k, v = M.project_kv(layer, h, cos_sin)
        torch.testing.assert_close(k, cache.k[j])
        torch.testing.assert_close(v, cache.v[j])


# --- self-speculative decoding ----------------------------------------------------------------


@pytest.mark.parametrize("draft_len,exit_layer", [(1, 0), (3, 1), (4, 2), (6, 0)])
def test_self_speculation_is_greedy_decoding_token_for_token(lm, draft_len, exit_layer):
    drafted = accepted = 0
    for p in prompts(10, seed=draft_len):
        ref = A.greedy(lm, p, 24, stop_at_eos=False)
        s = A.self_speculate(lm, p, 24, draft_len, exit_layer=exit_layer, stop_at_eos=False)
        assert s.tokens == ref
        assert s.rounds <= 23 and s.drafted <= draft_len * s.rounds
        drafted, accepted = drafted + s.drafted, accepted + s.accepted
    assert drafted > 0 and 0 <= accepted < drafted


def test_self_speculation_with_a_skip_set_draft_is_greedy_too(lm):
    for p in prompts(6, seed=9):
        ref = A.greedy(lm, p, 20, stop_at_eos=False)
        s = A.self_speculate(lm, p, 20, 3, draft_skip=(1, 2), stop_at_eos=False)
        assert s.tokens == ref


def test_a_draft_that_always_agrees_is_accepted_whole(tiny_dir):
    """With the last layer made an identity (its residual outputs zeroed), drafts from layer
    N-2 are the full model's tokens: every draft is accepted and each round adds d + 1."""
    lm2 = M.load(tiny_dir)
    last = lm2.layers[-1]
    last.self_attn.o_proj.weight.zero_()
    last.mlp.down_proj.weight.zero_()
    for p in prompts(4, seed=11):
        ref = A.greedy(lm2, p, 21, stop_at_eos=False)
        s = A.self_speculate(lm2, p, 21, 4, exit_layer=N_LAYER - 2, stop_at_eos=False)
        assert s.tokens == ref and s.acceptance == 1.0 and s.rounds == 4


def test_bad_settings_say_what_is_wrong(lm):
    with pytest.raises(ValueError, match="either"):
        A.self_speculate(lm, [1, 2], 5, 2)
    with pytest.raises(ValueError, match="exit layer"):
        A.self_speculate(lm, [1, 2], 5, 2, exit_layer=N_LAYER - 1)
    with pytest.raises(ValueError, match="measure"):
        A.ExitRule("entropy")
    with pytest.raises(ValueError, match="empty"):
        A.generate(lm, [], 5)


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_offline_answers_paris_and_self_speculates_exactly():
    real = M.load_smollm2()
    assert real.n_layer == 30
    ids = M.chat_ids(real, "What is the capital of France?")
    g = A.generate(real, ids, 12)
    assert "Paris" in M.decode(real, g.tokens)
    prompt2 = M.chat_ids(real, "Name three colours.")
    for p, (d, k) in ((ids, (4, 14)), (prompt2, (3, 20))):
        ref = A.greedy(real, p, 16)
        assert A.self_speculate(real, p, 16, d, exit_layer=k).tokens == ref
