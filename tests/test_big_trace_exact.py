"""The tuning page's fast paths give the very numbers of the plain ones (issue #19).

A slider move on a million-sample trace reads prepared per-trace data (the threshold index,
the cached full cost, a per-policy tally) instead of recomputing; every number must stay the
one the direct computation gives, to the last bit, never an approximation. Each test here
compares a fast path with the plain rule or numpy function it replaces.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from engine.core import calibration, tradeoff
from engine.core import trace as trace_mod
from engine.core.policies import (
    SCORE_KINDS,
    Policy,
    exit_index,
    first_true,
    reference_exit_index,
    score,
    stop_mask,
    threshold_index,
)
from tests.helpers_app import make_trace
from tests.test_page_tuning import _expected, _metrics

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "tuning.py")


def _with_gate(t: trace_mod.Trace, seed: int = 1) -> trace_mod.Trace:
    rng = np.random.default_rng(seed)
    gate = rng.uniform(0, 1, (t.num_samples, t.num_exits)).astype(np.float32)
    return dataclasses.replace(t, gate=gate)


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> list[trace_mod.Trace]:
    """A full and a compact trace of the same file, with gates and a few unlabelled samples."""
    t = _with_gate(make_trace(n=1200, k=5, c=6, seed=4))
    t = dataclasses.replace(t, label=np.where(np.arange(t.num_samples) % 13 == 0, -1, t.label))
    path = tmp_path_factory.mktemp("exact") / "t.parquet"
    t.write_parquet(path)
    return [trace_mod.read(path, lazy=False), trace_mod.read(path, lazy=True)]


def _thresholds(t: trace_mod.Trace, kind: str) -> list[float]:
    """Every distinct score (the edge cases), the float64 neighbours of some and values past
    both ends: a threshold rounded to float32 the wrong way exits a sample at its score."""
    s = score(t, kind)
    raw = -s if kind == "entropy" else s  # in the policy's own units
    values = np.unique(raw)
    some = values[:: max(1, len(values) // 60)]
    near = np.r_[np.nextafter(some, -np.inf), np.nextafter(some, np.inf)]
    return [*values.tolist(), *near.tolist(), -1.0, 0.0, 1.0, 1.5, 1e39, -1e39]


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_the_threshold_index_exits_every_sample_as_the_rule_does(traces, kind):
    for t in traces:
        ti = threshold_index(t, kind)
        for thr in _thresholds(t, kind):
            p = Policy(kind, threshold=thr)
            want = first_true(stop_mask(p, t))
            got = exit_index(t, p, prepared=ti)
            assert got.dtype == np.int64
            assert np.array_equal(got, want), (kind, thr)
        if t.is_compact:  # the batch-size-1 loop reads whole distributions: the full trace's
            continue
        for thr in _thresholds(t, kind)[::600]:
            p = Policy(kind, threshold=thr)
            assert np.array_equal(exit_index(t, p, prepared=ti), reference_exit_index(t, p))


def test_the_index_is_float32_only_where_that_is_exact(traces):
    t = traces[1]
    # max-prob of float32 probabilities and float32 gates: every score is a float32
    assert threshold_index(t, "max_prob").running.dtype == np.float32
    assert threshold_index(t, "gate").running.dtype == np.float32
    # entropy and margin are computed in float64: rounding them would move samples
    assert threshold_index(t, "entropy").running.dtype == np.float64
    assert threshold_index(t, "margin").running.dtype == np.float64
    # a confidence trace's float64 confidences are not float32 either
    conf = np.random.default_rng(0).uniform(0.1, 1, (t.num_samples, t.num_exits))
    full = traces[0]
    ct = dataclasses.replace(full, confidence=conf)
    ti = threshold_index(ct, "max_prob")
    assert ti.running.dtype == np.float64
    for thr in np.r_[np.unique(conf)[::50], 0.5]:
        p = Policy("max_prob", threshold=float(thr))
        assert np.array_equal(exit_index(ct, p, prepared=ti), exit_index(ct, p))
    # the policy outputs' confidences: gathered from a float32 copy only where it is exact
    assert calibration.outcome_table(t).confidence.dtype == np.float32
    outcome = calibration.outcome_table(ct)
    assert outcome.confidence.dtype == np.float64
    exits = exit_index(ct, Policy("max_prob", threshold=0.6))
    o = calibration.policy_outputs(ct, exits, outcome=outcome)
    assert np.array_equal(o.confidence, conf[np.arange(ct.num_samples), exits][ct.labelled])


def test_an_index_prepared_for_another_kind_is_refused(traces):
    t = traces[0]
    with pytest.raises(ValueError, match="prepared for 'max_prob'"):
        exit_index(t, Policy("entropy", threshold=0.3), prepared=threshold_index(t, "max_prob"))


def _cost_at(t: trace_mod.Trace, exits: np.ndarray) -> np.ndarray:
    return t.cost[np.arange(t.num_samples), exits]


def test_p95_and_the_means_are_numpys_own(traces):
    """p95 is read off the exit counts when every sample pays the same at an exit; it must be
    np.percentile's number also when the 95 % point falls between two exits (interpolated)."""
    t = traces[0]
    n = t.num_samples
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, t.num_exits, n) for _ in range(5)]
    for m in range(int(0.95 * (n - 1)) - 3, int(0.95 * (n - 1)) + 4):
        cases.append(np.r_[np.zeros(m, dtype=np.int64), np.full(n - m, t.num_exits - 1)])
    straddled = 0
    for exits in cases:
        s = tradeoff.evaluate(t, exits)
        cost = _cost_at(t, exits)
        assert s.p95_cost == float(np.percentile(cost, 95))
        straddled += s.p95_cost not in set(t.uniform_cost.tolist())
        assert s.mean_cost == float(cost.mean())
        assert s.full_cost == float(t.cost[:, -1].mean()) == t.full_cost
        ok = t.correct[np.arange(n), exits][t.labelled]
        assert s.accuracy == float(ok.mean()) and s.n_labelled == int(t.labelled.sum())
        assert s.exit_counts.tolist() == np.bincount(exits, minlength=t.num_exits).tolist()
        for mask in (exits == 0, t.label == 2):
            sl = tradeoff.evaluate_slice(t, exits, mask)
            assert sl.p95_cost == float(np.percentile(cost[mask], 95))
            assert sl.full_cost == float(t.cost[mask, -1].mean())
    assert straddled  # the interpolated case was met
    # per-sample costs (no uniform cost): np.percentile itself
    jitter = t.cost * (1 + 0.01 * rng.uniform(0, 1, (n, 1)))
    tj = dataclasses.replace(t, cost=jitter)
    assert tj.uniform_cost is None
    s = tradeoff.evaluate(tj, cases[0])
    assert s.p95_cost == float(np.percentile(_cost_at(tj, cases[0]), 95))


