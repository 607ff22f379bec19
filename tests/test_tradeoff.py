import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.compare import oracle_fraction
from engine.core import calibration
from engine.core.policies import PolicyError, exit_index
from engine.core.trace import Trace, TraceMeta
from engine.core.tradeoff import (
    TOL,
    Curve,
    best_within_budget,
    cheapest_with_accuracy,
    curve,
    evaluate,
    evaluate_policy,
    last_exit_stats,
    oracle_stats,
    pareto_front,
    per_class_exit_rates,
)
from tests.traces_strategy import make_trace, traces

KINDS = ("max_prob", "entropy", "margin", "gate", "patience", "fixed")


@settings(max_examples=50, deadline=None)
@given(traces())
def test_curve_equals_evaluating_every_point(t):
    for kind in KINDS:
        c = curve(t, kind)
        assert c.mean_cost[0] == t.cost[:, -1].mean()  # first point: everything at the last exit
        for i in range(len(c)):
            s = evaluate_policy(t, c.policy(i))
            if t.has_labels:
                assert abs(s.accuracy - c.accuracy[i]) < 1e-12, (kind, i)
            assert abs(s.mean_cost - c.mean_cost[i]) < 1e-9 * max(1, s.mean_cost), (kind, i)


@settings(max_examples=50, deadline=None)
@given(traces(), st.floats(0, 1), st.floats(0, 1))
def test_solvers_satisfy_constraints_and_are_optimal(t, acc_target, budget_frac):
    """The feasible sets are the solvers' own (the shared TOL), so an answer always has one."""
    assume(t.has_labels)
    budget = budget_frac * t.cost[:, -1].mean()
    for kind in ("max_prob", "entropy", "patience"):
        c = curve(t, kind)
        i = cheapest_with_accuracy(c, acc_target)
        feasible = c.accuracy >= acc_target - TOL
        if i is None:
            assert not feasible.any()
        else:
            assert feasible[i]
            s = evaluate_policy(t, c.policy(i))
            assert s.accuracy >= acc_target - TOL
            assert c.mean_cost[i] <= c.mean_cost[feasible].min() + 1e-9
            tied = feasible & (c.mean_cost == c.mean_cost[i])
            assert c.accuracy[i] == c.accuracy[tied].max()  # a cost tie goes to the accurate
        j = best_within_budget(c, budget)
        affordable = c.mean_cost <= budget * (1 + TOL)
        if j is None:
            assert not affordable.any()
        else:
            assert affordable[j]
            s = evaluate_policy(t, c.policy(j))
            assert s.mean_cost <= budget * (1 + TOL) + 1e-12
            assert c.accuracy[j] >= c.accuracy[affordable].max() - TOL
            tied = affordable & (c.accuracy == c.accuracy[j])
            assert c.mean_cost[j] == c.mean_cost[tied].min()  # an accuracy tie goes to the cheap


def test_solvers_break_ties_on_a_hand_made_curve():
    #           0     1     2     3     4
    acc = np.array([0.9, 0.8, 0.85, 0.7, 0.85])
    cost = np.array([10.0, 4.0, 4.0, 2.0, 6.0])
    c = Curve("fixed", np.arange(5), acc, cost)
    # cost 4 reaches 0.8 twice over: the tie goes to the more accurate point (2, not 1)
    assert cheapest_with_accuracy(c, 0.8) == 2
    assert cheapest_with_accuracy(c, 0.75) == 2
    assert cheapest_with_accuracy(c, 0.7) == 3
    assert cheapest_with_accuracy(c, 0.95) is None
    # 0.85 within budget 6 twice over: the tie goes to the cheaper point (2, not 4)
    assert best_within_budget(c, 6.0) == 2
    assert best_within_budget(c, 4.0) == 2
    assert best_within_budget(c, 1.0) is None
    assert best_within_budget(c, 10.0) == 0
    # the shared tolerance: a target a rounding error away from a point still reaches it
    assert cheapest_with_accuracy(c, 0.85 + TOL / 2) == 2
    assert best_within_budget(c, 4.0 * (1 - TOL / 2)) == 2


def test_speedup_against_a_hand_computed_trace():
    # 4 samples, 3 exits; cumulative cost of reaching each exit
    cost = np.array([[1.0, 3.0, 6.0], [1.0, 3.0, 6.0], [2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])
    label = np.array([0, 1, 0, 1])
    probs = np.zeros((4, 3, 2), np.float32)
    probs[:, :, 0] = 1.0  # every exit says class 0
    meta = TraceMeta("hand", ("a", "b", "c"), ("x", "y"), "synthetic", "test")
    t = Trace(meta, np.arange(4), label, probs, cost)
    s = evaluate(t, np.array([0, 1, 2, 0]))
    # costs taken 1, 3, 8, 2 -> mean 3.5; everything to the last exit: (6+6+8+8)/4 = 7
    assert s.mean_cost == 3.5 and s.full_cost == 7.0
    assert s.speedup == 2.0  # full / mean: twice as fast, not half
    assert s.cost_fraction == 0.5
    assert s.accuracy == 0.5  # samples 0 and 2 have label 0
    assert s.p95_cost == np.percentile([1.0, 3.0, 8.0, 2.0], 95)
    np.testing.assert_array_equal(s.exit_counts, [2, 1, 1])
    assert last_exit_stats(t).speedup == 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1)), min_size=1, max_size=40))
