"""A batch of prompts through the layer walk (engine/families/hf_causal_lm/batched.py), on the
tiny random Llama of test_hf_causal_lm: each row is its prompt decoded alone, exited rows run
no layer above their exit, skipped layers never run, and padding never leaks."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from engine.families.hf_causal_lm import analysis as A  # noqa: E402
from engine.families.hf_causal_lm import batched as B  # noqa: E402
from engine.families.hf_causal_lm import model as M  # noqa: E402
from tests.test_hf_causal_lm import N_LAYER, prompts, tiny_config  # noqa: E402

torch.set_num_threads(1)
NEW = 16


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama_batched")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return M.load(d)


@pytest.fixture(scope="module")
def batch():
    ps = prompts(6, seed=21)
    assert len({len(p) for p in ps}) > 2  # lengths differ: most rows are padded
    return ps


def between_values(lm, ps, measure: str) -> float:
    """A threshold some tokens reach and others do not, halfway between two observed
    confidences (never equal to one, so float rounding cannot flip a decision)."""
    rule = A.ExitRule(measure, 2.0)
    seen = []
    for p in ps:
        cache = M.LayerCache(N_LAYER)
        w = M.walk(lm, cache, p)
        for _ in range(NEW):
            w = M.walk(lm, cache, [int(w.logits[-1].argmax())], stop=rule.stop(lm))
            seen += [c for c in w.confidence if not math.isnan(c)]
    v = np.unique(np.round(seen, 6))
    i = len(v) * 2 // 3
    return float((v[i] + v[i + 1]) / 2)


class RowCounter:
    """Forward hooks on every decoder layer's MLP: rows (batch x positions) per call."""

    def __init__(self, lm):
        self.calls: list[list[int]] = [[] for _ in range(lm.n_layer)]
        self.handles = [
            layer.mlp.register_forward_hook(self._hook(j)) for j, layer in enumerate(lm.layers)
        ]

    def _hook(self, j):
        def hook(module, args, output):
            self.calls[j].append(args[0].shape[0] * args[0].shape[1])

        return hook

    @property
    def rows(self) -> list[int]:
        return [sum(c) for c in self.calls]

    def close(self):
        for h in self.handles:
            h.remove()


def assert_rows_equal_alone(lm, ps, bg: B.BatchGeneration, rule, skip, stop_at_eos=False):
    for p, g in zip(ps, bg.generations, strict=True):
        ref = A.generate(lm, p, NEW, rule, skip, stop_at_eos=stop_at_eos)
        assert g.prompt == ref.prompt and g.tokens == ref.tokens
        assert g.exit_layer == ref.exit_layer and g.layer_rows == ref.layer_rows
        assert g.prefill_rows == ref.prefill_rows
        np.testing.assert_allclose(g.confidence, ref.confidence, atol=1e-5)
        np.testing.assert_allclose(g.prob, ref.prob, atol=1e-5)


# --- each row is its prompt alone ----------------------------------------------------------


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize(
    "measure,skip",
    [(None, ()), (None, (1, 2)), ("max_prob", ()), ("margin", ()), ("saturation", (1,))],
)
def test_each_row_of_a_batch_is_its_prompt_decoded_alone(lm, batch, measure, skip, compact):
    rule = None if measure is None else A.ExitRule(measure, between_values(lm, batch, measure))
    bg = B.generate_batch(lm, batch, NEW, rule, skip, stop_at_eos=False, compact=compact)
    assert_rows_equal_alone(lm, batch, bg, rule, skip)
    exits = {e for g in bg.generations for e in g.exit_layer[1:]}
    assert len(exits) > 1 if rule else exits == {N_LAYER - 1}  # the rule really decides
    assert bg.n_tokens == NEW * len(batch)


