"""Big traces: read compactly (lazily, by column) with the same answers as a full read, and
loaded into the tuning page from a path on this machine (the browser upload stays limited)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app import loaders
from bench import make_big_trace
from engine.core import calibration, tradeoff
from engine.core import trace as trace_mod
from engine.core.policies import Policy, exit_index, oracle_correct
from engine.core.trace import TraceError
from engine.run import inspection
from tests.helpers_app import make_trace

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "tuning.py")
MEDIUM = 200_000  # samples x 12 exits x 10 classes, made in a few seconds
ARRAYS = ("sample_id", "label", "cost", "pred", "max_prob", "entropy_norm", "margin", "correct")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A small trace with every optional column (gate, latency, an extra) as Parquet."""
    t = make_trace(n=1500, k=4, c=10, seed=3)
    rng = np.random.default_rng(0)
    t = dataclasses.replace(
        t,
        gate=rng.uniform(0, 1, (t.num_samples, t.num_exits)).astype(np.float32),
        latency_ms=np.cumsum(rng.uniform(0.1, 1, (t.num_samples, t.num_exits)), axis=1),
        extra={"source": np.array([f"s{i % 7}" for i in range(t.num_samples)])},
        label=np.where(np.arange(t.num_samples) % 11 == 0, -1, t.label),  # some unlabelled
    )
    path = tmp_path_factory.mktemp("small") / "small.parquet"
    t.write_parquet(path)
    return path


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    return make_big_trace.make(tmp_path_factory.mktemp("medium") / "medium.parquet", MEDIUM, 12, 10)


def _both(path: Path):
    return trace_mod.read(path, lazy=False), trace_mod.read(path, lazy=True)


def test_lazy_read_equals_the_full_read(small):
    full, lazy = _both(small)
    assert not full.is_compact and lazy.is_compact
    assert isinstance(lazy.probs, trace_mod.LazyProbs)
    assert lazy.meta == full.meta and lazy.probs.shape == full.probs.shape
    for name in ARRAYS:
        assert np.array_equal(getattr(lazy, name), getattr(full, name)), name
    for name in ("gate", "latency_ms"):
        assert np.array_equal(getattr(lazy, name), getattr(full, name)), name
    assert np.array_equal(lazy.extra["source"], full.extra["source"])
    # whole distributions come back from the file for the rows asked for
    lab = np.flatnonzero(full.labelled)[:50]
    for index in (7, -1, (7, 2), slice(100, 140), (lab, -1, full.label[lab]), full.label == 3):
        assert np.array_equal(lazy.probs[index], full.probs[index]), index
    sub = lazy.subset(np.arange(200, 260))
    assert np.array_equal(sub.probs[5], full.probs[205])
    assert np.array_equal(sub.max_prob, full.max_prob[200:260])
    x, y = inspection.difficulty_order(full), inspection.difficulty_order(lazy)
    assert all(np.array_equal(a, b) for a, b in zip(x, y, strict=True))


def test_lazy_read_of_logits_and_csv(tmp_path, small):
    full = trace_mod.read(small, lazy=False)
    df = full.to_frame()
    logits = df.rename({c: c.replace("prob_", "logit_") for c in df.columns if "prob_" in c})
    logits = logits.with_columns(pl.col(c).log() for c in logits.columns if "logit_" in c)
    lpath = tmp_path / "logits.parquet"
    logits.write_parquet(lpath, metadata={trace_mod.META_KEY: full.meta.to_json()})
    a, b = _both(lpath)
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    cpath = tmp_path / "trace.csv"
    cpath.write_text("# cost_unit: MACs\n" + df.drop("extra.source").write_csv())
    a, b = trace_mod.read(cpath, lazy=False), trace_mod.read(cpath, lazy=True)
    assert b.is_compact and b.meta.cost_unit == "MACs" == a.meta.cost_unit
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_a_big_csv_is_converted_once_and_reloaded_from_the_cache(tmp_path, small, monkeypatch):
    """Loading the same big CSV again reuses its Parquet copy (no new file per load); an edited
    CSV gets its own."""
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    cpath = tmp_path / "big.csv"
    cpath.write_text(trace_mod.read(small, lazy=False).to_frame().drop("extra.source").write_csv())
    copies = lambda: sorted((tmp_path / "cache").rglob("*.parquet"))  # noqa: E731
    first = trace_mod.read(cpath, lazy=True)
    assert len(copies()) == 1 and first.is_compact
    again = trace_mod.read(cpath, lazy=True)
    assert len(copies()) == 1 and np.array_equal(again.max_prob, first.max_prob)
    assert not [
        p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.name.startswith("aie-trace-")
    ]
    cpath.write_text("# edited\n" + cpath.read_text())  # another file now (size and time)
    trace_mod.read(cpath, lazy=True)
    assert len(copies()) == 2


