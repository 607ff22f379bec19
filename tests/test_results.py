"""The one result type every family produces: Parquet round trip, the validator names the bad
field, and the multi-exit trace's view over its threshold is the trace's own numbers."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core import results
from engine.core.policies import Policy, exit_index
from engine.core.results import Results, at, from_trace
from engine.core.trace import TraceError
from tests.helpers_app import make_trace


def _results(s=3, n=5) -> Results:
    rng = np.random.default_rng(0)
    return Results(
        "toy",
        "q",
        np.linspace(0.1, 0.9, s),
        np.arange(n) * 10,
        rng.integers(0, 2, n),
        rng.uniform(1, 5, (s, n)),
        np.full(n, 6.0),
        rng.uniform(size=(s, n)) > 0.5,
        rng.integers(0, 2, (s, n)),
        None,
        {"steps": rng.integers(1, 5, (s, n))},
        {"difficulty": rng.integers(0, 3, n)},
        {"model_id": "toy", "cost_unit": "FLOPs"},
    )


def test_parquet_round_trip_is_lossless(tmp_path):
    r = _results()
    back = results.read_parquet(r.write_parquet(tmp_path / "r.parquet"))
    assert back.name == "toy" and back.setting == "q" and back.meta["model_id"] == "toy"
    for f in ("settings", "sample_id", "label", "cost", "full_cost", "correct", "pred"):
        np.testing.assert_array_equal(getattr(back, f), getattr(r, f))
    np.testing.assert_array_equal(back.detail["steps"], r.detail["steps"])
    np.testing.assert_array_equal(back.extra["difficulty"], r.extra["difficulty"])


@pytest.mark.parametrize(
    "field, bad",
    [
        ("cost", lambda r: r.cost[:, :-1]),
        ("cost", lambda r: -r.cost),
        ("full_cost", lambda r: np.zeros_like(r.full_cost)),
        ("sample_id", lambda r: np.zeros_like(r.sample_id)),
        ("correct", lambda r: r.correct[:1]),
    ],
)
def test_the_validator_names_the_bad_field(field, bad):
    r = _results()
    kwargs = {f: getattr(r, f) for f in r.__dataclass_fields__}
    kwargs[field] = bad(r)
    with pytest.raises(TraceError) as e:
        Results(**kwargs)
    assert e.value.field == field


def test_a_damaged_file_is_a_trace_error(tmp_path):
    p = tmp_path / "r.parquet"
    _results().write_parquet(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(TraceError):
        results.read_parquet(p)


def test_from_trace_is_the_trace_evaluated_at_each_threshold():
    t = make_trace(400, 4, 5, seed=3)
    r = from_trace(t, "ee")
    for i in (0, len(r.settings) // 2, len(r.settings) - 1):
        exits = exit_index(t, Policy("max_prob", threshold=float(r.settings[i])))
        np.testing.assert_array_equal(r.detail["exit"][i], exits)
        rows = np.arange(t.num_samples)
        np.testing.assert_array_equal(r.cost[i], t.cost[rows, exits])
        np.testing.assert_array_equal(r.correct[i], t.correct[rows, exits])
    a = at(r, r.settings[1])
    assert a.accuracy == pytest.approx(r.accuracy[1])
