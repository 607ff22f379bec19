"""JEI-DNN joint gates (engine.families.multi_exit_cnn.train_jei): the objective on a toy, the
shipped model and its trace, and real gate execution in the runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from engine.core import tradeoff
from engine.core.gates import features, features_torch
from engine.core.policies import Policy, exit_index
from engine.core.trace import Trace, TraceMeta
from engine.families.multi_exit_cnn import train_jei
from engine.families.multi_exit_cnn.model import JointGates

TOY_COST = np.array([0.2, 0.5, 1.0])
TOY_TYPES = (0.5, 0.3, 0.2)  # share of samples first separable at exit 0, 1, 2


def toy(n: int, seed: int):
    """Three exits, two classes: a sample of type t carries its label (far from the noise) in
    the features of exits t and after, and pure noise before. The best any gate can do is to
    stop every sample at its first informative exit, with accuracy 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    t = rng.choice(3, n, p=TOY_TYPES)
    feats = []
    for e in range(3):
        f = rng.normal(0, 1, (n, 4)).astype(np.float32)
        f[:, 0] += np.where(e >= t, 8.0 * (2 * y - 1), 0.0)
        feats.append(torch.from_numpy(f))
    return feats, torch.from_numpy(y), t


def toy_fit(**kw):
    """Train heads and gates jointly on the toy; the test split's gated trace and the types."""
    torch.manual_seed(0)
    feats, y, _ = toy(2000, 0)
    heads = [nn.Linear(4, 2) for _ in range(3)]
    gates = JointGates(3, 2)
    cfg = train_jei.JointConfig(
        warmup_epochs=3, epochs=5, lr=0.03, gate_lr=0.1, **{"cost_weight": 0.5, **kw}
    )
    train_jei.fit_joint(feats, y, heads, gates, TOY_COST, cfg)
    ft, yt, tt = toy(2000, 1)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(h(f), -1) for h, f in zip(heads, ft, strict=True)], 1)
    probs = probs.numpy()
    n = len(yt)
    meta = TraceMeta("toy", ("a", "b", "c"), ("0", "1"), dataset="toy", split="test")
    trace = Trace(meta, np.arange(n), yt.numpy(), probs, np.tile(TOY_COST, (n, 1)))
    return replace(trace, gate=gates.scores(probs)), tt


def test_exit_distribution_sums_to_one_and_is_the_papers():
    g = torch.tensor([[0.2, 0.5, 1.0], [1.0, 0.3, 1.0]])
    q = train_jei.exit_distribution(g)
    torch.testing.assert_close(q, torch.tensor([[0.2, 0.4, 0.4], [1.0, 0.0, 0.0]]))


def test_joint_gates_on_a_separable_toy_reach_the_best_exit():
    trace, types = toy_fit()
    exits = exit_index(trace, Policy("gate", threshold=0.5))
    stats = tradeoff.evaluate(trace, exits)
    ideal = float(TOY_COST[types].mean())  # every sample at its first informative exit
    assert stats.accuracy >= 0.99
    assert stats.accuracy >= tradeoff.oracle_stats(trace).accuracy - 0.01
    assert stats.cost_fraction <= ideal + 0.02
    assert (exits == types).mean() >= 0.97


def test_the_cost_term_and_the_gate_gradient_are_what_teaches_the_gates():
    # with the cost's sign flipped every sample runs to the end
    flipped, _ = toy_fit(cost_weight=-0.5)
    assert tradeoff.evaluate_policy(flipped, Policy("gate", threshold=0.5)).cost_fraction > 0.95
    # with the gates cut off from the loss they stay where they started: wrong half the time
    detached, types = toy_fit(detach_gates=True)
    exits = exit_index(detached, Policy("gate", threshold=0.5))
    assert (exits == types).mean() < 0.8


def test_torch_features_are_the_numpy_ones_and_gate_scores_agree():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=(50, 4)).astype(np.float32)
    p[0, 1] = np.eye(10)[3]  # a one-hot exit: zero entropy
    np.testing.assert_allclose(
        features_torch(torch.from_numpy(p).double()).numpy(), features(p), atol=1e-12
    )
    gates = JointGates(4, 10)
    with torch.no_grad():
        g = gates(torch.from_numpy(p).double().float()).numpy()
    np.testing.assert_allclose(gates.scores(p), g, atol=1e-6)
    # column k reads exits 0..k only: what the runtime relies on
    cut = p.copy()
    cut[:, 2:] = 0
    np.testing.assert_array_equal(gates.scores(cut)[:, :2], gates.scores(p)[:, :2])
    assert (gates.scores(p)[:, -1] == 1).all()


# --- the shipped JEI model, its trace and real gate execution -------------------------------

JEI = "fashion_multi_exit_cnn_jei"
BACKBONE = "fashion_multi_exit_cnn"
SHIPPED_JEI = (JEI, "mnist_multi_exit_cnn_jei")  # each on its SDN model's frozen backbone


