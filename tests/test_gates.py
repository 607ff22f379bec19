"""Learned exit gates (engine.core.gates) and the bundled traces that carry their scores."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from engine import gate_build
from engine.core import gates, tradeoff
from engine.core.policies import Policy, exit_index, oracle_correct
from engine.core.trace import Trace, TraceMeta
from engine.registry import get_card
from engine.trace_store import load_trace, trace_file

GATED = (
    "mnist_multi_exit_cnn",
    "fashion_multi_exit_cnn",
    "fashion_multi_exit_cnn_sd",
    "digits_multi_exit_cnn",
    "tweets_multi_exit_minilm",
)


def toy(n: int = 800, seed: int = 0) -> Trace:
    """Three exits, two classes, four kinds of sample that a per-exit gate can tell apart but
    max-prob cannot: wrong exits are *more* confident (0.95) than right ones (0.8), and samples
    no exit gets right sit at 0.55 everywhere."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n).astype(np.int64)
    first_right = rng.integers(0, 4, n)  # 3 = never right
    conf = np.where(np.arange(3) >= first_right[:, None], 0.8, 0.95)
    conf[first_right == 3] = 0.55
    conf = conf + rng.uniform(-0.02, 0.02, conf.shape)
    right = np.arange(3) >= first_right[:, None]
    pred = np.where(right, label[:, None], 1 - label[:, None])
    probs = np.empty((n, 3, 2), dtype=np.float32)
    rows = np.arange(n)[:, None]
    probs[rows, np.arange(3), pred] = conf
    probs[rows, np.arange(3), 1 - pred] = 1 - conf
    meta = TraceMeta("toy", ("a", "b", "c"), ("0", "1"), dataset="toy", split="test")
    cost = np.tile([1.0, 2.0, 3.0], (n, 1))
    return Trace(meta, np.arange(n, dtype=np.int64), label, probs, cost)


def test_target_is_right_now_or_no_later_exit_is_right():
    t = toy(400)
    y = gates.target(t)
    c = t.correct
    for n in range(t.num_samples):
        for k in range(t.num_exits):
            assert y[n, k] == (c[n, k] or not c[n, k + 1 :].any())
    # the last exit is always a right place to stop, and the perfect gate is the oracle
    assert y[:, -1].all()
    perfect = replace(t, gate=y.astype(np.float32))
    np.testing.assert_array_equal(
        exit_index(perfect, Policy("gate", threshold=0.5)), oracle_correct(t, "first")
    )


@pytest.mark.parametrize("hidden", [0, 8])
def test_gate_on_a_separable_toy_reaches_the_oracle(hidden):
    fitted = gates.fit(toy(seed=0), hidden=hidden)
    test = toy(seed=1)  # fresh samples from the same problem
    t = replace(test, gate=fitted.score(test.probs))
    oracle = tradeoff.oracle_stats(t)
    at_half = tradeoff.evaluate_policy(t, Policy("gate", threshold=0.5))
    assert at_half.accuracy == oracle.accuracy
    assert at_half.mean_cost == pytest.approx(oracle.mean_cost)
    # max-prob cannot: its confident exits are the wrong ones
    mp = tradeoff.curve(t, "max_prob")
    reach = mp.accuracy >= oracle.accuracy
    assert reach.any() and mp.mean_cost[reach].min() > oracle.mean_cost + 0.3


def test_fit_is_deterministic_and_scores_lie_in_unit_interval():
    t = toy(600, seed=3)
    a = gates.fit(t, hidden=8, seed=5).score(t.probs)
    b = gates.fit(t, hidden=8, seed=5).score(t.probs)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert (a[:, -1] == 1).all()  # every sample may stop at the last exit


def test_features_read_only_the_exits_up_to_k():
    # stop_mask's contract: column k may not depend on exits after k
    t = toy(50)
    p = t.probs.copy()
    p[:, 2] = p[:, 2, ::-1]
    f0, f1 = gates.features(t.probs), gates.features(p)
    np.testing.assert_array_equal(f0[:, :2], f1[:, :2])
    assert not np.array_equal(f0[:, 2], f1[:, 2])


