"""Hypothesis strategies and factories for random traces, shared by the foundation tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from engine.core.trace import Trace, TraceMeta


def make_trace(
    n: int = 200,
    k: int = 4,
    c: int = 3,
    seed: int = 0,
    levels: int | None = None,
    with_gate: bool = False,
    unlabelled: float = 0.0,
) -> Trace:
    """A random trace whose later exits are more confident on average, like a real model.

    ``levels`` quantises the logits so that ties between scores are common.
    """
    rng = np.random.default_rng(seed)
    label = rng.integers(0, c, n)
    signal = np.linspace(0.2, 3.0, k)[None, :, None] * np.eye(c)[label][:, None, :]
    logits = rng.normal(size=(n, k, c)) + signal
    if levels:
        logits = np.round(logits * levels / 4) / (levels / 4)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    cost = np.cumsum(rng.integers(1, 5, size=(n, k)).astype(np.float64), axis=1)
    if unlabelled:
        label = np.where(rng.random(n) < unlabelled, -1, label)
    gate = rng.random((n, k)).astype(np.float32) if with_gate else None
    meta = TraceMeta(
        model_id="random",
        exit_names=tuple(f"exit {i}" for i in range(k)),
        class_names=tuple(f"class {j}" for j in range(c)),
        dataset="synthetic",
        split="test",
    )
    return Trace(meta, np.arange(n), label.astype(np.int64), probs, cost, gate=gate)


@st.composite
def traces(draw, max_n: int = 30, max_k: int = 6, max_c: int = 5) -> Trace:
    return make_trace(
        n=draw(st.integers(1, max_n)),
        k=draw(st.integers(1, max_k)),
        c=draw(st.integers(2, max_c)),
        seed=draw(st.integers(0, 2**31)),
        levels=draw(st.sampled_from([None, 2, 4])),
        with_gate=True,
        unlabelled=draw(st.sampled_from([0.0, 0.3])),
    )
