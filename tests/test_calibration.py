"""Signed calibration gap of the samples that exit (engine.core.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core import calibration
from engine.core.trace import Trace, TraceMeta


def tiny(scale: float = 1.0) -> Trace:
    """Four samples, two exits, two classes; confidences chosen so the gaps are easy by hand."""
    conf = np.array([[0.9, 0.6], [0.7, 0.8], [0.6, 0.95], [0.8, 0.55]])
    conf = 0.5 + (conf - 0.5) * scale
    label = np.array([0, 0, 1, 1])
    pred = np.array(
        [[0, 0], [1, 0], [0, 1], [1, 1]]
    )  # right: s0 both; s1 exit 1; s2 exit 1; s3 both
    probs = np.empty((4, 2, 2), dtype=np.float32)
    rows = np.arange(4)[:, None]
    probs[rows, np.arange(2), pred] = conf
    probs[rows, np.arange(2), 1 - pred] = 1 - conf
    meta = TraceMeta("tiny", ("e0", "e1"), ("a", "b"))
    return Trace(meta, np.arange(4), label, probs, np.tile([1.0, 2.0], (4, 1)))


def test_signed_gap_by_hand():
    t = tiny()
    exits = np.array([0, 0, 1, 1])
    g = calibration.exit_gaps(t, exits)
    # exit 0: s0 (0.9, right), s1 (0.7, wrong): confidence 0.8, accuracy 0.5, gap +0.3
    # exit 1: s2 (0.95, right), s3 (0.55, right): confidence 0.75, accuracy 1, gap -0.25
    np.testing.assert_array_equal(g.count, [2, 2])
    np.testing.assert_allclose(g.confidence, [0.8, 0.75], atol=1e-6)
    np.testing.assert_allclose(g.accuracy, [0.5, 1.0])
    np.testing.assert_allclose(g.gap, [0.3, -0.25], atol=1e-6)
    assert g.overall_confidence == pytest.approx(0.775, abs=1e-6)
    assert g.overall_accuracy == 0.75
    assert g.overall_gap == pytest.approx(0.025, abs=1e-6)


def test_exit_nobody_leaves_at_is_nan():
    g = calibration.exit_gaps(tiny(), np.zeros(4, dtype=np.int64))
    assert g.count.tolist() == [4, 0]
    assert np.isnan(g.gap[1]) and np.isfinite(g.gap[0])


def test_sign_flips_when_confidences_are_scaled():
    exits = np.array([1, 1, 1, 1])  # all right at exit 1: accuracy 1
    low = calibration.exit_gaps(tiny(0.2), exits)  # confidences near 0.5: under-confident
    assert low.gap[1] < 0 and low.overall_gap < 0
    wrong = np.array([0, 0, 0, 0])  # exit 0: accuracy 0.5
    hi = calibration.exit_gaps(tiny(1.0), wrong)
    lo = calibration.exit_gaps(tiny(0.0), wrong)  # every confidence 0.5 exactly: calibrated
    assert hi.overall_gap > 0 and lo.overall_gap == pytest.approx(0.0, abs=1e-6)
    # scaling confidences towards 0.5 moves the gap down past zero, never up
    gaps = [calibration.exit_gaps(tiny(s), wrong).overall_gap for s in (0.0, 0.5, 1.0)]
    assert gaps == sorted(gaps)


def test_exited_reliability_counts_only_the_samples_that_exit_there():
    t = tiny()
    exits = np.array([0, 0, 1, 1])
    rel = calibration.exited_reliability(t, exits, bins=10)
    assert [int(r.count.sum()) for r in rel] == [2, 2]
    # one exit's diagram over its exited samples agrees with the signed gap's numbers
    r0 = rel[0]
    m = r0.count > 0
    assert np.average(r0.confidence[m], weights=r0.count[m]) == pytest.approx(0.8, abs=1e-6)