@pytest.fixture(scope="module", params=SHIPPED_JEI)
def shipped(request):
    from engine.data.images import load, to_model_input
    from engine.families import load_model
    from engine.registry import get_card
    from engine.trace_store import load_trace

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    card = get_card(request.param)
    data = load(card.dataset, "test")
    yield (
        card.raw,
        load_model(request.param),
        load_trace(request.param, "test", build_if_missing=False),
        to_model_input(data.images),
    )
    torch.set_num_threads(before)


def test_backbone_is_the_sdn_models_frozen_stages_and_gates_ship_in_the_weights(shipped):
    from engine.families import load_model

    card, model, _, _ = shipped
    backbone = card["training"]["backbone"]
    assert card["training"]["mode"] == "jei" and card["model_id"] == f"{backbone}_jei"
    assert card["config"]["gates"] is True and isinstance(model.gates, JointGates)
    base = load_model(backbone)
    for (name, a), (_, b) in zip(
        model.stages.state_dict().items(), base.stages.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # the heads are new: not the backbone's
    assert not torch.equal(model.heads[0].fc.weight, base.heads[0].fc.weight)


def test_bundled_trace_carries_the_models_own_gate_scores(shipped):
    _, model, trace, _ = shipped
    assert trace.meta.extra["gate"]["joint"] is True
    np.testing.assert_array_equal(trace.gate, model.gates.scores(trace.probs))


def test_card_numbers_are_measured_on_the_shipped_weights(shipped):
    card, _, trace, _ = shipped
    jei = card["jei"]
    assert jei["accuracy_within_budget"] == tradeoff.accuracy_within_budgets(
        trace, train_jei.COMPARED, train_jei.BUDGETS
    )
    assert jei["bias_at_gate_0.5"] == train_jei.bias_at_gate(trace)
    o = tradeoff.oracle_stats(trace)
    assert jei["oracle"] == {
        "accuracy": round(o.accuracy, 4),
        "cost_fraction": round(o.cost_fraction, 4),
    }
    np.testing.assert_allclose(
        trace.correct.mean(axis=0), card["metrics"]["test_accuracy"], atol=1e-4
    )


def _gate_policies(trace: Trace) -> list[Policy]:
    """The trained operating point, a threshold equal to a trace score (ties are exact), and a
    strict and a loose one."""
    at_score = float(np.median(trace.gate[:, 0]))
    return [Policy("gate", threshold=t) for t in (0.5, at_score, 0.9, 0.1)]


def test_real_gate_execution_equals_the_trace(shipped):
    from engine.run.runtime import EarlyExitRunner

    _, model, trace, x = shipped
    runner = EarlyExitRunner(model, "torch", device="cpu")
    sub = trace.subset(np.arange(2000))
    rows = np.arange(sub.num_samples)
    for policy in _gate_policies(trace):
        res = runner.run(x[:2000], policy)
        want = exit_index(sub, policy)
        bad = np.flatnonzero(res.exit != want)
        assert bad.size == 0, f"{policy}: {bad.size} differ, e.g. {bad[:5]}"
        assert np.array_equal(res.pred, sub.pred[rows, want]), policy
        assert np.array_equal(res.flops, sub.cost[rows, want]), policy
        assert res.stage_rows[-1] == int((want == 3).sum())  # later stages really skipped
    one = runner.run(x[:64], Policy("gate", threshold=0.5), batch_size=1)
    assert np.array_equal(one.exit, exit_index(sub, Policy("gate", threshold=0.5))[:64])


def test_gate_policy_on_a_model_without_gates_is_refused():
    from engine.core.policies import PolicyError
    from engine.families import load_model
    from engine.run.runtime import run

    x = torch.zeros((2, 1, 28, 28))
    with pytest.raises(PolicyError, match="no learned gates"):
        run(load_model(BACKBONE), x, Policy("gate", threshold=0.5), device="cpu")


# --- the tuning page: three trainings of one CNN on one chart --------------------------------


def _tuning(model_id: str):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(
        str(Path(__file__).resolve().parent.parent / "pages" / "tuning.py"), default_timeout=120
    )
    at.query_params["model"] = model_id
    at.query_params["policy"] = "gate"
    at.query_params["t"] = "0.5"
    return at.run()


def test_tuning_page_compares_the_three_trainings_with_the_engines_numbers(page_env):
    from engine.training_variants import BUDGETS, VARIANTS, variant_curves

    at = _tuning(JEI)
    assert not at.exception, at.exception
    assert any(s.value == "The same CNN trained three ways" for s in at.subheader)
    curves = variant_curves()
    assert [c.model_id for c in curves] == [m for m, _, _ in VARIANTS]
    table = at.table[-1].value
    assert list(table["training"]) == [c.label for c in curves]
    for b in BUDGETS:
        col = list(table[f"≤ {b:.0%} of the cost"])
        assert col == [f"{c.within_budget[f'{b:g}']:.4f}" for c in curves]
    spec = at.get("plotly_chart")[-1].proto.spec
    for _, label, _ in VARIANTS:
        assert label in spec
    # the joint gate's caption says it was trained with the heads, not post hoc
    assert any("trained jointly with the heads" in c.value for c in at.caption)


def test_the_comparison_is_only_shown_for_the_three_trainings(page_env):
    at = _tuning("mnist_multi_exit_cnn")
    assert not at.exception, at.exception
    assert not any(s.value == "The same CNN trained three ways" for s in at.subheader)


# --- the README's numbers are the cards' and the traces' -------------------------------------


def _p1(x: float) -> str:
    return f"{100 * x:.1f}"


def readme_numbers() -> dict[str, str]:
    """Every number the README's JEI / self-distillation paragraph and table row state."""
    from engine.registry import get_card
    from engine.training_variants import variant_curves

    rows = {}
    for c in variant_curves():
        rows[c.model_id] = " / ".join(_p1(c.within_budget[b]) for b in ("0.3", "0.4", "0.5"))
    sdn = get_card(BACKBONE).raw["metrics"]["test_accuracy"]
    sd = get_card("fashion_multi_exit_cnn_sd").raw["metrics"]["test_accuracy"]
    bias = get_card(JEI).raw["jei"]["bias_at_gate_0.5"]
    mnist = get_card("mnist_multi_exit_cnn_jei").raw["jei"]["bias_at_gate_0.5"]
    return {
        "SDN_ROW": rows[BACKBONE],
        "SD_ROW": rows["fashion_multi_exit_cnn_sd"],
        "JEI_ROW": rows[JEI],
        "EXIT0_SD": _p1(sd[0]),
        "EXIT0_SDN": _p1(sdn[0]),
        "LAST_SD": _p1(sd[-1]),
        "LAST_SDN": _p1(sdn[-1]),
        "SD_EXITS": " / ".join(_p1(a) for a in sd),
        "MNIST_GATE_ACC": _p1(mnist["gate"]["accuracy"]),
        "MNIST_GATE_COST": _p1(mnist["gate"]["cost_fraction"]),
        "MNIST_MP_ACC": _p1(mnist["max_prob"]["accuracy"]),
        "GATE_ACC": _p1(bias["gate"]["accuracy"]),
        "GATE_COST": _p1(bias["gate"]["cost_fraction"]),
        "MP_ACC": _p1(bias["max_prob"]["accuracy"]),
        "GATE_GAP": f"{100 * bias['gate']['overall_gap']:+.1f}".replace("-", "−"),
        "MP_GAP": f"{100 * bias['max_prob']['overall_gap']:+.1f}".replace("-", "−"),
    }


README_TEMPLATE = (
    "Best accuracy within 30 / 40 / 50 % of the full cost: joint (SDN)\n"
    "with max-prob {SDN_ROW} %, self-distilled with max-prob {SD_ROW} %, JEI-DNN gates {JEI_ROW} %.\n"
    "Self-distillation lifts the first exit ({EXIT0_SD} vs {EXIT0_SDN} %) and costs the last\n"
    "({LAST_SD} vs {LAST_SDN} %)",
    "The JEI gate at its trained point\n"
    "(0.5) gives {GATE_ACC} % at {GATE_COST} % of the cost, max-prob on the same heads at that "
    "cost\n{MP_ACC} %; the signed confidence gap of its exited samples is {GATE_GAP} points "
    "overall against max-prob's\n{MP_GAP}",
    "self-distilled exits {SD_EXITS} %; JEI gate 0.5: {GATE_ACC} % at {GATE_COST} % of the FLOPs",
    "point {MNIST_GATE_ACC} % at {MNIST_GATE_COST} % of the cost, max-prob on the same heads\n"
    "{MNIST_MP_ACC} %",
)


def test_readme_jei_numbers_are_the_engines():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    nums = readme_numbers()
    for part in README_TEMPLATE:
        assert part.format(**nums) in readme, part.format(**nums)


def test_shipped_fashion_gates_beat_max_prob_at_every_budget_as_the_readme_says():
    from engine.registry import get_card

    table = get_card(JEI).raw["jei"]["accuracy_within_budget"]
    assert all(table["gate"][b] > table["max_prob"][b] for b in table["gate"])


def test_variants_figure_is_valid_plotly_with_a_curve_and_an_oracle_each():
    import plotly.graph_objects as go

    from app.figures_variants import variants_figure
    from engine.training_variants import variant_curves

    curves = variant_curves()
    fig = variants_figure(curves, JEI)
    go.Figure(fig.to_dict())  # raises on any invalid property
    assert len(fig.data) == 2 * len(curves)
    lo, hi = fig.layout.yaxis.range
    assert lo < min(c.within_budget["0.3"] for c in curves) and hi > max(
        c.oracle_accuracy for c in curves
    )
