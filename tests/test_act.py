"""ACT (Graves 2016): halting math, real halting, ponder cost gradient, trainer, shipped weights."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine.core import stats
from engine.families import load_model
from engine.families.act import model as act
from engine.families.act import records as halting
from engine.paths import MODELS_DIR
from engine.registry import list_cards

scores = arrays(
    np.float64, st.tuples(st.integers(1, 6), st.integers(1, 10)), elements=st.floats(0, 1)
)


@settings(max_examples=200, deadline=None)
@given(scores, st.floats(0, 0.5))
def test_halting_distribution_properties(h, eps):
    steps, remainder, p = act.halting_distribution(h, eps)
    m = h.shape[1]
    assert ((steps >= 1) & (steps <= m)).all()  # steps <= max
    cum = np.cumsum(p, axis=1)
    assert (cum <= 1 + 1e-12).all()  # cumulative halting never exceeds 1 after the remainder
    np.testing.assert_allclose(cum[:, -1], 1.0, atol=1e-12)
    assert (p >= -1e-12).all() and (remainder > 0).all()
    for i in range(len(h)):
        n = steps[i]
        np.testing.assert_array_equal(p[i, : n - 1], h[i, : n - 1])  # p^n = h^n before N
        assert p[i, n - 1] == pytest.approx(remainder[i])  # remainder at N
        assert (p[i, n:] == 0).all()
        # N is the first step where the cumulative halting reaches 1 - eps (or the cap)
        c = np.cumsum(h[i])
        hit = np.nonzero(c >= 1 - eps)[0]
        assert n == (hit[0] + 1 if len(hit) else m)


@settings(max_examples=50, deadline=None)
@given(scores, st.floats(0, 0.5), st.integers(1, 10))
def test_torch_and_numpy_halting_agree(h, eps, cap):
    cap = min(cap, h.shape[1])
    s_np, r_np, p_np = act.halting_distribution(h[:, :cap], eps)
    s_t, r_t, p_t = act.halting_torch(torch.from_numpy(h[:, :cap]), eps)
    np.testing.assert_array_equal(s_np, s_t.numpy())
    np.testing.assert_allclose(r_np, r_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(p_np, p_t.numpy(), atol=1e-12)


def test_ponder_cost_gradient_flows_through_the_remainder_only():
    h = torch.tensor([[0.3, 0.4, 0.5, 0.9]], dtype=torch.float64, requires_grad=True)
    steps, remainder, _ = act.halting_torch(h, 0.01)
    assert steps.item() == 3 and remainder.item() == pytest.approx(0.3)
    (steps.double() + remainder).sum().backward()
    # d(N + R)/dh^n = -1 for n < N, 0 at and after N
    np.testing.assert_allclose(h.grad.numpy(), [[-1.0, -1.0, 0.0, 0.0]])


def test_the_ponder_cost_pushes_the_halting_unit_towards_stopping():
    """Graves' loss on a real mean-field pass: the tau * (N + R) term's gradient on the halting
    unit's bias is negative, so gradient descent raises the halting scores (fewer steps)."""
    torch.manual_seed(0)
    model = act.build({"num_bits": 6, "hidden": 16, "max_steps": 7, "halt_bias_init": -1.5})
    x, y, _ = act.parity_data(64, 6, seed=4)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    grads = {}
    for tau in (0.0, 0.5):
        model.zero_grad()
        act.act_loss(model(x), y, tau)[0].backward()
        grads[tau] = float(model.halt.bias.grad[0])
    assert grads[0.5] - grads[0.0] < 0


