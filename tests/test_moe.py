"""Mixture-of-experts models: routing statistics, sparse execution, FLOPs, training, uploads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.costs import count_flops
from engine.data import images as image_data
from engine.families.moe import analysis as moe
from engine.families.moe.model import (
    Experts,
    FlopMeter,
    Routing,
    build,
    dynamic_k,
    top_k_with_capacity,
)

E, T = 8, 16


def small(router: str, seed: int = 0):
    torch.manual_seed(seed)
    return build({"router": router, "depth": 2, "dim": 32, "expert_hidden": 8}).eval()


def rand_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)


SOFTMAX_SETTINGS = [Routing(k=k, capacity_factor=c) for k in (1, 2) for c in (1.0, 1.25, None)]
NORM_SETTINGS = [Routing(tau=t) for t in (0.0, 0.3, 0.7, 1.0)]


@pytest.mark.parametrize(
    "router,routing",
    [("softmax", r) for r in SOFTMAX_SETTINGS] + [("norm", r) for r in NORM_SETTINGS],
)
def test_sparse_execution_equals_dense_compute_then_mask(router, routing):
    model = small(router)
    x = image_data.to_model_input(rand_images(12))
    with torch.no_grad():
        sparse = model(x, routing)
        masked = model(x, routing, dense_masked=True)
    torch.testing.assert_close(sparse.logits, masked.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(sparse.layers, masked.layers, strict=True):
        assert torch.equal(a.chosen, b.chosen)


def test_sparse_layer_runs_only_selected_experts(monkeypatch):
    """Each expert is called once, on exactly the tokens routed to it."""
    model = small("softmax")
    layer = model.moe_layers[0]
    seen = {}
    original = layer.experts.expert

    def spy(e, x):
        seen[e] = len(x)
        return original(e, x)

    monkeypatch.setattr(layer.experts, "expert", spy)
    z = torch.randn(3, T, 32)
    with torch.no_grad():
        _, info = layer(z, Routing(k=1, capacity_factor=None))
    counts = info.chosen.sum((0, 1))
    assert seen == {e: int(c) for e, c in enumerate(counts) if c > 0}
    assert sum(seen.values()) == 3 * T  # k=1, no capacity limit: each token once


@pytest.mark.parametrize("routing", SOFTMAX_SETTINGS)
def test_loads_sum_to_token_count_and_k_is_respected(routing):
    model = small("softmax")
    rec = moe.run(model, rand_images(20), routing)
    n, layers, tokens, experts = rec.chosen.shape
    s = moe.stats(rec, np.arange(20) % 10, 10)
    load = np.array(s["load"])
    assert load.shape == (layers, experts)
    # every token-expert assignment is counted once: k per token minus the dropped ones
    np.testing.assert_array_equal(load.sum(1), n * tokens * routing.k - rec.dropped.sum((0, 2)))
    ept = rec.experts_per_token
    assert ept.max() <= routing.k
    np.testing.assert_array_equal(ept + rec.dropped, routing.k)  # chosen + dropped = k
    if routing.capacity_factor is None:
        assert rec.dropped.sum() == 0
        np.testing.assert_array_equal(load.sum(1), n * tokens * routing.k)
    else:
        cap = math.ceil(routing.capacity_factor * tokens * routing.k / experts)
        assert rec.chosen.sum(2).max() <= cap  # per sample, layer, expert
    np.testing.assert_allclose(np.array(s["usage"]).sum(1), 1.0, atol=1e-5)
    assert math.isclose(sum(s["experts_per_token_hist"]), (ept > 0).mean(), abs_tol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.sampled_from([0.5, 1.0, 1.25, 2.0]),
    st.integers(0, 10_000),
)
def test_capacity_keeps_highest_priority_tokens(k, cf, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(2, T, E, generator=g) * 3, -1)
    chosen, dropped = top_k_with_capacity(probs, k, cf)
    wanted = torch.zeros_like(chosen).scatter_(-1, probs.topk(k, -1).indices, True)
    cap = math.ceil(cf * T * k / E)
    assert (chosen & ~wanted).sum() == 0  # only the router's top-k can run
    assert chosen.sum(1).max() <= cap
    assert torch.equal(dropped, (wanted & ~chosen).sum(-1))
    for b in range(2):
        for e in range(E):
            kept = probs[b, chosen[b, :, e], e]
            lost = probs[b, wanted[b, :, e] & ~chosen[b, :, e], e]
            if len(kept) and len(lost):
                assert kept.min() >= lost.max()
            if len(lost):
                assert len(kept) == cap  # an expert drops only when full


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0, 1), st.floats(0, 1))
def test_dynamic_k_rule(seed, t1, t2):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(40, E, generator=g) * (torch.rand(40, 1, generator=g) * 3)
    lo, hi = min(t1, t2), max(t1, t2)
    a, b = dynamic_k(pred, lo), dynamic_k(pred, hi)
    assert (b & ~a).sum() == 0  # raising tau never adds an expert
    assert (b.sum(-1) >= 1).all()
    assert b.gather(-1, pred.argmax(-1, keepdim=True)).all()  # the largest always runs
    inside = (pred >= hi * pred.amax(-1, keepdim=True)) & (pred > 0)
    assert (inside & ~b).sum() == 0
    assert dynamic_k(pred, 0.0).all()
    assert (dynamic_k(pred, 1.0).sum(-1) == 1).all()


def test_tau_extremes_on_the_model():
    model = small("norm")
    x = image_data.to_model_input(rand_images(10))
    with torch.no_grad():
        all_experts = model(x, Routing(tau=0.0))
        one = model(x, Routing(tau=1.0))
        dense = model.forward_dense(x)
    assert all(bool(r.chosen.all()) for r in all_experts.layers)  # tau=0: every expert
    torch.testing.assert_close(all_experts.logits, dense, atol=1e-5, rtol=1e-5)  # = dense
    assert all(bool((r.chosen.sum(-1) == 1).all()) for r in one.layers)  # tau=1: one


@pytest.mark.parametrize(
    "router,routing", [("softmax", Routing(k=2, capacity_factor=1.0)), ("norm", Routing(tau=0.6))]
)
def test_flops_are_counted_per_sample_and_add_up(router, routing):
    model = small(router, seed=1)
    x = image_data.to_model_input(rand_images(9, seed=3))
    meter = FlopMeter(len(x))
    with torch.no_grad():
        model(x, routing, meter=meter)
    total, _ = count_flops(lambda: model(x, routing))
    assert math.isclose(float(meter.flops.sum()), total, rel_tol=1e-9)
    rec = moe.run(model, rand_images(9, seed=3), routing)
    assert math.isclose(float(rec.flops.sum()), total, rel_tol=1e-9)
    # expert FLOPs follow the number of experts that ran
    per_expert_token = 2 * 2 * 32 * 8  # two matmuls [1,32]x[32,8], [1,8]x[8,32]
    ept = rec.experts_per_token.sum((1, 2))
    shared = rec.flops - per_expert_token * ept
    np.testing.assert_allclose(shared, shared[0], rtol=1e-9)


def test_fewer_experts_fewer_flops():
    model = small("norm")
    imgs = rand_images(8)
    f = [moe.run(model, imgs, Routing(tau=t)).flops.mean() for t in (0.0, 0.5, 1.0)]
    assert f[0] > f[1] >= f[2]
    assert f[0] > moe.dense_flops(model)  # the routers cost a little on top of dense


def test_regroup_keeps_the_dense_mlp():
    from engine.families.moe.train import balanced_clusters

    torch.manual_seed(0)
    ex = Experts(16, 4, 6)
    x = torch.randn(30, 16)
    before = ex.dense(x)
    perm = balanced_clusters(ex.hidden(x).T, 4, seed=0)
    assert sorted(perm.tolist()) == list(range(24))
    ex.regroup(perm)
    torch.testing.assert_close(ex.dense(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex.all_outputs(x).sum(1) + ex.b2, before, atol=1e-5, rtol=1e-5)


def test_sweep_progress_and_compute_score():
    model = small("norm")
    imgs, labels = rand_images(30), np.arange(30) % 10
    calls = []
    pts = moe.sweep(
        model,
        imgs,
        labels,
        [Routing(tau=t) for t in (0, 0.5, 1)],
        progress=lambda done, total, label: calls.append((done, total)),
    )
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert [p["experts_per_token_mean"] for p in pts][0] == E
    assert pts[-1]["experts_per_token_mean"] == 1
    score = moe.compute_score(model, imgs, 0.5)
    assert score.shape == (30,) and (score >= 1).all() and (score <= E).all()


@pytest.mark.parametrize("variant", ["topk", "dynamic"])
def test_trainer_quick_run_writes_a_loadable_card(tmp_path, variant):
    from engine.families import load_model
    from engine.families.moe.train import main

    main([
        "--variant", variant, "--dataset", "digits", "--max-train", "128", "--max-test", "64",
        "--epochs", "1", "--router-epochs", "1", "--sweep-samples", "32", "--depth", "2",
        "--dim", "32", "--batch-size", "64", "--out-dir", str(tmp_path),
        "--sweep-out", str(tmp_path / "sweep.json"), "--model-id", "tiny_moe", "--quiet",
    ])  # fmt: skip
    card = json.loads((tmp_path / "tiny_moe.json").read_text())
    assert card["family"] == "moe" and card["variant"] == variant
    assert card["training_command"].startswith("python -m engine.train moe --variant")
    n_settings = 12 if variant == "dynamic" else 8
    assert len(card["metrics"]["sweep"]) == n_settings
    model = load_model("tiny_moe", tmp_path)
    assert model.config.router == ("norm" if variant == "dynamic" else "softmax")
    sweep = moe.load_sweep(tmp_path / "sweep.json")
    assert len(sweep["points"]) == n_settings and sweep["points"][0]["samples"] == 32


def _expert_imbalance(model, x) -> float:
    """Coefficient of variation of the tokens each expert receives (top-1, no capacity limit),
    averaged over layers: 0 when every expert gets the same share."""
    with torch.no_grad():
        out = model(x, Routing(k=1, capacity_factor=None))
    loads = torch.stack([layer.chosen.sum((0, 1)) for layer in out.layers]).double()
    return float((loads.std(1, unbiased=False) / loads.mean(1)).mean())


@pytest.fixture
def one_thread():
    """One torch thread: the test machine is shared, and oversubscribed threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_load_balancing_loss_evens_out_the_experts_in_training(one_thread):
    """A short seeded run of the real trainer with aux weight 0 and 1 from the same start:
    the Switch loss must leave the experts more evenly loaded (and actually change the run)."""
    from engine.families.moe.train import parse, train_topk

    gen = torch.Generator().manual_seed(0)
    templates = torch.rand(4, 1, 28, 28, generator=gen)
    y = torch.randint(0, 4, (256,), generator=gen)
    x = templates[y] + 0.3 * torch.randn(256, 1, 28, 28, generator=gen)
    cfg = {"depth": 2, "dim": 32, "expert_hidden": 8, "num_experts": 4, "num_classes": 4}
    cfg["capacity_factor"] = None  # no drops: only the loss can balance the experts
    imbalance = {}
    for seed in (0, 1, 2):
        for w in (0.0, 1.0):
            torch.manual_seed(seed)
            model = build(cfg)
            argv = ["--aux-weight", str(w), "--epochs", "2", "--batch-size", "32", "--lr", "3e-3"]
            args = parse([*argv, "--weight-decay", "0", "--quiet"])
            train_topk(model, x, y, args)
            imbalance[seed, w] = _expert_imbalance(model.eval(), x)
    for seed in (0, 1, 2):
        assert imbalance[seed, 1.0] < imbalance[seed, 0.0], imbalance
    mean = {w: np.mean([imbalance[s, w] for s in (0, 1, 2)]) for w in (0.0, 1.0)}
    assert mean[1.0] < 0.75 * mean[0.0], imbalance


