"""The few statistics every family's analysis shares (one copy each)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties; NaN if either input is constant
    or there are fewer than 3 pairs."""
    if len(a) < 3:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = stats.spearmanr(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))[0]
    return float(rho)


def seeded_subset(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` of ``n_total`` rows (all rows when
    ``n`` is None or not smaller), so every sweep and trainer draws the same rows."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])
