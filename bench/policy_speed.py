"""Policy and curve speed on a 100,000 x 12 exits x 10 classes trace (issue: foundation).

Targets: one policy evaluation < 5 ms, the whole accuracy-cost curve < 100 ms (medians), and the
ratio against the plain per-sample reference loop. Run: ``python bench/policy_speed.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.core.policies import Policy, exit_index, reference_exit_index  # noqa: E402
from engine.core.tradeoff import curve, evaluate  # noqa: E402
from tests.traces_strategy import make_trace  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    n, k, c = 100_000, 12, 10
    t = make_trace(n, k, c, seed=0)
    warm = median_ms(lambda: (t.max_prob, t.entropy_norm, t.pred, t.correct), 1)
    policy = Policy("max_prob", threshold=0.8)
    one = median_ms(lambda: evaluate(t, exit_index(t, policy)), 21)
    patience = median_ms(lambda: evaluate(t, exit_index(t, Policy("patience", patience=2))), 21)
    full = median_ms(lambda: curve(t, "max_prob"), 7)
    full_entropy = median_ms(lambda: curve(t, "entropy"), 7)
    m = 5_000
    sub = t.subset(np.arange(m))
    ref = median_ms(lambda: reference_exit_index(sub, policy), 1) * n / m
    points = len(curve(t, "max_prob"))
    loop_per_threshold = median_ms(lambda: evaluate(t, exit_index(t, policy)), 5)
    print(
        f"trace: {n:,} samples x {k} exits x {c} classes; torch threads {torch.get_num_threads()}"
    )
    print(f"derived scores, computed once per trace (cached):  {warm:8.1f} ms")
    print(f"one max-prob policy evaluation (median of 21):     {one:8.2f} ms  (target < 5)")
    print(f"one patience policy evaluation (median of 21):     {patience:8.2f} ms")
    print(f"full max-prob curve, {points:,} points (median of 7): {full:8.1f} ms  (target < 100)")
    print(f"full entropy curve (median of 7):                  {full_entropy:8.1f} ms")
    print(f"per-sample reference loop, one policy (from {m:,}): {ref:8.0f} ms")
    print(f"ratio reference / vectorised, one policy:          {ref / one:8.0f} x")
    print(
        "ratio loop-over-thresholds / sort-based curve:     "
        f"{loop_per_threshold * points / full:8.0f} x  ({points:,} evaluations of {loop_per_threshold:.1f} ms)"
    )


if __name__ == "__main__":
    main()