def test_compact_policies_curves_and_solvers_equal_the_full_ones(small):
    full, lazy = _both(small)
    k = full.num_exits
    for kind in ("max_prob", "entropy", "margin", "gate", "patience", "fixed"):
        c_full, c_lazy = tradeoff.curve(full, kind), tradeoff.curve(lazy, kind)
        for f in ("params", "accuracy", "mean_cost"):
            assert np.array_equal(getattr(c_full, f), getattr(c_lazy, f)), (kind, f)
        # at every 37th exact curve setting (thresholds equal to a score are the edge cases)
        for i in range(0, len(c_full), 37):
            p = c_full.policy(i)
            e_full, e_lazy = exit_index(full, p), exit_index(lazy, p)
            assert np.array_equal(e_full, e_lazy), p
            assert repr(tradeoff.evaluate(full, e_full)) == repr(tradeoff.evaluate(lazy, e_lazy))
        for target in (0.5, 0.8, 0.9):
            assert tradeoff.cheapest_with_accuracy(c_full, target) == (
                tradeoff.cheapest_with_accuracy(c_lazy, target)
            )
            budget = tradeoff.budget_target(full, target, True)
            assert tradeoff.best_within_budget(c_full, budget) == (
                tradeoff.best_within_budget(c_lazy, budget)
            )
    p = Policy("per_exit", thresholds=(0.9, 0.7, 0.5, 1.0)[:k])
    exits = exit_index(full, p)
    assert np.array_equal(exits, exit_index(lazy, p))
    assert repr(calibration.of_policy(full, exits)) == repr(calibration.of_policy(lazy, exits))
    assert repr(calibration.exit_gaps(full, exits)) == repr(calibration.exit_gaps(lazy, exits))
    assert repr(calibration.per_exit(full)) == repr(calibration.per_exit(lazy))
    assert np.array_equal(oracle_correct(full), oracle_correct(lazy))


def test_scan_reads_one_exit_of_probabilities_at_a_time(small, monkeypatch):
    """Each collect of the compact reader holds at most one exit's C probability columns, and
    every probability column is read exactly once (never the whole table)."""
    seen: list[list[str]] = []
    collect = pl.LazyFrame.collect

    def spy(self, *a, **kw):
        out = collect(self, *a, **kw)
        seen.append(out.columns)
        return out

    monkeypatch.setattr(pl.LazyFrame, "collect", spy)
    monkeypatch.setattr(pl, "read_parquet", lambda *a, **kw: pytest.fail("read whole"))
    t = trace_mod.read(small, lazy=True)
    prob = [[c for c in cols if c.startswith("prob_")] for cols in seen]
    assert max(len(p) for p in prob) == t.num_classes
    flat = [c for p in prob for c in p]
    assert len(flat) == len(set(flat)) == t.num_exits * t.num_classes


def test_read_picks_the_compact_form_by_size(small, monkeypatch):
    assert not trace_mod.read(small).is_compact  # small traces read as ever
    monkeypatch.setattr(trace_mod, "LAZY_MIN_CELLS", 1000)
    t = trace_mod.read(small)
    assert t.is_compact
    assert not trace_mod.read(small.read_bytes(), "small.parquet").is_compact  # bytes: whole


def test_a_compact_trace_says_why_the_whole_distribution_is_unavailable(small, monkeypatch):
    t = trace_mod.read(small, lazy=True)
    with pytest.raises(TraceError, match="compactly"):
        np.asarray(t.probs)
    with pytest.raises(TraceError, match="compactly"):
        t.to_frame()
    monkeypatch.setattr(trace_mod, "MAX_LAZY_CELLS", 100)
    with pytest.raises(TraceError, match="at most 100 probabilities"):
        t.probs[:50]
    assert t.probs[3].shape == (t.num_exits, t.num_classes)  # one sample still reads


def test_the_drawn_front_is_thinned_but_solvers_read_the_whole_curve(medium):
    t = trace_mod.read(medium)
    assert t.is_compact  # 200k x 12 x 10 is over LAZY_MIN_CELLS
    c = tradeoff.curve(t, "max_prob")
    front = tradeoff.pareto_front(c.mean_cost, c.accuracy)
    assert len(front) > 10 * tradeoff.MAX_FRONT_POINTS  # a big trace's front is huge
    drawn = tradeoff.front_to_draw(front)
    assert len(drawn) <= tradeoff.MAX_FRONT_POINTS
    assert drawn[0] == front[0] and drawn[-1] == front[-1]
    assert len(tradeoff.drawing_indices(c.mean_cost, c.accuracy)) < 3000


# --- the tuning page ---------------------------------------------------------------------


def _load(path: str | Path, timeout: int = 60) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=timeout).run()
    at.text_input(key="w.trace_path").set_value(str(path))
    return at.button(key="b.trace_path").click().run()