@pytest.fixture
def one_thread():
    """One torch thread: the test machine is shared, and oversubscribed threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_higher_ponder_cost_trains_a_model_that_ponders_less(one_thread):
    """Short seeded runs of the real trainer from the same start with three ponder weights:
    the mean number of steps on a fixed test set falls as tau grows."""
    from engine.families.act.train import parser, train

    x, _, _ = act.parity_data(512, 4, seed=99)
    mean_steps = []
    for tau in (0.0, 0.01, 0.1):
        argv = ["--num-bits", "4", "--hidden", "16", "--max-steps", "8", "--steps", "150"]
        args = parser().parse_args([*argv, "--batch-size", "32", "--ponder-cost", str(tau)])
        torch.manual_seed(0)
        model = act.ACTNet(act.Config(num_bits=4, hidden=16, max_steps=8))
        train(model, args)
        mean_steps.append(float(act.run_act(model, x)["steps"].mean()))
    assert mean_steps[0] > mean_steps[1] + 0.5 > mean_steps[2] + 1.0, mean_steps


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return act.build({"num_bits": 6, "hidden": 16, "max_steps": 7, "halt_bias_init": -1.5}).eval()


def test_run_act_really_halts_and_matches_the_stored_unroll(small_model):
    x, y, length = act.parity_data(64, 6, seed=3)
    for eps in (0.0, 0.01, 0.3):
        rec = act.run_act(small_model, x, eps=eps)
        assert (rec["steps"] <= 7).all() and (rec["steps"] >= 1).all()
        np.testing.assert_allclose(rec["cum_halt"][:, -1], 1.0, atol=1e-9)
        assert (rec["cum_halt"] <= 1 + 1e-9).all()
        h, q = act.halting_scores(small_model, x)
        steps, rem, ponder, probs = act.outputs_at(h, q, eps)
        np.testing.assert_array_equal(rec["steps"], steps)
        np.testing.assert_allclose(rec["remainder"], rem, atol=1e-9)
        np.testing.assert_allclose(rec["probs"], probs, atol=1e-6)
        np.testing.assert_allclose(rec["ponder_cost"], steps + rem, atol=1e-9)
        # halted inputs are not computed: FLOPs are steps x one step's FLOPs
        np.testing.assert_allclose(rec["flops"], rec["steps"] * act.step_flops(small_model))
        # the dense training forward gives the same answer
        with torch.no_grad():
            out = small_model(torch.from_numpy(x), eps=eps)
        np.testing.assert_array_equal(out["steps"].numpy(), rec["steps"])
        np.testing.assert_allclose(out["probs"].numpy(), rec["probs"], atol=1e-5)


def test_max_steps_caps_the_steps(small_model):
    x, _, _ = act.parity_data(32, 6, seed=4)
    rec = act.run_act(small_model, x, eps=0.0, max_steps=2)
    assert rec["steps"].max() <= 2
    np.testing.assert_allclose(rec["cum_halt"][:, -1], 1.0, atol=1e-9)


def test_parity_data():
    x, y, length = act.parity_data(500, 10, seed=0)
    assert ((x == 0) | (np.abs(x) == 1)).all()
    np.testing.assert_array_equal((x != 0).sum(1), length)
    np.testing.assert_array_equal((x == 1).sum(1) % 2, y)
    assert length.min() >= 1 and length.max() <= 10
    x2, _, _ = act.parity_data(500, 10, seed=0)
    np.testing.assert_array_equal(x, x2)


def test_spearman():
    assert stats.spearman(np.arange(10), np.arange(10) ** 2) == pytest.approx(1.0)
    assert stats.spearman(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)
    assert np.isnan(stats.spearman(np.ones(5), np.arange(5)))


def test_quick_training_writes_loadable_card_and_records(tmp_path):
    from engine.families.act import train as trainer

    trainer.main(
        [
            "--num-bits", "6", "--hidden", "16", "--max-steps", "5", "--steps", "3",
            "--test-size", "50", "--out-dir", str(tmp_path / "models"),
            "--traces-dir", str(tmp_path / "traces"), "--model-id", "tiny_act", "--quiet",
        ]
    )  # fmt: skip
    card = json.loads((tmp_path / "models" / "tiny_act.json").read_text())
    m = load_model("tiny_act", models_dir=tmp_path / "models")
    assert m.config.max_steps == 5
    rec = halting.load_records("tiny_act", root=tmp_path / "traces" / "records")
    assert rec.h.shape == (50, 5)
    r = halting.at_eps(rec, rec.eps)
    np.testing.assert_array_equal(r.steps, rec.steps)  # stored unroll == real run
    assert r.accuracy == pytest.approx(card["metrics"]["accuracy"], abs=1e-5)
    mean_steps = [halting.at_eps(rec, e).steps.mean() for e in (0.0, 0.1, 0.5)]
    assert (np.diff(mean_steps) <= 0).all()  # a larger eps never takes more steps


SHIPPED = [c.model_id for c in list_cards("act")]


@pytest.mark.skipif(not SHIPPED, reason="no ACT parity model bundled")
@pytest.mark.parametrize("model_id", SHIPPED)
def test_shipped_weights_load_and_reach_the_cards_accuracy(model_id):
    card = json.loads((MODELS_DIR / f"{model_id}.json").read_text())
    m = load_model(model_id)  # checks the SHA-256
    n = card["metrics"]["test_samples"]
    x, y, length = act.parity_data(n, m.config.num_bits, seed=card["training"]["test_seed"])
    rec = act.run_act(m, x)
    assert (rec["pred"] == y).mean() == pytest.approx(card["metrics"]["accuracy"], abs=1e-5)
    assert rec["steps"].mean() == pytest.approx(card["metrics"]["mean_steps"], abs=1e-4)
    rho = stats.spearman(rec["steps"], length)
    assert rho == pytest.approx(card["metrics"]["spearman_steps_vs_length"], abs=1e-4)
    stored = halting.load_records(model_id)
    np.testing.assert_array_equal(stored.steps, rec["steps"])
    np.testing.assert_array_equal(stored.difficulty, length)
