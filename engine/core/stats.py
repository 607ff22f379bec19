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


def by_level(level: np.ndarray, values: np.ndarray, correct: np.ndarray):
    """Per distinct ``level`` (a difficulty, a class): (levels, mean value, std of value,
    accuracy, count) — e.g. ponder steps by string length."""
    level = np.asarray(level)
    levels = np.unique(level)
    mean = np.array([values[level == k].mean() for k in levels])
    std = np.array([values[level == k].std() for k in levels])
    acc = np.array([correct[level == k].mean() for k in levels])
    count = np.array([(level == k).sum() for k in levels])
    return levels, mean, std, acc, count
