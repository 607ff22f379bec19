"""JEI-DNN joint gates (engine.families.multi_exit_cnn.train_jei): the objective on a toy, the
shipped model and its trace, and real gate execution in the runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
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