def test_exits_disabled_and_no_cache_baseline_are_plain_greedy(lm, batch):
    ref = [A.greedy(lm, p, NEW, stop_at_eos=False) for p in batch]
    off = B.generate_batch(lm, batch, NEW, A.ExitRule("max_prob", 1.01), stop_at_eos=False)
    nocache = B.generate_batch_nocache(lm, batch, NEW, stop_at_eos=False)
    assert [g.tokens for g in off.generations] == ref
    assert [g.tokens for g in nocache.generations] == ref
    for g, p in zip(nocache.generations, batch, strict=True):  # padding hidden, not just outvoted
        np.testing.assert_allclose(
            g.prob, A.generate(lm, p, NEW, stop_at_eos=False).prob, atol=1e-5
        )
    width = max(len(p) for p in batch)  # every step re-runs every sequence in full
    assert nocache.layer_rows[0] == sum(len(batch) * (width + i) for i in range(NEW))


def test_rows_that_end_early_leave_the_batch_and_the_rest_go_on(lm, batch, monkeypatch):
    """An EOS ends a row; the others keep decoding (a token of the greedy outputs plays EOS)."""
    ref = [A.greedy(lm, p, NEW, stop_at_eos=False) for p in batch]
    eos = ref[0][3]
    monkeypatch.setattr(A, "eos_ids", lambda lm: {eos})
    monkeypatch.setattr(B, "eos_ids", lambda lm: {eos})
    rule = A.ExitRule("max_prob", between_values(lm, batch, "max_prob"))
    bg = B.generate_batch(lm, batch, NEW, rule)
    lengths = [len(g.tokens) for g in bg.generations]
    assert min(lengths) <= 4 and max(lengths) == NEW and len(set(lengths)) > 1
    assert_rows_equal_alone(lm, batch, bg, rule, (), stop_at_eos=True)