# --- the bundled models -------------------------------------------------------------------

BUNDLED = ["fashion_moe_vit", "fashion_d2dmoe_vit"]


@pytest.mark.parametrize("model_id", BUNDLED)
def test_bundled_model_and_sweep(model_id):
    from engine.families import load_model
    from engine.registry import get_card

    card = get_card(model_id)
    model = load_model(model_id)
    assert model.config.num_experts >= 8 and model.config.depth >= 2
    assert card.weights_path.stat().st_size < 3_000_000
    sweep = moe.load_sweep(moe.sweep_file(model_id))
    labels = [p["setting"] for p in sweep["points"]]
    assert labels == [r.label() for r in moe.settings_for(model)]
    acc = {p["setting"]: p["accuracy"] for p in sweep["points"]}
    assert min(acc.values()) > 0.6 and max(acc.values()) > 0.8
    if model.config.router == "norm":
        ept = [p["experts_per_token_mean"] for p in sweep["points"]]
        assert (
            ept[0] == 8 and ept[-1] == 1 and all(a >= b for a, b in zip(ept, ept[1:], strict=False))
        )


def test_gallery_falls_back_to_bundled_examples(monkeypatch):
    def unavailable(name, split="test"):
        raise image_data.DatasetUnavailable("not installed")

    monkeypatch.setattr(image_data, "load", unavailable)
    data, where = moe.gallery("fashion_mnist")
    assert "bundled" in where and data.images.shape[1:] == (28, 28) and len(data) >= 100
    assert set(data.labels.tolist()) == set(range(10))