def test_policy_diagrams_are_the_plain_binnings_to_the_last_bit(traces):
    """of_policy, exit_gaps and exited_reliability read one tally per policy; each must equal
    the plain per-sample computation (``calibration.reliability`` and a loop over exits)."""
    for t in traces:
        outcome = calibration.outcome_table(t)  # what the page passes
        for thr in (0.0, 0.35, 0.6, 0.9, 1.01):
            exits = exit_index(t, Policy("max_prob", threshold=thr))
            o = calibration.policy_outputs(t, exits, outcome=outcome)
            other = calibration.policy_outputs(t, exits)  # binned afresh
            for f in ("exits", "confidence", "correct", "bin"):
                assert np.array_equal(getattr(o, f), getattr(other, f)), f
            assert np.array_equal(o.tally, other.tally)
            # the metrics from the shared correctness are the plain ones
            s = tradeoff.evaluate(t, exits, labelled_correct=o.correct)
            assert repr(s) == repr(tradeoff.evaluate(t, exits))
            with pytest.raises(ValueError, match="one value per labelled sample"):
                tradeoff.evaluate(t, exits, labelled_correct=o.correct[1:])
            lab = t.labelled
            rows = np.arange(t.num_samples)[lab]
            conf = t.max_prob[rows, exits[lab]]
            ok = t.correct[rows, exits[lab]].astype(np.float64)
            ex = exits[lab]
            assert np.array_equal(o.confidence, conf) and np.array_equal(o.correct, ok)
            want = calibration.reliability(conf, ok)
            assert repr(calibration.of_policy(t, exits, outputs=o)) == repr(want)
            per_exit = calibration.exited_reliability(t, exits, outputs=o)
            for e in range(t.num_exits):
                r = calibration.reliability(conf[ex == e], ok[ex == e])
                assert repr(per_exit[e]) == repr(r), (thr, e)
            g = calibration.exit_gaps(t, exits, outputs=o)
            for e in range(t.num_exits):
                m = ex == e
                assert g.count[e] == m.sum()
                if m.any():
                    assert g.confidence[e] == np.bincount(ex, conf, t.num_exits)[e] / m.sum()
                    assert g.accuracy[e] == ok[m].sum() / m.sum()
                else:
                    assert np.isnan(g.confidence[e]) and np.isnan(g.accuracy[e])
            assert g.overall_confidence == float(conf.mean())
            assert g.overall_accuracy == float(ok.mean())
            rates = tradeoff.per_class_exit_rates(t, exits)
            for c in range(t.num_classes):
                m = t.label == c
                want = np.bincount(exits[m], minlength=t.num_exits) / max(1, m.sum())
                assert np.array_equal(rates[c], want), c