def test_a_rule_read_through_a_tuned_lens_decides_and_emits_as_batch_1_does(lm, batch):
    """A tuned-lens rule cannot be vectorised by the batch's own head call: it is asked row by
    row, and an exiting row's token comes from the lens that exited, as in batch 1."""
    from engine.families.hf_causal_lm import tuned_lens as TL

    torch.manual_seed(3)
    lens = TL.TunedLens(TL.TunedLensConfig(lm.n_layer, lm.hidden_size, 4, "tiny"))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.3)
    probe = A.ExitRule("max_prob", 2.0, lens=lens)
    seen = []
    for p in batch:
        cache = M.LayerCache(N_LAYER)
        w = M.walk(lm, cache, p)
        for _ in range(NEW):
            w = M.walk(lm, cache, [int(w.logits[-1].argmax())], stop=probe.stop(lm))
            seen += [c for c in w.confidence if not math.isnan(c)]
    v = np.unique(np.round(seen, 6))
    rule = A.ExitRule("max_prob", float((v[len(v) // 2] + v[len(v) // 2 + 1]) / 2), lens=lens)
    bg = B.generate_batch(lm, batch, NEW, rule, stop_at_eos=False)
    assert_rows_equal_alone(lm, batch, bg, rule, ())
    exits = [e for g in bg.generations for e in g.exit_layer]
    assert len(set(exits)) > 1


# --- what runs -------------------------------------------------------------------------------


def test_exited_rows_do_not_run_the_layers_above_their_exit(lm, batch):
    rule = A.ExitRule("max_prob", between_values(lm, batch, "max_prob"))
    width, n_rows = max(len(p) for p in batch), len(batch)
    counter = RowCounter(lm)
    try:
        bg = B.generate_batch(lm, batch, NEW, rule, stop_at_eos=False)
        compact = counter.rows
        counter.calls = [[] for _ in range(N_LAYER)]
        whole = B.generate_batch(lm, batch, NEW, rule, stop_at_eos=False, compact=False)
        uncompacted = counter.rows
    finally:
        counter.close()
    steps = [g.exit_layer[1:] for g in bg.generations]  # decode steps (the prefill is full)
    need = [n_rows * width + sum(e >= j for s in steps for e in s) for j in range(N_LAYER)]
    assert compact == need == bg.layer_rows
    assert need[-1] < need[0]  # rows did exit, and saved layers
    # without compaction a layer runs on every row while any row of the step needs it
    deepest = [max(s[i] for s in steps) for i in range(NEW - 1)]
    assert uncompacted == [n_rows * (width + sum(d >= j for d in deepest)) for j in range(N_LAYER)]
    assert uncompacted == whole.layer_rows and uncompacted[-1] > compact[-1]
    assert [g.tokens for g in whole.generations] == [g.tokens for g in bg.generations]


def test_skipped_layers_never_run(lm, batch):
    counter = RowCounter(lm)
    try:
        B.generate_batch(lm, batch, NEW, skip=(1, 2), stop_at_eos=False)
    finally:
        counter.close()
    width = max(len(p) for p in batch)
    full = len(batch) * (width + NEW - 1)
    assert counter.rows == [full, 0, 0, full]


# --- padding ---------------------------------------------------------------------------------


def test_padding_never_leaks_into_a_row(lm, batch, monkeypatch):
    """What padding positions hold changes nothing, bit for bit, and a prompt decodes the same
    whatever its batch mates (more padding, other mates)."""
    rule = A.ExitRule("max_prob", between_values(lm, batch, "max_prob"))
    a = B.generate_batch(lm, batch, NEW, rule, stop_at_eos=False)
    monkeypatch.setattr(B, "PAD_ID", 77)
    b = B.generate_batch(lm, batch, NEW, rule, stop_at_eos=False)
    for ga, gb in zip(a.generations, b.generations, strict=True):
        assert ga.tokens == gb.tokens and ga.prob == gb.prob and ga.confidence == gb.confidence
    short = min(batch, key=len)
    alone = B.generate_batch(lm, [short], NEW, rule, stop_at_eos=False).generations[0]
    long_mates = [list(range(30, 60)), short, list(range(100, 112))]
    mated = B.generate_batch(lm, long_mates, NEW, rule, stop_at_eos=False).generations[1]
    assert mated.tokens == alone.tokens and mated.exit_layer == alone.exit_layer
    np.testing.assert_allclose(mated.prob, alone.prob, atol=1e-5)


def test_a_rows_cache_is_its_cache_alone_shifted_by_its_padding(lm, batch):
    """Row r's K/V (rotary phase included: positions count from its first real token) and the
    propagated entries above its exits are what decoding it alone writes."""
    rule = A.ExitRule("max_prob", between_values(lm, batch, "max_prob"))
    ids, pads = B._left_pad(batch)
    cache = B.BatchCache.empty(lm, pads, ids.shape[1] + 8)
    rows = torch.arange(len(batch))
    st = B.walk_batch(lm, cache, rows, ids)
    alone = [M.LayerCache(N_LAYER) for _ in batch]
    for c, p in zip(alone, batch, strict=True):
        M.walk(lm, c, p)
    exits = set()
    for _ in range(8):
        toks = st.logits.argmax(-1)
        st = B.walk_batch(lm, cache, rows, toks[:, None], rule=rule)
        exits |= set(st.exit_layer)
        for c, t in zip(alone, toks.tolist(), strict=True):
            M.walk(lm, c, [t], stop=rule.stop(lm))
    assert len(exits) > 1
    for r, (c, pad) in enumerate(zip(alone, pads, strict=True)):
        for j in range(N_LAYER):
            kb, vb = cache.k[j][r, :, pad : cache.length], cache.v[j][r, :, pad : cache.length]
            torch.testing.assert_close(kb, c.k[j][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(vb, c.v[j][0], atol=1e-5, rtol=0)


def test_bad_batches_say_what_is_wrong(lm):
    with pytest.raises(ValueError, match="no prompts"):
        B.generate_batch(lm, [], 4)
    with pytest.raises(ValueError, match="empty"):
        B.generate_batch(lm, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="at least 1"):
        B.generate_batch_nocache(lm, [[1, 2]], 0)


# --- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_batch_rows_equal_each_prompt_alone():
    real = M.load_smollm2()
    qs = ("What is the capital of France?", "Name three colours.", "Why is the sky blue?")
    ps = [M.chat_ids(real, q) for q in qs]
    for rule, skip in ((A.ExitRule("max_prob", 0.9), ()), (None, A.middle_block(30, 6))):
        bg = B.generate_batch(real, ps, 10, rule, skip, stop_at_eos=False)
        for p, g in zip(ps, bg.generations, strict=True):
            ref = A.generate(real, p, 10, rule, skip, stop_at_eos=False)
            assert g.tokens == ref.tokens and g.exit_layer == ref.exit_layer