def test_pareto_front_is_exactly_the_undominated_points(points):
    cost = np.array([p[0] for p in points])
    acc = np.array([p[1] for p in points])
    front = set(pareto_front(cost, acc).tolist())
    for i in range(len(points)):
        dominated = (
            (cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))
        ).any()
        if dominated:
            assert i not in front
    # every undominated (cost, acc) value is represented
    values = {(cost[i], acc[i]) for i in front}
    for i in range(len(points)):
        if not ((cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))).any():
            assert (cost[i], acc[i]) in values


def test_stats_and_reference_points():
    t = make_trace(500, 4, 3, seed=1)
    last = last_exit_stats(t)
    assert last.speedup == 1.0 and last.exit_counts[-1] == 500
    assert np.isclose(last.accuracy, t.correct[:, -1].mean())
    o = oracle_stats(t)
    assert o.accuracy == t.correct.any(1).mean()
    assert o.mean_cost <= last.mean_cost
    exits = exit_index(t, curve(t, "max_prob").policy(50))
    s = evaluate(t, exits)
    assert s.exit_counts.sum() == 500
    assert s.p95_cost == np.percentile(t.cost[np.arange(500), exits], 95)
    rates = per_class_exit_rates(t, exits)
    np.testing.assert_allclose(rates.sum(1), 1.0)
    c0 = t.label == 0
    np.testing.assert_allclose(rates[0], np.bincount(exits[c0], minlength=4) / c0.sum())


def test_unlabelled_samples_are_left_out_of_accuracy():
    t = make_trace(300, 3, 3, seed=2, unlabelled=0.5)
    s = last_exit_stats(t)
    lab = t.label != -1
    assert s.n_labelled == lab.sum()
    assert np.isclose(s.accuracy, (t.pred[lab, -1] == t.label[lab]).mean())


def test_reliability_and_ece():
    conf = np.array([0.95] * 100 + [0.55] * 100)
    correct = np.array([1] * 95 + [0] * 5 + [1] * 50 + [0] * 50)
    r = calibration.reliability(conf, correct, bins=10)
    assert r.count.sum() == 200
    assert np.isclose(r.ece, 0.5 * abs(0.95 - 0.95) + 0.5 * abs(0.5 - 0.55))
    perfect = calibration.reliability(np.full(10, 1.0), np.ones(10))
    assert perfect.ece == 0.0
    t = make_trace(400, 3, 3)
    per = calibration.per_exit(t)
    assert len(per) == 3 and all(0 <= r.ece <= 1 for r in per)
    pol = calibration.of_policy(t, np.full(400, 2))
    assert np.isclose(pol.ece, per[2].ece)


def _tiny_trace():
    """4 samples, 3 exits costing 1, 3, 10; labels all 0. Right at exits: {0}, {1, 2}, {2}, {}."""
    right, wrong = [0.9, 0.1], [0.1, 0.9]
    probs = np.array(
        [
            [right, right, right],
            [wrong, right, right],
            [wrong, wrong, right],
            [wrong, wrong, wrong],
        ],
        dtype=np.float32,
    )
    meta = TraceMeta("tiny", ("a", "b", "c"), ("yes", "no"))
    cost = np.tile([1.0, 3.0, 10.0], (4, 1))
    return Trace(meta, np.arange(4), np.zeros(4, dtype=np.int64), probs, cost)


def test_oracle_conventions_by_hand():
    """Never-right samples are charged at the first exit or at the last: only cost changes."""
    t = _tiny_trace()
    first, last = oracle_stats(t, "first"), oracle_stats(t, "last")
    assert first.accuracy == last.accuracy == 0.75
    # earliest correct exits cost 1, 3, 10; the never-right sample costs 1 or 10
    assert first.mean_cost == (1 + 3 + 10 + 1) / 4
    assert last.mean_cost == (1 + 3 + 10 + 10) / 4
    assert first.speedup == 10 / 3.75 and last.speedup == 10 / 6
    assert first.exit_counts.tolist() == [2, 1, 1] and last.exit_counts.tolist() == [1, 1, 2]
    assert oracle_stats(t).mean_cost == first.mean_cost  # the default is unchanged
    with pytest.raises(PolicyError):
        oracle_stats(t, "middle")


def test_oracle_fraction_conventions_by_hand():
    t = _tiny_trace()
    np.testing.assert_array_equal(oracle_fraction(t), [0.1, 0.3, 1.0, 1.0])
    np.testing.assert_array_equal(oracle_fraction(t, "first"), [0.1, 0.3, 1.0, 0.1])