def test_gathers_at_the_exits_are_the_elements(traces):
    t = traces[1]
    exits = exit_index(t, Policy("max_prob", threshold=0.7))
    rows = np.arange(t.num_samples)
    arrays = (
        np.ascontiguousarray(t.max_prob),
        np.asfortranarray(t.max_prob),
        t.correct,
        np.ascontiguousarray(t.pred),
        t.pred[:, ::-1],  # neither layout
    )
    for arr, got in zip(arrays, trace_mod.picks(exits, *arrays), strict=True):
        assert np.array_equal(got, arr[rows, exits])
    small = exits.astype(np.int8)  # the flat index must not overflow a narrow exit type
    assert np.array_equal(trace_mod.picks(small, arrays[1])[0], arrays[1][rows, exits])


# --- the page: its cached per-trace data is per trace and per kind ---------------------------


@pytest.mark.parametrize("compact", [False, True])
def test_the_page_shows_each_kind_and_trace_its_own_numbers(page_env, monkeypatch, compact):
    """Two traces and three threshold kinds in one session: the page's metrics are the
    engine's for each (a prepared index reused across kinds or traces would show stale ones)."""
    if compact:
        monkeypatch.setattr(trace_mod, "LAZY_MIN_CELLS", 1000)
    paths = []
    for i, seed in enumerate((5, 6)):
        t = _with_gate(make_trace(n=900 + 100 * i, k=4, c=5, seed=seed, model_id=f"m{i}"), seed)
        paths.append(page_env / f"m{i}.parquet")
        t.write_parquet(paths[-1])
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    for path in paths:
        at.text_input(key="w.trace_path").set_value(str(path))
        at.button(key="b.trace_path").click().run()
        assert not at.exception, at.exception
        t = trace_mod.read(path)
        assert t.is_compact == compact
        for kind, thr in (("max_prob", 0.7), ("entropy", 0.45), ("gate", 0.3), ("max_prob", 0.9)):
            at.selectbox(key="w.kind").set_value(kind).run()
            at.slider(key=f"w.t.{kind}").set_value(thr).run()
            assert not at.exception, at.exception
            got = _metrics(at)
            policy = Policy(kind, threshold=thr)
            for label, value in _expected(t, policy).items():
                assert got[label] == value, (path.name, kind, label)
            # the exit histogram's accuracy per exit (from the policy's gaps, shared)
            exits = exit_index(t, policy)
            lab = t.labelled
            right = t.correct[np.arange(t.num_samples), exits]
            hist = next(
                s for s in _specs(at) if s["layout"]["title"]["text"] == "Where samples exit"
            )
            want = []
            for e in range(t.num_exits):
                m = lab & (exits == e)
                want.append(f"{right[m].mean():.3f}" if m.any() else "–")
            assert hist["data"][0]["hovertext"] == want, (path.name, kind)


def _specs(at: AppTest) -> list[dict]:
    import json

    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_a_compact_traces_uniform_cost_is_one_row_with_the_same_numbers(traces, tmp_path):
    full, compact = traces
    assert compact.cost.strides[0] == 0 and not compact.cost.flags.writeable
    assert np.array_equal(compact.cost, full.cost)
    assert np.array_equal(compact.uniform_cost, full.uniform_cost)
    # per-sample costs stay per sample
    rng = np.random.default_rng(3)
    jitter = dataclasses.replace(full, cost=full.cost * rng.uniform(1, 1.1, (full.num_samples, 1)))
    path = tmp_path / "jitter.parquet"
    jitter.write_parquet(path)
    again = trace_mod.read(path, lazy=True)
    assert again.cost.strides[0] != 0 and np.array_equal(again.cost, jitter.cost)
    exits = exit_index(again, Policy("max_prob", threshold=0.6))
    assert repr(tradeoff.evaluate(again, exits)) == repr(tradeoff.evaluate(jitter, exits))
