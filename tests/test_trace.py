import dataclasses

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings

from engine.core.trace import Trace, TraceError, TraceMeta, from_frame, read
from tests.traces_strategy import make_trace, traces


def assert_same(a: Trace, b: Trace) -> None:
    assert a.meta == b.meta
    np.testing.assert_array_equal(a.sample_id, b.sample_id)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.probs.dtype == b.probs.dtype == np.float32
    np.testing.assert_array_equal(a.cost, b.cost)
    for x, y in ((a.gate, b.gate), (a.latency_ms, b.latency_ms)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


@settings(max_examples=30, deadline=None)
@given(traces())
def test_parquet_round_trip_is_lossless(t):
    assert_same(t, read(t.to_parquet_bytes(), "t.parquet"))


def test_parquet_file_round_trip_with_latency_and_extra(tmp_path):
    t = make_trace(50, 3, 4)
    t = dataclasses.replace(
        t,
        latency_ms=np.cumsum(np.ones((50, 3)), axis=1),
        extra={
            "annotator_confidence": np.linspace(0, 1, 50),
            "text": np.array([f"s{i}" for i in range(50)], dtype=object),
        },
    )
    t.write_parquet(tmp_path / "x.parquet")
    back = read(tmp_path / "x.parquet")
    assert_same(t, back)
    np.testing.assert_array_equal(
        back.extra["annotator_confidence"], t.extra["annotator_confidence"]
    )
    assert list(back.extra["text"]) == list(t.extra["text"])


def test_csv_round_trip_and_inferred_metadata():
    t = make_trace(40, 3, 5, unlabelled=0.3)
    back = read(t.to_csv_bytes(), "external_model.csv")
    np.testing.assert_allclose(back.probs, t.probs, atol=1e-7)
    np.testing.assert_array_equal(back.label, t.label)
    assert back.meta.model_id == "external_model"
    assert back.meta.exit_names == ("exit 0", "exit 1", "exit 2")
    assert back.num_classes == 5


def test_logit_columns_are_softmaxed():
    df = pl.DataFrame(
        {
            "sample_id": [0, 1],
            "label": [1, 0],
            "logit_e0_c0": [0.0, 2.0],
            "logit_e0_c1": [0.0, 0.0],
            "cost_e0": [10.0, 10.0],
        }
    )
    t = from_frame(df)
    np.testing.assert_allclose(t.probs[0, 0], [0.5, 0.5])
    assert t.pred[1, 0] == 0


def test_derived_confidences():
    t = make_trace(20, 2, 3)
    p = t.probs.astype(np.float64)
    np.testing.assert_allclose(t.max_prob, p.max(-1))
    s = np.sort(p, -1)
    np.testing.assert_allclose(t.margin, s[..., -1] - s[..., -2])
    h = -(p * np.log(p)).sum(-1) / np.log(3)
    np.testing.assert_allclose(t.entropy_norm, h, rtol=1e-12)
    assert ((t.entropy_norm >= 0) & (t.entropy_norm <= 1)).all()
    np.testing.assert_array_equal(t.correct, t.pred == t.label[:, None])


def frame(t: Trace) -> pl.DataFrame:
    return t.to_frame()


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda df: df.with_columns(pl.lit(float("nan")).alias("prob_e1_c0")), "prob_e*_c*"),
        (lambda df: df.drop("prob_e1_c2"), "prob_e1_c2"),
        (lambda df: df.drop("cost_e2"), "cost_e2"),
        (lambda df: df.with_columns(pl.col("cost_e2") * 0), "cost"),
        (lambda df: df.with_columns(pl.lit(7).alias("label")), "label"),
        (lambda df: df.with_columns(pl.lit(0.9).alias("prob_e0_c0")), "probs"),
        (lambda df: df.drop("sample_id"), "sample_id"),
        (lambda df: df.with_columns(pl.lit(1).alias("sample_id")), "sample_id"),
        (lambda df: df.with_columns(pl.lit("x").alias("cost_e0")), "cost_e0"),
        (lambda df: df.with_columns(pl.lit(float("inf")).alias("cost_e1")), "cost"),
        (lambda df: df.head(0), "probs"),
        (lambda df: df.select("sample_id", "label"), "prob_e{k}_c{c}"),
    ],
)
def test_validation_names_the_field(mutate, field):
    t = make_trace(10, 3, 3)
    with pytest.raises(TraceError) as err:
        from_frame(mutate(frame(t)))
    assert err.value.field == field