def test_cross_fit_scores_every_sample_out_of_fold():
    t = toy(400)
    s = gates.cross_fit_scores(t, folds=2, seed=0)
    assert s.shape == (t.num_samples, t.num_exits)
    np.testing.assert_array_equal(s, gates.cross_fit_scores(t, folds=2, seed=0))


@pytest.mark.parametrize("model_id", GATED)
def test_bundled_trace_carries_gates_and_nothing_else_changed(model_id):
    t = load_trace(model_id, build_if_missing=False)
    assert t.gate is not None and t.gate.shape == (t.num_samples, t.num_exits)
    card = json.loads(gate_build.card_file(model_id).read_text())
    # probabilities, labels, cost and latency are those of the trace before the gate was added
    assert gate_build.columns_digest(t) == card["trace_digest"]
    metrics = get_card(model_id).raw["metrics"]
    acc = metrics.get("test_accuracy") or metrics["test_accuracy_per_exit"]
    np.testing.assert_allclose(t.correct.mean(axis=0), acc, atol=6e-5)
    assert t.meta.extra["gate"]["fitted_on"] == card["data"]["fitted_on"]
    assert card["joint_training"] is False


@pytest.mark.parametrize("model_id", GATED)
def test_card_reports_the_gate_against_thresholds_as_measured(model_id):
    """Mechanics, not a hoped-for win: the card's matched-budget table is what the curves say."""
    t = load_trace(model_id, build_if_missing=False)
    card = json.loads(gate_build.card_file(model_id).read_text())
    assert card["accuracy_within_budget"] == tradeoff.accuracy_within_budgets(
        t, gate_build.COMPARED, gate_build.BUDGETS
    )
    np.testing.assert_allclose(
        card["test_target_agreement"], gates.target_accuracy(t, t.gate), atol=5e-5
    )
    table = card["accuracy_within_budget"]
    # the gate's best point within each budget is a real point of its curve
    c = tradeoff.curve(t, "gate")
    full = float(t.cost[:, -1].mean())
    for b, acc in table["gate"].items():
        i = tradeoff.best_within_budget(c, float(b) * full)
        assert acc == round(float(c.accuracy[i]), 4)
        assert c.mean_cost[i] <= float(b) * full * (1 + tradeoff.TOL)
    assert table["gate"]["0.8"] <= card["oracle"]["accuracy"]


def test_gate_build_on_the_toy_like_pipeline_rewrites_only_the_gate(tmp_path, monkeypatch):
    """The CLI with --cross-fit writes a trace whose other columns are unchanged."""
    model_id = "digits_multi_exit_cnn"
    monkeypatch.setattr(gate_build, "TRACES_DIR", tmp_path)
    out = tmp_path / "gated.parquet"
    before = load_trace(model_id, build_if_missing=False)
    card = gate_build.build(model_id, cross_fit=True, hidden=0, seed=0, out=out)
    from engine.core.trace import read_parquet

    after = read_parquet(out, model_id)
    assert gate_build.columns_digest(after) == gate_build.columns_digest(before)
    assert card["data"]["fitted_on"].startswith("test split, 2 seeded folds")
    assert (tmp_path / f"{model_id}__gate.json").exists()
    assert trace_file(model_id).exists()  # the bundled trace was not touched


@pytest.mark.parametrize(
    ("model_id", "said"),
    [("mnist_multi_exit_cnn", "−2.2 overall"), ("tweets_multi_exit_minilm", "+12.0 overall")],
)
def test_readme_bias_numbers_are_the_engines(model_id, said):
    from pathlib import Path

    from engine.core import calibration

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    t = load_trace(model_id, build_if_missing=False)
    g = calibration.exit_gaps(t, exit_index(t, Policy("max_prob", threshold=0.9)))
    assert f"{100 * g.overall_gap:+.1f}".replace("-", "−") + " overall" == said
    assert said in readme
