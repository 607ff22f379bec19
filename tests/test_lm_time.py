"""The language models' time axis: per-layer decode profiles, what a rule's reads and fills add,
and the prediction for a study curve, a live run and the char LM's policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import families
from engine.core import costs
from engine.paths import TRACES_DIR
from engine.registry import _read_card, get_card
from engine.run import profile as prof

B1 = costs.time_unit(1)


def synthetic(step, read=0.0, fill=0.0, token=0.0, batch=1) -> costs.Profile:
    step = np.asarray(step, dtype=np.float64)
    parts = {"read": read, "fill": fill, "token": token}
    bt = costs.BatchTiming(batch, step, step * 0, step[:, None].repeat(3, 1), parts)
    pts = np.arange(1, len(step) + 1, dtype=np.float64)
    return costs.Profile("lm", "hf_causal_lm", "layers", pts, {batch: bt}, {})


def test_decode_ms_adds_the_reads_a_rule_asks_and_the_fills_it_writes():
    p = synthetic([10.0, 12.0, 14.0, 16.0], read=5.0, fill=0.5, token=1.0)
    # a static exit after layer 2, K/V above propagated (what the step measured): the step
    assert costs.decode_ms(p, B1, 2) == 12.0 + 1.0
    # three reads asked, a lazy fill writes nothing above (2 layers' fill saved)
    assert costs.decode_ms(p, B1, 2, 3, 0) == 12.0 + 1.0 + 15.0 - 1.0
    np.testing.assert_allclose(costs.decode_ms(p, B1, [1, 4], [1, 3]), [16.0, 32.0])
    # asks: every layer from min_layer up to the exit, never at the last layer
    np.testing.assert_array_equal(costs.asked_reads([0, 1, 3], 4), [1, 2, 3])
    np.testing.assert_array_equal(costs.asked_reads([0, 1, 3], 4, min_layer=2), [0, 0, 1])
    np.testing.assert_array_equal(costs.asked_reads([0, 3], 4, reads=False), [0, 0])
    assert costs.read_in_layers(p, B1) == pytest.approx(2.5)
    no_fill = synthetic([10.0, 12.0], read=5.0)
    no_fill.timings[1].parts_ms.pop("fill")
    with pytest.raises(ValueError, match="no K/V fill"):
        costs.decode_ms(no_fill, B1, 1, 0, 0)
    with pytest.raises(ValueError, match="per-layer profile"):
        costs.decode_ms(costs.Profile("m", "f", "exit", np.zeros(2), {}, {}), B1, 1)


class Counter:
    """Forward calls of modules, by name (what really ran)."""

    def __init__(self, modules: dict):
        self.n = dict.fromkeys(modules, 0)
        for name, mods in modules.items():
            for m in mods:
                m.register_forward_hook(lambda *_, k=name: self.n.__setitem__(k, self.n[k] + 1))

    def during(self, fn) -> dict:
        before = dict(self.n)
        fn()
        return {k: self.n[k] - before[k] for k in self.n}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers_lm import N_LAYER, save_tiny_lm

    card = _read_card(save_tiny_lm(tmp_path_factory.mktemp("tiny")), user=True)
    return card, families.get(card.family).load(card), N_LAYER


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_points_run_exactly_their_layers_and_parts_their_extra_work(tiny, batch):
    from engine.families.hf_causal_lm.timing import decode_timed

    card, lm, n = tiny
    timed = decode_timed(lm, batch, prompt_tokens=8)
    assert timed.axis == "layers" and list(timed.points) == list(range(1, n + 1))
    count = Counter(
        {
            "layers": list(lm.layers),
            "head": [lm.hf.lm_head],
            "k_proj": [layer.self_attn.k_proj for layer in lm.layers],
        }
    )
    with torch.inference_mode():
        for i in range(n):
            ran = count.during(lambda i=i: timed.run(i))
            # depth i + 1: that many layers, one read, and every layer's K/V written
            assert ran == {"layers": i + 1, "head": 1, "k_proj": n}, (i, ran)
        read, fill = timed.parts["read"], timed.parts["fill"]
        extra = {k: a - b for (k, a), b in zip(
            count.during(read.run).items(), count.during(read.baseline).values(), strict=True
        )}  # fmt: skip
        assert extra == {"layers": 0, "head": read.units, "k_proj": 0} and read.units == n - 1
        extra = {k: a - b for (k, a), b in zip(
            count.during(fill.run).items(), count.during(fill.baseline).values(), strict=True
        )}  # fmt: skip
        assert extra == {"layers": 0, "head": 0, "k_proj": fill.units}
    assert ("token" in timed.parts) == (batch == 1)


def test_decoder_profile_is_per_token_with_its_parts(tiny):
    card, _, n = tiny
    p = prof.profile(card, batch=2, repeats=2, warmup=1)
    assert p.axis == "layers" and p.batches == [1, 2] and list(p.points) == list(range(1, n + 1))
    assert set(p.timings[1].parts_ms) == {"read", "fill", "token"}
    assert set(p.timings[2].parts_ms) == {"read", "fill"}
    again = costs.Profile.from_json(json.loads(json.dumps(p.to_json())))
    assert again.timings[1].parts_ms == p.timings[1].parts_ms
    assert costs.units(p) == [costs.FLOPS, B1, costs.time_unit(2)]


def test_char_lm_points_run_their_blocks_and_its_read_asks():
    from engine.families.early_exit_lm.timing import decode_timed

    card = get_card("bbc_char_early_exit_lm")
    model = families.get(card.family).load(card)
    n = model.n_layer
    timed = decode_timed(model, 2, prompt_chars=16)
    count = Counter({"mlp": [b.mlp for b in model.blocks], "qkv": [b.qkv for b in model.blocks]})
    for i in range(n):
        # blocks 1 .. i + 1 finish; every block's K/V is written (the generator always does)
        assert count.during(lambda i=i: timed.run(i)) == {"mlp": i + 1, "qkv": n}
    read = timed.parts["read"]
    assert count.during(read.run) == count.during(read.baseline) == {"mlp": n, "qkv": n}


def test_shipped_decoder_profiles_are_per_layer():
    for model_id in ("bbc_char_early_exit_lm", "smollm2_135m"):
        p = prof.read_profile(TRACES_DIR / f"{model_id}__time.json")
        n = get_card(model_id).config["n_layer"]
        assert p.axis == "layers" and list(p.points) == list(range(1, n + 1)), model_id
        assert not p.reason and len(p.batches) == 2 and p.repeats >= 5
        for b, t in p.timings.items():
            assert "read" in t.parts_ms, (model_id, b)
        # more layers cost more time: one sequence's step at full depth is slower than at layer 1
        assert p.timings[1].median_ms[-1] > p.timings[1].median_ms[0], model_id
        assert "token" in p.timings[1].parts_ms


def test_study_curve_times_count_each_tokens_depth_and_reads():
    from engine.families.hf_causal_lm import timing
    from engine.families.hf_causal_lm.study import exit_layers, study_files

    if not study_files()["card"].exists():
        pytest.skip("the SmolLM2 study is not built")
    from engine.families.hf_causal_lm.study import load_study

    study = load_study()
    n = study.n_layer
    p = synthetic(np.arange(1, n + 1) * 2.0, read=5.0, fill=0.05, token=0.5)
    ms = timing.study_curves_ms(study, p, B1)
    rows = list(study.curves.iter_rows(named=True))
    assert len(ms) == len(rows)
    seen = set()
    for i, row in enumerate(rows):
        method = row["method"]
        seen.add(method)
        if method.startswith("calm_"):
            m = method.removeprefix("calm_")
            e = exit_layers(study.records, m, row["setting"])
            # max-prob and margin read the head at every layer up to the exit; saturation and
            # the gate read none; every exit's layers above get no K/V (a lazy fill)
            asked = (np.minimum(e, n - 2) + 1) * (m in ("max_prob", "margin"))
            want = (2.0 * (e + 1) + 0.5 + 5.0 * asked - 0.05 * (n - 1 - e)).mean()
        else:  # static plans: their layers, nothing asked, nothing written above
            want = 2.0 * row["layers"] + 0.5 - 0.05 * (n - row["layers"])
        assert ms[i] == pytest.approx(want), row
    assert {"calm_max_prob", "calm_saturation", "exit_fixed", "skip_middle"} <= seen


def test_live_run_prediction_uses_its_own_exits_reads_and_fill():
    from engine.families.hf_causal_lm import live, timing

    p = synthetic([10.0, 12.0, 14.0, 16.0], read=5.0, fill=0.5)

    def result(setting, exits):
        r = live.LiveResult.__new__(live.LiveResult)
        r.setting, r.n_layer, r.exit_layer = setting, 4, exits
        r.tokens, r.seconds, r.prefill_seconds = list(exits), 1.0, 0.4
        return r

    s = live.Setting("exit", "max_prob", 0.9, min_layer=1, fill="propagate")
    # the first token is the prefill's; then exits 1 (asked at 1), 3 (asked at 1, 2)
    r = result(s, [3, 1, 3])
    assert timing.live_ms(r, p, B1) == pytest.approx(((12 + 5) + (16 + 10)) / 2)
    lazy = result(live.Setting("exit", "max_prob", 0.9, min_layer=1, fill="lazy"), [3, 1, 3])
    assert timing.live_ms(lazy, p, B1) == pytest.approx(((12 + 5 - 1.0) + (16 + 10)) / 2)
    skip = result(live.Setting("skip", skip=(1, 2)), [3, 3, 3])
    assert timing.live_ms(skip, p, B1) == pytest.approx(12 - 1.0)
    assert np.isnan(timing.live_ms(result(live.Setting("speculate"), [3, 3]), p, B1))
    assert timing.measured_ms(r) == pytest.approx(1e3 * 0.6 / 2)


def test_char_lm_generation_time_counts_its_asks():
    from engine.families.early_exit_lm import analysis as lm

    card = get_card("bbc_char_early_exit_lm")
    model = families.get(card.family).load(card)
    n = model.n_layer
    p = synthetic(np.arange(1, n + 1) * 1.0, read=0.5, token=0.25)
    g, full = lm.generate_pair(model, "The government said", 30, "max_prob", "exit", 0.6)
    e = np.asarray(g.exit_layer[1:])
    want = ((e + 1) + 0.25 + 0.5 * (np.minimum(e, n - 2) + 1)).mean()
    assert lm.generation_ms(model, g, p, B1, "exit", 0.6) == pytest.approx(want)
    assert lm.generation_ms(model, full, p, B1, "exit", 2.0) == pytest.approx(n + 0.25)
    sweep = [{"fraction": 0.5, "threshold": 0.6, "mode": "exit"}]
    assert lm.sweep_ms(sweep, p, B1, n) == [pytest.approx(n / 2 + 0.25 + 0.5 * n / 2)]


def readme_lm_sentence() -> str:
    """The README's sentence on the decoders' time axis, from the shipped profile and study."""
    from engine.families.hf_causal_lm.study import load_study
    from engine.families.hf_causal_lm.timing import exits_ms, static_ms

    p = prof.read_profile(TRACES_DIR / "smollm2_135m__time.json")
    study = load_study()
    n = study.n_layer
    step = p.timings[1].median_ms
    out = study.simulate("max_prob", 0.9)
    calm = exits_ms(p, B1, out.exit_layer, n, "max_prob").mean()
    full = float(static_ms(p, B1, n))
    fixed = float(static_ms(p, B1, out.mean_layers))
    return (
        f"SmolLM2-135M's KV-cached decode step takes {step[0]:.0f} ms per token with one "
        f"layer and {step[-1]:.0f} ms with all {n} (batch 1), and one confidence read "
        f"through its head costs {costs.read_in_layers(p, B1):.1f} layers' time, so CALM "
        f"max-prob ≥ 0.9 on the study's passages, which runs {out.mean_layers:.1f} of {n} "
        f"layers per token ({out.fraction:.0%}), takes {calm / full:.0%} of the full depth's "
        f"time per token, where a fixed exit as deep takes {fixed / full:.0%}"
    )


def test_readme_decoder_time_sentence_is_the_shipped_profile():
    from pathlib import Path

    from engine.families.hf_causal_lm.study import study_files

    if not study_files()["card"].exists():
        pytest.skip("the SmolLM2 study is not built")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    para = " ".join(readme.split("### FLOPs or time: which to trust")[1].split("##")[0].split())
    assert readme_lm_sentence() in para