def test_upload_limit_stays_and_the_uploader_says_how_to_load_more(page_env, monkeypatch):
    assert st.get_option("server.maxUploadSize") >= loaders.MAX_TRACE_MB  # config.toml: default
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    hint = next(c.value for c in at.caption if "Uploads are limited to" in c.value)
    assert f"limited to {loaders.MAX_TRACE_MB} MB" in hint
    assert "Load a trace file from this machine" in hint
    assert at.text_input(key="w.trace_path") is not None
    # a server others can reach reads no paths; the hint says how to run it locally
    monkeypatch.setenv(loaders.LOCAL_PATHS_ENV, "0")
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not [w for w in at.text_input if w.key == "w.trace_path"]
    hint = next(c.value for c in at.caption if "Uploads are limited to" in c.value)
    assert "make app" in hint and loaders.LOCAL_PATHS_ENV in hint


def test_local_paths_follow_the_server_address(monkeypatch):
    monkeypatch.delenv(loaders.LOCAL_PATHS_ENV, raising=False)
    monkeypatch.setattr(st, "get_option", lambda name: "127.0.0.1")
    assert loaders.local_paths_allowed()
    monkeypatch.setattr(st, "get_option", lambda name: "0.0.0.0")
    assert not loaders.local_paths_allowed()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.parquet", None, "there is no file at"),
        ("folder", "dir", "is a folder"),
        ("model.pkl", b"\x80\x04K\x01.", "is a pickle, which is never loaded"),
        ("weights.pt", b"PK\x03\x04", "is a pickle, which is never loaded"),
        ("notes.txt", b"hello", "expected a .parquet, .pq or .csv file"),
        ("broken.parquet", b"PAR1 not really parquet", "not a readable Parquet file"),
        ("bad.csv", b"sample_id,label\n0,1\n", "no probability or logit columns"),
        ("", None, "type the path"),
    ],
)
def test_bad_paths_get_a_clear_message(page_env, name, content, message):
    path = page_env / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.text_input(key="w.trace_path").set_value(str(path) if name else "  ")
    at.button(key="b.trace_path").click().run()
    assert not at.exception
    if name:
        shown = [e.value.replace("\\", "") for e in at.error]  # as typed, not Markdown-escaped
        assert any(message in m for m in shown), shown


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_a_medium_trace_loads_from_its_path_and_the_slider_works(page_env, medium):
    at = _load(medium, timeout=300)
    assert not at.exception, at.exception
    assert any("it is the selected trace now" in s.value for s in at.success)
    source = at.selectbox(key="w.model").value
    assert loaders.is_local(source)
    stat = medium.stat()  # the page's own (shared) copy of the trace is the compact one
    assert loaders.load_local_trace(
        str(medium.resolve()), stat.st_mtime_ns, stat.st_size
    ).is_compact
    t = trace_mod.read(medium)
    assert any(f"{MEDIUM} samples" in c.value for c in at.sidebar.caption)
    for threshold in (0.6, 0.93):
        at.slider(key="w.t.max_prob").set_value(threshold).run()
        assert not at.exception
        stats = tradeoff.evaluate_policy(t, Policy("max_prob", threshold=threshold))
        assert _metrics(at)["Accuracy"] == f"{stats.accuracy:.4f}"
    # the chart draws a few thousand points, not the curve's hundreds of thousands
    spec = at.get("plotly_chart")[0].proto.spec
    assert "Pareto front" in spec and len(spec) < 300_000, len(spec)
    # the table shows its first rows only; the caption says how many there are
    assert any(f"of {MEDIUM} rows" in c.value for c in at.caption)
    # the solver reads the exact curve
    c = tradeoff.curve(t, "max_prob")
    at.number_input(key="w.solve_acc").set_value(90.0).run()
    at.button(key="b.solve_acc").click().run()
    i = tradeoff.cheapest_with_accuracy(c, 0.9)
    assert at.slider(key="w.t.max_prob").value == pytest.approx(c.params[i])
    assert _metrics(at)["Accuracy"] == f"{c.accuracy[i]:.4f}"


@pytest.mark.parametrize(
    "ids",
    [np.r_[np.arange(49), 3], np.r_[np.arange(49), 3][::-1].copy(), np.array([7] * 50)],
)
def test_duplicate_sample_ids_are_refused_in_any_order(ids):
    t = make_trace(n=50)
    with pytest.raises(TraceError, match="unique"):
        dataclasses.replace(t, sample_id=ids)
    with pytest.raises(TraceError, match="unique"):
        dataclasses.replace(t, sample_id=np.array([str(i) for i in ids], dtype=object))
    dataclasses.replace(t, sample_id=np.arange(50)[::-1].copy())  # unique, in any order


def test_a_slice_is_evaluated_without_copying_the_trace(small):
    for t in _both(small):
        exits = exit_index(t, Policy("max_prob", threshold=0.7))
        for mask in (exits == 1, t.label == 4, np.arange(t.num_samples) % 3 == 0):
            whole = tradeoff.evaluate(t.subset(mask), exits[mask])
            assert repr(tradeoff.evaluate_slice(t, exits, mask)) == repr(whole)
