"""PonderNet (Banino 2021): halting distribution, geometric prior, real halting vs records,
early termination, the prior's pull on the steps, reproducible training, shipped weights."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine.core.stats import spearman
from engine.families import load_model
from engine.families.act.model import parity_data, step_flops
from engine.families.pondernet import model as pn
from engine.families.pondernet import records
from engine.families.pondernet import train as trainer
from engine.paths import MODELS_DIR
from engine.registry import get_card, list_cards

scores = arrays(
    np.float64, st.tuples(st.integers(1, 6), st.integers(1, 10)), elements=st.floats(0, 1)
)


def test_halting_distribution_by_hand():
    lam = np.array([0.5, 0.2, 0.4, 0.9])
    # p_1 = .5, p_2 = .5 * .2, p_3 = .5 * .8 * .4, p_4 = the remainder .5 * .8 * .6 (lam_4 unused)
    np.testing.assert_allclose(pn.halting_distribution(lam), [0.5, 0.1, 0.16, 0.24], atol=1e-15)
    np.testing.assert_allclose(pn.expected_steps(pn.halting_distribution(lam)), 2.14)
    p = np.array([0.1, 0.3, 0.4, 0.2])
    assert [int(pn.threshold_steps(p, q)) for q in (0.05, 0.3, 0.5, 0.81, 1.0)] == [1, 2, 3, 4, 4]


@settings(max_examples=200, deadline=None)
@given(scores)
def test_halting_distribution_sums_to_one_and_matches_torch(lam):
    p = pn.halting_distribution(lam)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
    # the log-space torch version used in training is the same distribution
    a = torch.logit(torch.from_numpy(lam).clamp(1e-6, 1 - 1e-6))
    p_t = pn.log_halting_distribution(a).exp().numpy()
    np.testing.assert_allclose(p_t, pn.halting_distribution(torch.sigmoid(a).numpy()), atol=1e-9)


def test_kl_to_the_geometric_prior():
    lambda_p, m = 0.2, 6
    prior = pn.log_geometric_prior(lambda_p, m).exp().numpy()
    want = [lambda_p * (1 - lambda_p) ** (n - 1) for n in range(1, m)] + [(1 - lambda_p) ** (m - 1)]
    np.testing.assert_allclose(prior, want, atol=1e-12)
    a = torch.full((3, m), float(np.log(lambda_p / (1 - lambda_p))), dtype=torch.float64)
    np.testing.assert_allclose(
        pn.kl_to_prior(pn.log_halting_distribution(a), lambda_p), 0, atol=1e-12
    )
    a[:, 1] += 1.0  # halting more at step 2 than the prior does
    assert (pn.kl_to_prior(pn.log_halting_distribution(a), lambda_p) > 1e-3).all()


def test_ponder_loss_is_the_expected_cross_entropy_plus_beta_kl():
    torch.manual_seed(0)
    a, logits = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    out = {"a": a, "log_p": pn.log_halting_distribution(a), "logits": logits}
    loss, rec, kl = pn.ponder_loss(out, y, 0.3, 0.5)
    p = pn.halting_distribution(torch.sigmoid(a).numpy())
    ce = -torch.log_softmax(logits, 2)[torch.arange(4), :, y].numpy()  # [4, 5]
    assert rec.item() == pytest.approx((p * ce).sum(1).mean())
    assert kl.item() == pytest.approx(pn.kl_to_prior(out["log_p"], 0.3).mean().item())
    assert loss.item() == pytest.approx(rec.item() + 0.5 * kl.item())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A quick-trained model with its card and records in a temporary folder."""
    root = tmp_path_factory.mktemp("pondernet")
    argv = ["--quick", "--quiet", "--out-dir", str(root / "models"), "--traces-dir", str(root)]
    trainer.main([*argv, "--model-id", "tiny_pondernet"])
    card = json.loads((root / "models" / "tiny_pondernet.json").read_text())
    model = load_model("tiny_pondernet", models_dir=root / "models")
    rec = records.load_records("tiny_pondernet", root=root / "records")
    x, y, _ = parity_data(len(rec.label), 12, seed=card["training"]["test_seed"])
    return root, card, model, rec, x, y


