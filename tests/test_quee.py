"""QuEE's learned choice (engine.core.quee): the budget is met, tightly; with a separable gain it
reaches the oracle; the real runtime takes the simulated decisions; fits are deterministic; the
card and the README say what the records give."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from engine import quee_build
from engine.core import quee

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("mnist_multi_exit_cnn", "fashion_multi_exit_cnn")


def bundled(model_id: str) -> dict:
    path = quee_build.records_file(model_id)
    if not path.exists():
        pytest.skip(f"no QuEE records for {model_id}")
    return quee_build.load(path)


def card(model_id: str) -> dict:
    return json.loads(quee_build.card_file(model_id).read_text())


# --- a toy problem with a separable gain ---------------------------------------------------------


def toy(n_per: int = 200, seed: int = 0) -> quee.QueeRecords:
    """Two exits, two classes, four groups told apart by exit 0's confidence: A right at exit 0;
    B wrong at 0, right at exit 1 in float32 and in int8; C right at 1 in float32 only; D never
    right. Label 0 everywhere; a small jitter keeps the features continuous."""
    rng = np.random.default_rng(seed)
    conf0 = {"A": 0.95, "B": 0.80, "C": 0.70, "D": 0.60}
    right0 = {"A": True, "B": False, "C": False, "D": False}
    right1 = {"A": True, "B": True, "C": True, "D": False}
    right8 = {"A": True, "B": True, "C": False, "D": False}
    probs, pred8 = [], []
    for g in "ABCD":
        c = conf0[g] + rng.uniform(-0.01, 0.01, n_per)
        p0 = np.stack([c, 1 - c], 1) if right0[g] else np.stack([1 - c, c], 1)
        p1 = np.tile([0.9, 0.1] if right1[g] else [0.1, 0.9], (n_per, 1))
        probs.append(np.stack([p0, p1], 1))
        q = np.full((n_per, 2, 2), -1)
        q[:, 0, :] = 0
        q[:, 1, 1] = 0 if right8[g] else 1
        pred8.append(q)
    probs = np.concatenate(probs).astype(np.float32)
    pred8 = np.concatenate(pred8)
    conf8 = np.where(pred8 >= 0, 0.9, np.nan).astype(np.float32)
    return quee.QueeRecords(np.zeros(len(probs), np.int64), probs, pred8, conf8)


TOY_COSTS = quee.Costs(np.array([1.0, 1.0]), np.array([1.0, 0.25]))


def test_toy_separable_gain_reaches_the_oracle():
    rec = toy()
    gains = quee.fit(rec, hidden=8, seed=0)
    # the plan each group should take: A exit (0.5), B int8 (0.625), C float (1), D exit (0.5)
    full_plan = (0.5 + 0.625 + 1.0 + 0.5) / 4
    for budget in (0.5, 0.55, 0.6, full_plan, 0.9):
        learned = quee.simulate(rec, quee.solve(rec, gains, TOY_COSTS, budget))
        best = quee.oracle(rec, TOY_COSTS, budget)
        assert learned.mean_cost <= budget + 1e-12 and best.mean_cost <= budget + 1e-12
        print(f"budget {budget:.3f}: learned {learned.accuracy:.4f}, oracle {best.accuracy:.4f}")
        assert learned.accuracy >= best.accuracy - 2 / rec.num_samples
    at_full = quee.simulate(rec, quee.solve(rec, gains, TOY_COSTS, full_plan))
    assert at_full.accuracy == 0.75
    groups = np.repeat(np.arange(4), 200)
    assert (at_full.int8_from[groups == 1] == 1).all()  # B continues in int8
    assert (at_full.int8_from[groups == 2] == 2).all() and (at_full.exit[groups == 2] == 1).all()
    assert (at_full.exit[(groups == 0) | (groups == 3)] == 0).all()  # A and D exit at once


def test_decide_is_gain_minus_lambda_cost():
    act, target = quee.decide(
        np.array([[0.1, 0.5], [0.0, 0.0], [0.3, 0.2]]),
        np.array([[0.1, 0.45], [0.0, 0.0], [0.3, 0.0]]),
        np.array([0.2, 0.6]),
        np.array([0.1, 0.3]),
        lam=0.5,
    )
    # row 0: float best 0.2, int8 best 0.30 (at the second exit); row 1: nothing gains: exit;
    # row 2: float 0.2 vs int8 0.25
    assert act.tolist() == [quee.INT8, quee.EXIT, quee.INT8]
    assert target.tolist() == [1, 0, 0]


# --- the budget -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("cost_model", ["measured", "nominal"])
def test_choice_respects_the_budget_tightly(model_id, cost_model):
    b = bundled(model_id)
    rec, gains, costs = b["fit"], b["gains"], b["costs"][cost_model]
    ceiling = quee.simulate(rec, quee.Choice(gains, costs, 0.0)).mean_cost
    floor = costs.float_exit()[0]
    for budget in (0.35, 0.45, 0.6, 0.8):
        choice = quee.solve(rec, gains, costs, budget)
        spent = quee.simulate(rec, choice).mean_cost
        assert spent <= budget + 1e-12, (budget, spent)
        # tight: within half a percent of the budget unless λ = 0 already spends less
        assert budget - spent <= 0.005 or (choice.lam == 0 and spent == ceiling), (budget, spent)
        assert spent >= floor
    cheapest = quee.solve(rec, gains, costs, 0.0)  # below the floor: everything exits at once
    assert quee.simulate(rec, cheapest).mean_cost == pytest.approx(floor)


def test_costs_of_paths():
    c = quee.costs_from([2.0, 1.0, 1.0], [0.0, 0.0, 0.0], 0.5)
    assert np.allclose(c.float_exit(), [0.5, 0.75, 1.0])
    p = c.int8_path()
    assert np.allclose(p[0], [0.25, 0.375, 0.5]) and np.allclose(p[1, 1:], [0.625, 0.75])
    assert np.isinf(p[2, :2]).all() and p[2, 2] == pytest.approx(0.875)


# --- the baselines agree with the runtime rules --------------------------------------------------


def test_float_only_is_max_prob_early_exit():
    from engine.core.policies import Policy, exit_index
    from engine.core.trace import Trace, TraceMeta

    b = bundled(MODELS[0])
    rec, costs = b["test"], b["costs"]["measured"]
    t = Trace(
        TraceMeta("q", tuple(map(str, range(rec.num_exits))), tuple(map(str, range(10)))),
        np.arange(rec.num_samples),
        rec.label,
        rec.probs,
        np.tile(costs.float_exit(), (rec.num_samples, 1)),
    )
    for thr in (0.5, 0.9, 0.999):
        o = quee.float_only(rec, costs, thr)
        assert np.array_equal(o.exit, exit_index(t, Policy("max_prob", threshold=thr)))


# --- simulated = real ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_real():
    from engine.data import images
    from engine.families import load_model
    from engine.run.runtime import EarlyExitRunner

    b = bundled(MODELS[0])
    model = load_model(MODELS[0]).eval()
    train = images.load("mnist", "train")
    calib = images.to_model_input(train.images[: quee_build.CALIB])
    x = images.to_model_input(images.load("mnist", "test").images[:600])
    runner = EarlyExitRunner(model, "quee", model_id=MODELS[0], calibration=calib, threads=1)
    return b, runner, x


@pytest.mark.parametrize("cost_model", ["measured", "nominal"])
def test_simulated_decisions_are_the_real_ones(mnist_real, cost_model):
    from engine.core.policies import Policy

    b, runner, x = mnist_real
    rec = b["test"].subset(slice(0, len(x)))
    for budget in (0.4, 0.6):
        choice = quee.solve(b["fit"], b["gains"], b["costs"][cost_model], budget)
        sim = quee.simulate(rec, choice)
        real = runner.run(x, Policy("max_prob", threshold=2.0), quee_choice=choice)
        assert np.array_equal(real.exit, sim.exit)
        assert np.array_equal(real.int8_from, sim.int8_from)
        assert np.array_equal(real.pred == rec.label, sim.correct)
        int8 = sim.int8_from < rec.num_exits
        print(f"{cost_model} {budget}: {int8.mean():.1%} int8, accuracy {sim.accuracy:.4f}")
        if cost_model == "nominal":
            assert int8.any() and (sim.exit[int8] >= sim.int8_from[int8]).all()


def test_band_rule_simulation_is_the_runtime_band(mnist_real):
    from engine.core.policies import Policy

    b, runner, x = mnist_real
    rec = b["test"].subset(slice(0, len(x)))
    sim = quee.band_rule(rec, b["costs"]["measured"], 0.95, 0.5)
    real = runner.run(x, Policy("max_prob", threshold=0.95), quee_band=0.5)
    assert np.array_equal(real.exit, sim.exit) and np.array_equal(real.int8_from, sim.int8_from)
    assert (sim.int8_from < rec.num_exits).any()


def test_a_learned_choice_needs_the_quee_backend():
    from engine.core.policies import Policy
    from engine.families import load_model
    from engine.run.runtime import run

    b = bundled(MODELS[0])
    choice = quee.Choice(b["gains"], b["costs"]["measured"], 0.1)
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match="quee"):
        run(
            load_model(MODELS[0]).eval(),
            x,
            Policy("max_prob", threshold=0.5),
            "torch",
            device="cpu",
            quee_choice=choice,
        )


# --- determinism, card, README -------------------------------------------------------------------


def test_fit_is_deterministic_and_the_stored_regressors_are_the_fit():
    b = bundled(MODELS[0])
    again = quee.fit(b["fit"], hidden=b["gains"].hidden, seed=b["gains"].seed)
    for stored, refit in zip(
        b["gains"].gain_float + b["gains"].gain_int8,
        again.gain_float + again.gain_int8,
        strict=True,
    ):
        for w0, w1 in zip(stored.weights, refit.weights, strict=True):
            assert np.array_equal(w0, w1)
    c = quee.solve(b["fit"], b["gains"], b["costs"]["measured"], 0.5)
    o1, o2 = quee.simulate(b["test"], c), quee.simulate(b["test"], c)
    assert np.array_equal(o1.exit, o2.exit) and np.array_equal(o1.cost, o2.cost)


@pytest.mark.parametrize("model_id", MODELS)
def test_card_numbers_are_what_the_records_give(model_id):
    b = bundled(model_id)
    cd = card(model_id)
    assert cd["records_sha256"] == quee_build.digest(quee_build.records_file(model_id))
    assert np.allclose(cd["test_accuracy"]["float_exits"], b["test"].correct.mean(0), atol=5e-5)
    for name, costs in b["costs"].items():
        want = quee_build.simulated(b["test"], b["fit"], b["gains"], costs, cd["band"])
        assert cd["simulated"][name] == json.loads(json.dumps(want)), name
    ratio = cd["int8_cost"]["measured_ratio"]
    assert np.allclose(
        b["costs"]["measured"].int8_stage / b["costs"]["measured"].float_stage, ratio, atol=5e-5
    )
    assert cd["int8_cost"]["int8_cheaper_here"] == (
        sum(cd["int8_cost"]["stage_ms_int8"]) < sum(cd["int8_cost"]["stage_ms_float"])
    )
    for r in cd.get("real", {}).get("runs", []):
        # the real run took the simulated decisions, so its accuracy is the simulated one
        assert r["decisions_agree"] == 1.0 and r["accuracy"] == r["simulated_accuracy"], r


def test_readme_quee_paragraph_matches_the_card():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- quee -->(.*?)<!-- /quee -->", text, re.S)
    assert m, "README has no QuEE paragraph"
    para = " ".join(m.group(1).split())
    fashion, mnist = card("fashion_multi_exit_cnn"), card("mnist_multi_exit_cnn")
    for budget in ("0.4", "0.5"):
        sim = fashion["simulated"]["measured"][budget]
        for rule in ("learned", "float", "band", "int8"):
            assert f"{sim[rule]['accuracy']:.4f}" in para, (budget, rule)
    for rule in ("learned", "float", "int8"):
        assert f"{mnist['simulated']['measured']['0.5'][rule]['accuracy']:.4f}" in para
    assert f"{fashion['test_accuracy']['int8_only_exits'][-1]:.4f} against " in para
    assert f"{fashion['test_accuracy']['float_exits'][-1]:.4f} in float32" in para
    for cd in (fashion, mnist):
        ratio = sum(cd["int8_cost"]["stage_ms_int8"]) / sum(cd["int8_cost"]["stage_ms_float"])
        assert f"{ratio:.2f}× " in para and cd["int8_cost"]["int8_cheaper_here"]
        assert "batch 256" in para and cd["int8_cost"]["batch"] == 256
    first, *later = fashion["int8_cost"]["measured_ratio"]
    assert f"{first:.2f}× on the 28×28 stem stage" in para
    assert f"{min(later):.2f}–{max(later):.2f}× on the later ones" in para
    nom = fashion["simulated"]["nominal"]["0.5"]
    assert f"{nom['learned']['accuracy']:.4f}" in para
    assert f"({nom['int8']['accuracy']:.4f} at {nom['int8']['cost'] * 100:.0f} %)" in para
    real = {(r["budget"], r["rule"]): r for r in fashion["real"]["runs"]}
    assert (
        f"{real[(0.5, 'learned')]['ms_over_full_float']:.2f}× the float32 full model's wall-clock "
        f"against {real[(0.5, 'float')]['ms_over_full_float']:.2f}× for float32-only" in para
    )
    n_test = int(fashion["data"]["test"].removeprefix("test split, first ").split()[0])
    assert f"(card, {n_test:,} images;" in para


def test_builder_refuses_a_model_without_exits_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        quee_build.main(["mnist_act", "--no-real"])
    assert e.value.code == 2
    assert "stages" in capsys.readouterr().err
