"""The time cost axis: shipped profiles, the profiler itself, and curves/solvers in ms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import families
from engine.compare import match_budget
from engine.core import costs, tradeoff
from engine.core.results import from_trace
from engine.paths import TRACES_DIR
from engine.registry import list_cards
from engine.run import profile as prof
from engine.trace_store import load_trace
from tests.helpers_app import make_trace

BUNDLED = [c for c in list_cards() if not c.user]


@pytest.mark.parametrize("card", BUNDLED, ids=lambda c: c.model_id)
def test_every_bundled_model_has_a_profile_or_says_why(card):
    path = TRACES_DIR / f"{card.model_id}__time.json"
    assert path.is_file(), f"run python -m engine.profile {card.model_id}"
    p = prof.read_profile(path)
    assert p.model_id == card.model_id and p.family == card.family
    m = p.machine
    assert m["cpu"] and m["torch"] and m["torch_threads"] >= 1 and m["device"]
    fam = families.get(card.family)
    if p.reason:  # not timed: one line, and the family (or the model) says so
        assert "\n" not in p.reason and not p.timings
        return
    assert not fam.untimed
    assert p.axis in ("exit", "setting", "layers") and p.batches[0] == 1 and len(p.batches) == 2
    assert p.repeats >= 5 and p.warmup >= 1
    for t in p.timings.values():
        assert t.runs_ms.shape == (len(p.points), p.repeats)
        # the median (and IQR) of the repeats, per sample
        np.testing.assert_allclose(t.median_ms, np.median(t.runs_ms, axis=1))
        q25, q75 = np.percentile(t.runs_ms, [25, 75], axis=1)
        np.testing.assert_allclose(t.spread_ms, q75 - q25)
        assert (t.median_ms > 0).all()


def test_profile_measures_every_exit_with_warmup_and_median(monkeypatch):
    """The profiler on a real bundled model: every exit, batch 1 and B, median of repeats."""
    card = next((c for c in BUNDLED if c.family == "cascade"), None) or pytest.skip("no cascade")
    calls = []
    real = prof.time_rounds

    def spy(run, m, repeats, warmup, done=None):
        calls.append((m, repeats, warmup))
        return real(run, m, repeats, warmup, done)

    monkeypatch.setattr(prof, "time_rounds", spy)
    p = prof.profile(card, batch=8, repeats=3, warmup=1)
    k = families.get("cascade").load(card).heads.__len__()
    assert p.batches == [1, 8] and p.axis == "exit" and len(p.points) == k
    assert calls == [(k, 3, 1)] * 2  # every exit in each round, at batch 1 and 8
    for t in p.timings.values():  # per sample: the median (and IQR) of the repeats
        np.testing.assert_allclose(t.median_ms, np.median(t.runs_ms, axis=1))
        np.testing.assert_allclose(t.spread_ms, np.subtract(*np.percentile(t.runs_ms, [75, 25], 1)))
    assert p.machine["cpu"] and p.machine["torch_threads"] >= 1
    again = costs.Profile.from_json(json.loads(json.dumps(p.to_json())))
    np.testing.assert_array_equal(again.timings[8].runs_ms, p.timings[8].runs_ms)


def test_rounds_time_every_point_once_per_round_after_its_warmup():
    order = []
    out = prof.time_rounds(order.append, 3, 2, 1)
    assert order == [0, 1, 2, 0, 1, 2, 0, 1, 2] and out.shape == (3, 2) and (out >= 0).all()


def test_untimed_family_says_why_in_one_line(monkeypatch):
    card = next((c for c in BUNDLED if c.family == "early_exit_lm"), None) or pytest.skip()
    monkeypatch.setattr(families.get(card.family), "untimed", "no model here to time")
    p = prof.profile(card, batch=4, repeats=1)
    assert p.reason and not p.timings and costs.units(p) == [costs.FLOPS]


def _profile(ms_b1, ms_b, batch=64, axis="exit"):
    def bt(b, ms):
        ms = np.asarray(ms, dtype=np.float64)
        return costs.BatchTiming(b, ms, ms * 0, np.repeat(ms[:, None], 3, 1))

    pts = np.arange(len(ms_b1), dtype=np.float64)
    return costs.Profile("m", "f", axis, pts, {1: bt(1, ms_b1), batch: bt(batch, ms_b)}, {})


def test_time_axis_is_the_profiles_numbers():
    trace = make_trace(n=400)
    p = _profile([0.5, 0.7, 0.9, 1.0], [0.3, 0.32, 0.35, 0.4])
    assert costs.units(p) == ["FLOPs", "ms (batch 1)", "ms (batch 64)"]
    assert costs.trace_on_axis(trace, p, "FLOPs") is trace
    for unit, b in (("ms (batch 1)", 1), ("ms (batch 64)", 64)):
        t = costs.trace_on_axis(trace, p, unit)
        np.testing.assert_array_equal(t.cost, np.tile(p.timings[b].median_ms, (400, 1)))
        assert t.meta.cost_unit == unit
        # results over the threshold: each sample's time is that of the exit it took
        r = costs.results_on_axis(from_trace(trace, "x"), p, unit)
        np.testing.assert_array_equal(r.cost, p.timings[b].median_ms[r.detail["exit"]])


def test_shipped_profile_time_axis_equals_its_json():
    card = next(c for c in BUNDLED if c.family == "multi_exit_cnn")
    p = prof.read_profile(TRACES_DIR / f"{card.model_id}__time.json")
    trace = load_trace(card.model_id)
    for b in p.batches:
        t = costs.trace_on_axis(trace, p, costs.time_unit(b))
        raw = json.loads((TRACES_DIR / f"{card.model_id}__time.json").read_text())
        ms = np.maximum.accumulate(np.asarray(raw["timings"][str(b)]["median_ms"]))
        np.testing.assert_array_equal(t.cost[0], ms)


def test_setting_profile_keeps_each_settings_measured_mean():
    card = next(c for c in BUNDLED if c.family == "skipnet")
    p = prof.read_profile(TRACES_DIR / f"{card.model_id}__time.json")
    r = families.get("skipnet").results(card)
    for b in p.batches:
        t = costs.results_on_axis(r, p, costs.time_unit(b))
        np.testing.assert_allclose(t.mean_cost, p.timings[b].median_ms, rtol=1e-12)


def _brute_best_within(c, budget):
    best = None
    for i in range(len(c)):
        if c.mean_cost[i] <= budget * (1 + tradeoff.TOL):
            key = (c.accuracy[i], -c.mean_cost[i])
            if best is None or key > best[0]:
                best = (key, i)
    return None if best is None else best[1]


def _brute_cheapest(c, target):
    best = None
    for i in range(len(c)):
        if c.accuracy[i] >= target - tradeoff.TOL:
            key = (-c.mean_cost[i], c.accuracy[i])
            if best is None or key > best[0]:
                best = (key, i)
    return None if best is None else best[1]


@pytest.mark.parametrize("seed", range(3))
def test_solvers_in_ms_pick_the_brute_force_index(seed):
    rng = np.random.default_rng(seed)
    trace = make_trace(n=300, seed=seed)
    ms = np.cumsum(rng.uniform(0.05, 1.0, 4))
    p = _profile(ms, np.cumsum(rng.uniform(0.01, 0.2, 4)))
    for unit in costs.units(p)[1:]:
        t = costs.trace_on_axis(trace, p, unit)
        c = tradeoff.curve(t, "max_prob")
        for budget in np.linspace(c.mean_cost.min() * 0.9, c.mean_cost.max(), 9):
            i = tradeoff.best_within_budget(c, budget)  # "best within X ms"
            j = _brute_best_within(c, budget)
            assert (i is None) == (j is None)
            if i is not None:
                assert (c.accuracy[i], c.mean_cost[i]) == (c.accuracy[j], c.mean_cost[j])
        for target in (0.5, 0.8, 0.95):
            i, j = tradeoff.cheapest_with_accuracy(c, target), _brute_cheapest(c, target)
            assert (i is None) == (j is None)
            if i is not None:
                assert (c.accuracy[i], c.mean_cost[i]) == (c.accuracy[j], c.mean_cost[j])


def test_compare_matching_in_ms_is_absolute():
    trace = make_trace(n=300)
    p = _profile([0.5, 0.7, 0.9, 1.0], [0.1, 0.2, 0.3, 0.4])
    r = costs.results_on_axis(from_trace(trace, "x"), p, "ms (batch 64)")
    for target in (0.15, 0.25, 0.33):
        m = match_budget(r, target, absolute=True)
        gap = np.abs(r.mean_cost - target)
        assert gap[m.index] == gap.min() and m.mean_cost == r.mean_cost[m.index]


def test_fmt_cost_names_the_unit():
    assert costs.fmt_cost(2.5e6, "FLOPs") == "2.5 MFLOPs"
    assert costs.fmt_cost(0.4123, "ms (batch 1)") == "0.412 ms (batch 1)"
    assert costs.unit_batch("ms (batch 256)") == 256 and costs.unit_batch("FLOPs") is None


def test_readme_time_paragraph_is_the_shipped_profile():
    """The README's "FLOPs or time" numbers are the shipped JSON's, as printed there."""
    from pathlib import Path

    from engine.core.policies import Policy, exit_index

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    para = " ".join(readme.split("### FLOPs or time: which to trust")[1].split("##")[0].split())
    mid = "mnist_multi_exit_cnn"
    p = prof.read_profile(TRACES_DIR / f"{mid}__time.json")
    trace = load_trace(mid)
    exits = exit_index(trace, Policy("max_prob", threshold=0.9))
    f = trace.cost[0]
    ms1, msb = p.timings[1].median_ms, p.timings[256].median_ms
    on = {b: costs.trace_on_axis(trace, p, costs.time_unit(b)) for b in (1, 256)}
    said = (
        f"the first stage is {100 * f[0] / f[-1]:.1f} % of the FLOPs but "
        f"{100 * ms1[0] / ms1[-1]:.1f} % of the time at batch 1 and "
        f"{100 * msb[0] / msb[-1]:.1f} % at batch 256, so max-prob 0.9, a "
        f"{tradeoff.evaluate(trace, exits).speedup:.2f}× speed-up in FLOPs, is "
        f"{tradeoff.evaluate(on[1], exits).speedup:.2f}× in time at batch 1 and only "
        f"{tradeoff.evaluate(on[256], exits).speedup:.2f}× at batch 256"
    )
    assert said in para


def _recorded_pred(card, model, v: float, n: int) -> np.ndarray:
    """The prediction of the family's recording runner (FLOPs counted) on the profiler's inputs."""
    from engine.data import images
    from engine.families.act import model as act
    from engine.families.common import tile

    if card.family in ("act", "act_cnn", "pondernet"):
        if card.family == "act_cnn":
            x = tile(images.to_model_input(images.load(card.dataset).images[:n]), n)
        else:
            x = act.parity_data(n, int(card.config["num_bits"]), seed=0)[0]
        if card.family == "pondernet":
            from engine.families.pondernet import model as pn

            return pn.run(model, np.asarray(x, dtype=np.float32), q=v).pred
        return act.run_act(model, np.asarray(x, dtype=np.float32), eps=v)["pred"]
    imgs = images.load(card.dataset).images[:n]
    if card.family == "skipnet":
        from engine.families.skipnet import model as sk

        return sk.run_skipnet(model, images.to_model_input(imgs), v)["pred"]
    from engine.families.moe import analysis

    return analysis.run(model, imgs, analysis.routing_setting(tau=v)).pred


@pytest.mark.parametrize(
    "model_id",
    ["mnist_skipnet", "parity_act", "mnist_act", "parity_pondernet", "fashion_d2dmoe_vit"],
)
def test_timed_work_is_the_models_real_run(model_id):
    """What the profiler times at a setting predicts what the recording runner predicts there:
    the lean loops are the same computation, without counting."""
    import torch

    from engine.registry import get_card

    card = get_card(model_id)
    fam = families.get(card.family)
    model = fam.load(card)
    timed = fam.timed(card, model, 64)
    for i in (0, len(timed.points) // 2, len(timed.points) - 1):
        with torch.no_grad():
            got = np.asarray(timed.run(i)).argmax(1)
        want = _recorded_pred(card, model, float(timed.points[i]), 64)
        np.testing.assert_array_equal(got, want)


def test_missing_data_is_a_reason_not_a_crash(monkeypatch):
    from engine.data import images

    def gone(*a, **k):
        raise images.DatasetUnavailable("mnist is not installed")

    monkeypatch.setattr(images, "load", gone)
    card = next(c for c in BUNDLED if c.family == "multi_exit_cnn")
    p = prof.profile(card, batch=4, repeats=1)
    assert "not installed" in p.reason and not p.timings