def test_real_run_equals_the_records_at_several_q(quick):
    _, card, model, rec, x, y = quick
    np.testing.assert_array_equal(rec.label, y)
    np.testing.assert_array_equal(rec.difficulty, (x != 0).sum(1))
    seen = set()
    for q in (0.05, 0.3, 0.5, 0.7, 0.95):
        real, ev = pn.run(model, x, q), records.at_q(rec, q)
        np.testing.assert_array_equal(real.steps, ev.steps)
        np.testing.assert_array_equal(real.pred, ev.pred)
        np.testing.assert_allclose(real.probs, ev.probs, atol=1e-6)
        np.testing.assert_allclose(real.flops, ev.flops)  # torch's count == encoder + N x step
        seen.add(round(float(real.steps.mean()), 6))
    assert len(seen) >= 3  # the q really changed where the model halts
    for seed in (0, 1):
        real, ev = pn.run(model, x, sample=True, seed=seed), records.at_sample(rec, seed)
        np.testing.assert_array_equal(real.steps, ev.steps)
        np.testing.assert_array_equal(real.pred, ev.pred)
    # the real run at the card's q is the one stored, and reaches the card's accuracy
    np.testing.assert_array_equal(rec.steps, records.at_q(rec, rec.q).steps)
    assert records.at_q(rec, rec.q).accuracy == pytest.approx(card["metrics"]["accuracy"])
    mean_steps = [records.at_q(rec, q).steps.mean() for q in records.Q_GRID]
    assert (np.diff(mean_steps) >= 0).all()  # a higher q never halts sooner


def test_early_termination_drops_halted_rows(quick):
    _, _, model, _, x, _ = quick
    rows: list[int] = []
    handle = model.cell.register_forward_hook(lambda mod, inp, out: rows.append(len(inp[0])))
    try:
        real = pn.run(model, x, 0.9)
    finally:
        handle.remove()
    assert rows[0] == len(x) and rows[-1] < rows[0]
    assert all(b <= a for a, b in zip(rows, rows[1:], strict=False))
    # step n is computed for exactly the inputs still running, and no step after the last halt
    assert rows == [int((real.steps > n).sum()) for n in range(real.steps.max())]
    np.testing.assert_allclose(real.flops, real.steps * step_flops(model))  # FLOPs follow
    assert sum(rows) == real.steps.sum()


def _mean_steps(tmp_path, name, lambda_p, beta):
    card = trainer.main(
        [
            "--num-bits", "6", "--hidden", "16", "--max-steps", "10", "--steps", "150",
            "--lambda-p", str(lambda_p), "--beta", str(beta), "--test-size", "300",
            "--out-dir", str(tmp_path), "--no-traces", "--model-id", name, "--quiet",
        ]
    )  # fmt: skip
    return card["metrics"]["mean_expected_steps"], card["metrics"]["mean_steps"]


def test_a_stronger_pull_toward_a_higher_lambda_p_halts_sooner(tmp_path):
    loose = _mean_steps(tmp_path, "loose", 0.1, 0.01)
    tight = _mean_steps(tmp_path, "tight", 0.5, 1.0)
    assert tight[0] < loose[0] - 1.0 and tight[1] < loose[1]
    assert tight[0] == pytest.approx(2.0, abs=0.5)  # the prior's mean, 1 / lambda_p


def test_quick_training_is_bit_for_bit_reproducible(quick, tmp_path):
    _, card, _, _, _, _ = quick
    trainer.main(
        ["--quick", "--quiet", "--out-dir", str(tmp_path), "--traces-dir", str(tmp_path),
         "--model-id", "tiny_pondernet"]
    )  # fmt: skip
    again = json.loads((tmp_path / "tiny_pondernet.json").read_text())
    assert again["weights_sha256"] == card["weights_sha256"]
    assert again["metrics"] == card["metrics"]
    assert card["module"] == "engine.families.pondernet.model" and card["family"] == "pondernet"


SHIPPED = [c.model_id for c in list_cards("pondernet")]


@pytest.mark.skipif(not SHIPPED, reason="no PonderNet model bundled")
@pytest.mark.parametrize("model_id", SHIPPED)
def test_shipped_card_is_reached_from_the_weights_and_the_records(model_id):
    card = json.loads((MODELS_DIR / f"{model_id}.json").read_text())
    assert get_card(model_id).module == "engine.families.pondernet.model"
    m, met = load_model(model_id), card["metrics"]  # load_model checks the SHA-256
    x, y, length = parity_data(
        met["test_samples"], m.config.num_bits, card["training"]["test_seed"]
    )
    real = pn.run(m, x)
    assert (real.pred == y).mean() == pytest.approx(met["accuracy"], abs=1e-5)
    assert real.steps.mean() == pytest.approx(met["mean_steps"], abs=1e-4)
    assert spearman(real.steps, length) == pytest.approx(met["spearman_steps_vs_length"], abs=1e-4)
    rec = records.load_records(model_id)
    np.testing.assert_array_equal(rec.steps, real.steps)
    np.testing.assert_array_equal(rec.difficulty, length)
    ev = records.at_q(rec, card["config"]["q"])
    assert ev.accuracy == pytest.approx(met["accuracy"], abs=1e-5)
    assert ev.steps.mean() == pytest.approx(met["mean_steps"], abs=1e-4)
    assert records.mean_expected_steps(rec) == pytest.approx(met["mean_expected_steps"], abs=1e-4)
    assert records.at_sample(rec, 0).accuracy == pytest.approx(met["sampled_accuracy"], abs=1e-5)
