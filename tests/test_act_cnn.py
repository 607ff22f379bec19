"""ACT on images: real halting equals the stored unroll, batch independence, trainer, shipped model."""

import json

import numpy as np
import pytest
import torch

from engine.core import stats
from engine.data import images
from engine.families import load_model
from engine.families.act import model as act
from engine.families.act import records as halting
from engine.families.act_cnn import model as act_cnn
from engine.paths import MODELS_DIR


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return act_cnn.build({"width": 8, "stem_width": 4, "groups": 2, "max_steps": 5}).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(24, 1, 28, 28).numpy()


def test_real_halting_matches_the_unroll_at_every_eps(small_model, x):
    h, q = act.halting_scores(small_model, x)
    for eps in (0.0, 0.01, 0.3, 0.6):
        rec = act.run_act(small_model, x, eps=eps)
        steps, rem, ponder, probs = act.outputs_at(h, q, eps)
        assert ((rec["steps"] >= 1) & (rec["steps"] <= 5)).all()
        np.testing.assert_array_equal(rec["steps"], steps)
        np.testing.assert_allclose(rec["remainder"], rem, atol=1e-6)
        np.testing.assert_allclose(rec["probs"], probs, atol=1e-5)
        assert (rec["cum_halt"] <= 1 + 1e-9).all()
        np.testing.assert_allclose(rec["cum_halt"][:, -1], 1.0, atol=1e-9)
        # the stem runs once, then only the steps taken
        expected = act.encode_flops(small_model) + rec["steps"] * act.step_flops(small_model)
        np.testing.assert_allclose(rec["flops"], expected)
        with torch.no_grad():
            dense = small_model(torch.from_numpy(x), eps=eps)
        np.testing.assert_array_equal(dense["steps"].numpy(), rec["steps"])
        np.testing.assert_allclose(dense["probs"].numpy(), rec["probs"], atol=1e-5)


def test_an_image_gets_the_same_answer_alone_or_in_a_batch(small_model, x):
    """Per-sample GroupNorm: halted neighbours leaving the batch change nothing."""
    together = act.run_act(small_model, x)
    for i in (0, 7, 23):
        alone = act.run_act(small_model, x[i : i + 1])
        assert alone["steps"][0] == together["steps"][i]
        np.testing.assert_allclose(alone["probs"][0], together["probs"][i], atol=1e-5)


def test_pondering_does_not_touch_the_encoding(small_model, x):
    """s^0 = e is a copy: updating the state in place must not change what later steps see."""
    first = act.run_act(small_model, x, eps=0.0)
    again = act.run_act(small_model, x, eps=0.0)
    np.testing.assert_array_equal(first["probs"], again["probs"])


def test_max_steps_caps_the_steps(small_model, x):
    rec = act.run_act(small_model, x, eps=0.0, max_steps=2)
    assert rec["steps"].max() <= 2


def test_quick_training_writes_card_and_records(tmp_path):
    from engine.families.act_cnn import train as trainer

    if not images.available("mnist"):
        pytest.skip("MNIST is not installed")
    card = trainer.main(
        [
            "--width", "8", "--max-steps", "4", "--epochs", "1", "--max-train", "256",
            "--max-test", "64", "--max-steps-train", "3", "--threads", "1",
            "--out-dir", str(tmp_path / "models"), "--traces-dir", str(tmp_path / "traces"),
            "--model-id", "tiny_act_cnn", "--quiet",
        ]
    )  # fmt: skip
    m = load_model("tiny_act_cnn", models_dir=tmp_path / "models")
    assert m.config.max_steps == 4 and card["family"] == "act_cnn"
    rec = halting.load_records("tiny_act_cnn", root=tmp_path / "traces" / "records")
    assert rec.h.shape == (64, 4) and rec.image_index is not None and rec.bits is None
    r = halting.at_eps(rec, rec.eps)
    np.testing.assert_array_equal(r.steps, rec.steps)  # stored unroll == real run
    assert r.accuracy == pytest.approx(card["metrics"]["accuracy"], abs=1e-5)
    # difficulty comes from the bundled early-exit trace on the same test images
    if "difficulty" in card["metrics"]:
        assert rec.has_difficulty and set(np.unique(rec.difficulty)) <= set(range(5))


SHIPPED = MODELS_DIR / "mnist_act.json"


@pytest.mark.skipif(not SHIPPED.exists(), reason="mnist_act not bundled")
def test_shipped_weights_load_and_reach_the_cards_numbers():
    if not images.available("mnist"):
        pytest.skip("MNIST is not installed")
    card = json.loads(SHIPPED.read_text())
    m = load_model("mnist_act")  # checks the SHA-256
    test = images.load("mnist", "test")
    x = images.to_model_input(test.images).numpy()
    rec = act.run_act(m, x)
    correct = rec["pred"] == test.labels
    assert correct.mean() == pytest.approx(card["metrics"]["accuracy"], abs=1e-4)
    assert rec["steps"].mean() == pytest.approx(card["metrics"]["mean_steps"], abs=1e-3)
    stored = halting.load_records("mnist_act")
    np.testing.assert_array_equal(stored.image_index, np.arange(len(test.labels)))
    assert (stored.steps != rec["steps"]).mean() < 1e-3  # float noise may flip a tie
    rho = stats.spearman(stored.steps, stored.difficulty)
    assert rho == pytest.approx(
        card["metrics"]["difficulty"]["spearman_steps_vs_difficulty"], abs=1e-3
    )