def test_metadata_must_match_shapes():
    t = make_trace(10, 3, 3)
    with pytest.raises(TraceError, match="exit_names"):
        dataclasses.replace(t, meta=dataclasses.replace(t.meta, exit_names=("a", "b")))
    with pytest.raises(TraceError, match="class_names"):
        dataclasses.replace(t, meta=dataclasses.replace(t.meta, class_names=("a",)))


@pytest.mark.parametrize(
    "data, name",
    [
        (b"\x00\x01garbage", "x.parquet"),
        (b"PAR1xxxx", "x.parquet"),
        (b"a,b\n1,2\n", "x.csv"),
        (b"", "x.csv"),
        (b"{}", "x.json"),
    ],
)
def test_corrupt_files_raise_trace_error(data, name):
    with pytest.raises(TraceError):
        read(data, name)


def test_malformed_metadata_is_a_trace_error():
    with pytest.raises(TraceError, match="metadata"):
        TraceMeta.from_json("[1, 2]")
    with pytest.raises(TraceError, match="exit_names"):
        TraceMeta.from_json('{"model_id": "m", "exit_names": [1], "class_names": ["a"]}')


def test_subset_keeps_alignment():
    t = make_trace(30, 3, 3, with_gate=True)
    s = t.subset(t.label == 1)
    assert (s.label == 1).all()
    np.testing.assert_array_equal(s.probs, t.probs[t.label == 1])
    np.testing.assert_array_equal(s.gate, t.gate[t.label == 1])


# --- CSV header lines (metadata a single CSV upload can carry) -------------------------------


def _with_header(t: Trace, *lines: str) -> bytes:
    return ("".join(line + "\n" for line in lines)).encode() + t.to_csv_bytes()


def test_csv_header_comments_are_the_metadata():
    t = make_trace(20, 3, 2)
    data = _with_header(
        t,
        "# exported by a gradient-boosting script",  # free text: ignored
        "# cost_unit: trees",
        "# aie.exit_names: 10 trees, 50 trees, 200 trees",
        '# class_names: ["no, never", "yes"]',
        "# model_id: gbm",
        "# dataset: churn",
        "# split: valid",
    )
    back = read(data, "gbm.csv")
    assert back.meta.cost_unit == "trees"
    assert back.meta.exit_names == ("10 trees", "50 trees", "200 trees")
    assert back.meta.class_names == ("no, never", "yes")
    assert (back.meta.model_id, back.meta.dataset, back.meta.split) == ("gbm", "churn", "valid")
    np.testing.assert_allclose(back.probs, t.probs, atol=1e-7)
    np.testing.assert_array_equal(back.sample_id, t.sample_id)


def test_csv_header_comments_from_a_path(tmp_path):
    t = make_trace(10, 2, 2)
    (tmp_path / "x.csv").write_bytes(_with_header(t, "# cost_unit: ms"))
    assert read(tmp_path / "x.csv").meta.cost_unit == "ms"


@pytest.mark.parametrize(
    "line, field",
    [
        ("# exit_names: a, b", "exit_names"),  # 3 exits in the columns
        ("# class_names: a, b, c, d", "class_names"),  # 2 classes
        ("# exit_names: a, a, b", "exit_names"),
        ("# class_names: [1, 2]", "class_names"),
        ("# cost_unit:", "cost_unit"),
        ("# cost-unit: trees", "# cost-unit"),
    ],
)
def test_bad_csv_header_names_the_field(line, field):
    t = make_trace(10, 3, 2)
    with pytest.raises(TraceError) as err:
        read(_with_header(t, line), "x.csv")
    assert err.value.field == field


def test_nan_error_names_the_column_family_and_the_column():
    df = make_trace(10, 3, 3).to_frame()
    df = df.with_columns(pl.Series("prob_e1_c2", [0.1] * 4 + [float("nan")] + [0.1] * 5))
    with pytest.raises(TraceError) as err:
        from_frame(df)
    assert err.value.field == "prob_e*_c*"
    assert "column prob_e1_c2, row 4" in str(err.value)
