import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.policies import (
    Policy,
    PolicyError,
    exit_index,
    oracle_correct,
    oracle_stable,
    reference_exit_index,
    stop_mask,
)
from engine.core.tradeoff import evaluate
from tests.traces_strategy import make_trace, traces


def policies_for(t, draw):
    k = t.num_exits
    # thresholds drawn from the trace's own scores too, so exact ties are exercised
    pool = np.r_[t.max_prob.ravel(), t.margin.ravel()]
    th = draw(st.one_of(st.floats(0, 1.0001), st.sampled_from(list(pool))))
    ent = draw(st.one_of(st.floats(0, 1), st.sampled_from(list(t.entropy_norm.ravel()))))
    return [
        Policy("max_prob", threshold=float(th)),
        Policy("entropy", threshold=float(ent)),
        Policy("margin", threshold=float(th)),
        Policy("patience", patience=draw(st.integers(0, k))),
        Policy(
            "per_exit", thresholds=tuple(draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)))
        ),
        Policy("gate", threshold=float(draw(st.floats(0, 1)))),
        Policy("fixed", exit=draw(st.integers(0, k - 1))),
    ]


@settings(max_examples=60, deadline=None)
@given(traces(), st.data())
def test_vectorised_equals_per_sample_reference(t, data):
    for policy in policies_for(t, data.draw):
        np.testing.assert_array_equal(
            exit_index(t, policy), reference_exit_index(t, policy), err_msg=str(policy)
        )


@settings(max_examples=40, deadline=None)
@given(traces(), st.data())
def test_raw_probabilities_decide_as_the_trace(t, data):
    """The runtime, inspector, language page and tour pass raw probabilities, not a trace:
    the same function must give the same exits, for a batch and for one sample."""
    for policy in policies_for(t, data.draw):
        want = exit_index(t, policy)
        np.testing.assert_array_equal(exit_index(t.probs, policy, t.gate), want, str(policy))
        g = None if t.gate is None else t.gate[0]
        assert int(exit_index(t.probs[0], policy, g)) == want[0], policy


@settings(max_examples=40, deadline=None)
@given(traces(), st.data())
def test_decision_at_k_ignores_later_exits(t, data):
    """The runtime has only exits 0..k when it decides at k and fills the rest with zeros."""
    k = data.draw(st.integers(0, t.num_exits - 1))
    seen = t.probs.copy()
    seen[:, k + 1 :] = 0
    for policy in policies_for(t, data.draw):
        if policy.kind == "gate":
            continue  # gate scores are given per exit, not derived from probabilities
        np.testing.assert_array_equal(
            stop_mask(policy, seen)[:, k], stop_mask(policy, t)[:, k], str(policy)
        )


def test_decisions_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    assert int(exit_index(probs, Policy("max_prob", threshold=0.85))) == 1
    assert int(exit_index(probs, Policy("max_prob", threshold=0.95))) == 2
    assert int(exit_index(probs, Policy("patience", patience=1))) == 1  # 0 and 1 agree
    assert int(exit_index(probs, Policy("patience", patience=2))) == 2  # the last exit
    assert int(exit_index(probs, Policy("fixed", exit=1))) == 1
    with pytest.raises(PolicyError, match="gate"):
        exit_index(probs, Policy("gate", threshold=0.5))


@settings(max_examples=40, deadline=None)
@given(traces())
def test_threshold_extremes(t):
    last = t.num_exits - 1
    assert (exit_index(t, Policy("max_prob", threshold=0.0)) == 0).all()
    assert (exit_index(t, Policy("max_prob", threshold=1.0 + 1e-9)) == last).all()
    assert (exit_index(t, Policy("entropy", threshold=1.0)) == 0).all()
    assert (exit_index(t, Policy("entropy", threshold=-1e-9)) == last).all()
    assert (exit_index(t, Policy("patience", patience=0)) == 0).all()
    assert (exit_index(t, Policy("patience", patience=t.num_exits)) == last).all()


@settings(max_examples=40, deadline=None)
@given(traces(), st.lists(st.floats(0, 1.01), min_size=2, max_size=6))
def test_max_prob_cost_is_monotone_in_threshold(t, ths):
    ths = sorted(ths)
    exits = [exit_index(t, Policy("max_prob", threshold=x)) for x in ths]
    costs = [evaluate(t, e).mean_cost for e in exits]
    for a, b in zip(exits, exits[1:], strict=False):
        assert (a <= b).all()  # per sample, not only on average
    assert all(x <= y + 1e-9 for x, y in zip(costs, costs[1:], strict=False))


@settings(max_examples=60, deadline=None)
@given(traces(), st.data())
def test_oracle_is_a_lower_bound(t, data):
    oracle = oracle_correct(t, fallback="first")
    o = evaluate(t, oracle)
    for policy in policies_for(t, data.draw):
        exits = exit_index(t, policy)
        s = evaluate(t, exits)
        if t.has_labels:
            assert s.accuracy <= o.accuracy + 1e-12
        # every sample a policy gets right costs at least what the oracle pays for it
        right = t.correct[np.arange(t.num_samples), exits]
        assert (t.cost[right, exits[right]] >= t.cost[right, oracle[right]]).all()
        if t.has_labels and np.isclose(s.accuracy, o.accuracy):
            assert s.mean_cost >= o.mean_cost - 1e-9


def test_oracles_by_hand():
    t = make_trace(200, 5, 4, seed=3)
    oc = oracle_correct(t)
    for n in range(t.num_samples):
        hits = np.nonzero(t.correct[n])[0]
        assert oc[n] == (hits[0] if hits.size else 0)
    assert (oracle_correct(t, fallback="last")[~t.correct.any(1)] == t.num_exits - 1).all()
    st_ = oracle_stable(t)
    for n in range(t.num_samples):
        k = st_[n]
        assert (t.pred[n, k:] == t.pred[n, -1]).all()
        assert k == 0 or t.pred[n, k - 1] != t.pred[n, -1]


def test_policy_json_round_trip_and_errors():
    for p in (
        Policy("max_prob", threshold=0.9),
        Policy("patience", patience=2),
        Policy("per_exit", thresholds=(0.9, 0.8, 0.0)),
        Policy("fixed", exit=1),
    ):
        assert Policy.from_dict(p.to_dict()) == p
    for bad in (
        {"kind": "nope"},
        {"kind": "max_prob"},
        {"kind": "patience", "patience": -1},
        {"threshold": 1},
        [1],
        {"kind": "max_prob", "threshold": "x"},
        {"kind": "max_prob", "threshold": 0.5, "evil": 1},
    ):
        with pytest.raises(PolicyError):
            Policy.from_dict(bad)


def test_policy_errors_are_clear():
    t = make_trace(10, 3, 3)
    with pytest.raises(PolicyError, match="gate"):
        exit_index(t, Policy("gate", threshold=0.5))
    with pytest.raises(PolicyError, match="3 values"):
        exit_index(t, Policy("per_exit", thresholds=(0.5,)))
    with pytest.raises(PolicyError, match="does not exist"):
        exit_index(t, Policy("fixed", exit=7))
