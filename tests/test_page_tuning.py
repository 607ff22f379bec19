"""AppTest of pages/tuning.py: values on screen are the engine's, state survives a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app import figures
from engine.core import calibration, tradeoff
from engine.core.policies import Policy, exit_index
from engine.policy_store import PolicyStore
from engine.trace_store import available_traces, load_trace
from tests.helpers_app import SYNTH_ID, make_trace

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "tuning.py")


def _bundled_model() -> str | None:
    """A real bundled model's test trace, the smallest one (fast), when one exists."""
    best = None
    for model_id, split in available_traces():
        if split != "test" or model_id == SYNTH_ID:
            continue
        path = ROOT / "assets" / "traces" / f"{model_id}__test.parquet"
        if path.exists() and (best is None or path.stat().st_size < best[0]):
            best = (path.stat().st_size, model_id)
    return best[1] if best else None


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Temp cache and data dirs; the model under test is a bundled one when present."""
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    st.cache_data.clear()
    st.cache_resource.clear()
    model_id = _bundled_model()
    if model_id is None:
        (tmp_path / "cache" / "traces").mkdir(parents=True)
        make_trace(n=1200).write_parquet(
            tmp_path / "cache" / "traces" / f"{SYNTH_ID}__test.parquet"
        )
        model_id = SYNTH_ID
    yield model_id
    st.cache_data.clear()
    st.cache_resource.clear()


def _app(model_id: str, **qp) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.query_params["model"] = model_id
    for k, v in qp.items():
        at.query_params[k] = v
    return at.run()


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _expected(trace, policy: Policy) -> dict[str, str]:
    s = tradeoff.evaluate(trace, exit_index(trace, policy))
    unit = trace.meta.cost_unit
    return {
        "Accuracy": f"{s.accuracy:.4f}",
        f"Mean {unit}": figures.fmt_flops(s.mean_cost) + unit,
        f"p95 {unit}": figures.fmt_flops(s.p95_cost) + unit,
        "Speed-up vs last exit": f"{s.speedup:.2f}×",
    }


def _assert_shows(at: AppTest, trace, policy: Policy) -> None:
    shown = _metrics(at)
    for label, value in _expected(trace, policy).items():
        assert shown[label] == value, (label, shown)


def test_renders_with_engine_values(env):
    at = _app(env, policy="max_prob", t="0.9")
    assert not at.exception, at.exception
    trace = load_trace(env)
    _assert_shows(at, trace, Policy("max_prob", threshold=0.9))
    # curve, histogram, per-class, reliability, and the exited samples' reliability (bias)
    assert len(at.get("plotly_chart")) == 5
    # ECE caption: per exit and for the policy's outputs, from engine.core.calibration
    rel = calibration.of_policy(trace, exit_index(trace, Policy("max_prob", threshold=0.9)))
    assert any(f"policy's outputs {rel.ece:.3f}" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert len(table) == min(trace.num_samples, 5000)
    assert {"exit", "correct", f"conf {trace.meta.exit_names[0]}"} <= set(table.columns)


def test_slider_move_changes_accuracy_and_cost(env):
    at = _app(env, policy="max_prob", t="0.999")
    trace = load_trace(env)
    before = _metrics(at)
    at.slider(key="w.t.max_prob").set_value(0.3).run()
    assert not at.exception
    _assert_shows(at, trace, Policy("max_prob", threshold=0.3))
    after = _metrics(at)
    assert after["Speed-up vs last exit"] != before["Speed-up vs last exit"]
    assert at.query_params["t"] in ("0.3", ["0.3"])  # the URL follows the slider


def test_other_policies_match_engine(env):
    trace = load_trace(env)
    at = _app(env, policy="patience", p="1")
    assert not at.exception
    _assert_shows(at, trace, Policy("patience", patience=1))
    at = _app(env, policy="entropy", t="0.35")
    assert at.slider(key="w.t.entropy").value == pytest.approx(0.35)
    _assert_shows(at, trace, Policy("entropy", threshold=0.35))
    k = trace.num_exits
    ts = ",".join(["0.95", "0.8", "0.6", "0.5", "0.5", "0.5"][: k - 1])
    at = _app(env, policy="per_exit", ts=ts)
    assert not at.exception
    vals = [float(v) for v in ts.split(",")] + [1.0]
    _assert_shows(at, trace, Policy("per_exit", thresholds=tuple(vals)))


def test_solver_buttons_move_the_slider(env):
    trace = load_trace(env)
    at = _app(env, policy="max_prob", t="0.5")
    c = tradeoff.curve(trace, "max_prob")
    target = float(np.quantile(c.accuracy, 0.5))
    at.number_input(key="w.solve_acc").set_value(round(100 * target, 2)).run()
    at.button(key="b.solve_acc").click().run()
    assert not at.exception
    i = tradeoff.cheapest_with_accuracy(c, round(100 * target, 2) / 100)
    assert at.slider(key="w.t.max_prob").value == pytest.approx(c.params[i])
    shown = _metrics(at)
    assert shown["Accuracy"] == f"{c.accuracy[i]:.4f}"
    assert float(shown["Accuracy"]) >= round(target, 4) - 1e-4
    at.number_input(key="w.solve_budget").set_value(40.0).run()
    at.button(key="b.solve_budget").click().run()
    j = tradeoff.best_within_budget(c, tradeoff.budget_target(trace, 0.4, True))
    assert at.slider(key="w.t.max_prob").value == pytest.approx(c.params[j])
    assert _metrics(at)["Accuracy"] == f"{c.accuracy[j]:.4f}"


def test_saved_policy_survives_restart(env, tmp_path):
    at = _app(env, policy="max_prob", t="0.8")
    at.text_input(key="w.save_name").set_value("my fast policy").run()
    at.button(key="b.save").click().run()
    assert not at.exception
    assert any("Saved policy" in s.value for s in at.success)
    # a fresh app (new session, as after a restart) finds it in the store on disk
    st.cache_data.clear()
    at2 = _app(env)
    pick = at2.selectbox(key="w.saved_pick")
    assert "my fast policy" in pick.options
    saved = PolicyStore(tmp_path / "data").get("my fast policy")
    assert saved.policy == Policy("max_prob", threshold=0.8)
    # applying it moves the sliders
    at2.slider(key="w.t.max_prob").set_value(0.2).run()
    at2.button(key="b.apply_saved").click().run()
    assert at2.slider(key="w.t.max_prob").value == pytest.approx(0.8)
    # a bad name is refused with a message, not an exception
    at2.text_input(key="w.save_name").set_value("").run()
    at2.button(key="b.save").click().run()
    assert not at2.exception
    assert any("Not saved" in e.value for e in at2.error)


def test_bad_trace_upload_shows_error(env):
    at = _app(env)
    at.file_uploader(key="w.trace_upload").upload("broken.csv", b"sample_id,foo\n1,2\n", "text/csv")
    at.run()
    assert not at.exception
    assert any("rejected" in e.value and "prob_e" in e.value for e in at.error)
    at.file_uploader(key="w.trace_upload").upload(
        "broken.parquet", b"PAR1 this is not parquet", "application/octet-stream"
    )
    at.run()
    assert not at.exception
    assert any("not a readable Parquet" in e.value for e in at.error)


def test_uploaded_trace_is_tuned_like_a_bundled_one(env):
    ext = make_trace(n=300, k=3, c=4, seed=3, model_id="external")
    at = _app(env)
    at.file_uploader(key="w.trace_upload").upload("external.csv", ext.to_csv_bytes(), "text/csv")
    at.run()
    assert not at.exception
    assert at.selectbox(key="w.model").value == "upload:external"
    at.slider(key="w.t.max_prob").set_value(0.6).run()
    from engine.core.trace import read

    _assert_shows(at, read(ext.to_csv_bytes(), "external.csv"), Policy("max_prob", threshold=0.6))


def test_oracle_convention_widget_changes_the_shown_speedup(env):
    trace = load_trace(env)
    first, last = tradeoff.oracle_stats(trace, "first"), tradeoff.oracle_stats(trace, "last")
    assert first.speedup != last.speedup  # the bundled trace has samples no exit gets right

    def oracle_caption(at):
        return next(c.value for c in at.caption if "oracle" in c.value and "×" in c.value)

    at = _app(env)
    radio = at.radio(key="w.oracle_never_correct")
    assert radio.value == "first"  # the default, so numbers quoted elsewhere are unchanged
    assert f"**{first.speedup:.2f}×**" in oracle_caption(at)
    assert "charged at the first exit" in oracle_caption(at)
    radio.set_value("last").run()
    assert not at.exception
    assert f"**{last.speedup:.2f}×**" in oracle_caption(at)
    assert "charged at the last exit" in oracle_caption(at)
    # the chart's oracle point moves with it
    fig = at.get("plotly_chart")[0].proto.spec
    assert "never-right at the last exit" in fig


def test_upload_message_says_the_trace_is_selected(env):
    ext = make_trace(n=300, k=3, c=4, seed=3, model_id="external")
    at = _app(env)
    at.file_uploader(key="w.trace_upload").upload("external.csv", ext.to_csv_bytes(), "text/csv")
    at.run()
    assert at.selectbox(key="w.model").value == "upload:external"
    msgs = [s.value for s in at.success]
    assert any("it is the selected trace now" in m for m in msgs), msgs
    assert not any("choose it" in m for m in msgs)
    # once another trace is picked, the message says where to find the upload
    at.selectbox(key="w.model").set_value(env).run()
    msgs = [s.value for s in at.success]
    assert any("in the model picker below" in m for m in msgs), msgs


def test_accuracy_target_default_follows_the_chosen_trace(env):
    trace = load_trace(env)
    at = _app(env)
    want = round(100 * float(tradeoff.last_exit_stats(trace).accuracy) - 0.5, 2)
    assert at.number_input(key="w.solve_acc").value == pytest.approx(want)
    ext = make_trace(n=300, k=3, c=4, seed=3, model_id="external")
    at.file_uploader(key="w.trace_upload").upload("external.csv", ext.to_csv_bytes(), "text/csv")
    at.run()
    assert at.selectbox(key="w.model").value == "upload:external"
    want_ext = round(100 * float(tradeoff.last_exit_stats(ext).accuracy) - 0.5, 2)
    assert want_ext != pytest.approx(want)
    assert at.number_input(key="w.solve_acc").value == pytest.approx(want_ext, abs=0.01)
    # a value the user typed stays while the trace stays
    at.number_input(key="w.solve_acc").set_value(42.0).run()
    at.slider(key="w.t.max_prob").set_value(0.5).run()
    assert at.number_input(key="w.solve_acc").value == pytest.approx(42.0)


def test_csv_header_cost_unit_and_names_show_on_the_page(env):
    ext = make_trace(n=300, k=3, c=4, seed=3, model_id="gbm")
    header = (
        "# cost_unit: trees\n"
        "# exit_names: 10 trees, 50 trees, 200 trees\n"
        "# class_names: north, east, south, west\n"
    )
    at = _app(env)
    at.file_uploader(key="w.trace_upload").upload(
        "gbm.csv", header.encode() + ext.to_csv_bytes(), "text/csv"
    )
    at.run()
    assert not at.exception
    shown = _metrics(at)
    assert "Mean trees" in shown and shown["Mean trees"].endswith("trees"), shown
    assert "p95 trees" in shown
    table = at.dataframe[0].value
    assert "conf 50 trees" in table.columns
    assert set(table["label"]) <= {"north", "east", "south", "west"}
    # a header that disagrees with the columns is refused, naming the field
    bad = b"# exit_names: a, b\n" + ext.to_csv_bytes()
    at.file_uploader(key="w.trace_upload").upload("bad.csv", bad, "text/csv")
    at.run()
    assert not at.exception
    assert any("rejected: `exit_names`" in e.value for e in at.error), [e.value for e in at.error]


def test_nan_upload_names_the_field_as_typed(env):
    df = make_trace(n=50, k=3, c=4, seed=3).to_frame()
    df = df.with_columns(df["prob_e1_c2"].scatter(7, float("nan")))
    at = _app(env)
    at.file_uploader(key="w.trace_upload").upload("nan.csv", df.write_csv().encode(), "text/csv")
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    # in code style, so Markdown does not turn `*_c*` into italics ("prob_e_c" on screen)
    assert any("`prob_e*_c*`" in e and "prob\\_e1\\_c2" in e for e in errors), errors


def test_cost_delta_is_green_when_cheaper(env):
    at = _app(env, policy="max_prob", t="0.5")
    trace = load_trace(env)
    mean = next(m for m in at.metric if m.label == f"Mean {trace.meta.cost_unit}")
    assert mean.delta.startswith("-")  # cheaper than the last exit
    assert mean.proto.direction == mean.proto.MetricDirection.Value("DOWN")
    assert mean.proto.color == mean.proto.MetricColor.Value("GREEN")  # lower cost is good
    assert mean.proto.delta_description == "vs the last exit"


# --- pure parts ------------------------------------------------------------------------------


def test_selection_mask_from_bar_customdata():
    exits = np.array([0, 1, 1, 2, 0])
    label = np.array([3, 3, 1, 1, 1])
    assert figures.selection_mask(None, exits, label, "exits") is None
    sel = {"points": [{"customdata": [1, 0.4]}]}
    assert figures.selection_mask(sel, exits, label, "exits").tolist() == [0, 1, 1, 0, 0]
    sel = {"points": [{"customdata": [1, 0]}, {"customdata": [3, 1]}]}
    assert figures.selection_mask(sel, exits, label, "classes").tolist() == [0, 1, 0, 0, 1]
    # st.session_state[key] of a chart holds {"selection": {...}}
    state = {"selection": {"points": [{"customdata": [2, 0.2]}], "box": [], "lasso": []}}
    assert figures.selection_mask(state, exits, label, "exits").tolist() == [0, 0, 0, 1, 0]
    assert figures.selection_mask({"selection": {"points": []}}, exits, label, "exits") is None


def test_figure_builders_are_valid_plotly():
    """The builders skip validation for speed; validate their output once here."""
    t = make_trace(n=200, k=3, c=4)
    exits = exit_index(t, Policy("max_prob", threshold=0.7))
    s = tradeoff.evaluate(t, exits)
    c = tradeoff.curve(t, "max_prob")
    front = tradeoff.pareto_front(c.mean_cost, c.accuracy)
    figs = [
        figures.tradeoff_figure(
            c.mean_cost,
            c.accuracy,
            front,
            s,
            tradeoff.oracle_stats(t),
            tradeoff.last_exit_stats(t),
            [s, s, s],
            others=[("entropy", c.mean_cost, c.accuracy)],
        ),
        figures.exited_reliability_figure(
            [
                ("now", calibration.exited_reliability(t, exits), calibration.of_policy(t, exits)),
                ("gate", calibration.exited_reliability(t, exits), calibration.of_policy(t, exits)),
            ],
            t.meta.exit_names,
        ),
        figures.exit_histogram(s.exit_counts, np.array([0.5, np.nan, 1.0]), t.meta.exit_names),
        figures.per_class_figure(
            tradeoff.per_class_exit_rates(t, exits), t.meta.class_names, t.meta.exit_names
        ),
        figures.reliability_figure(
            calibration.per_exit(t), calibration.of_policy(t, exits), t.meta.exit_names
        ),
        figures.anytime_figure(t.probs[0], t.meta.class_names, t.meta.exit_names, 1, None, 2),
        figures.attribution_figure({"a": np.random.randn(28, 28), "b": np.random.rand(28, 28)}),
    ]
    for fig in figs:
        go.Figure(fig.to_dict())  # raises on any invalid property
        assert fig.data
    assert b"<html>" in figures.figure_html(figs[1])[:200].lower()


# --- learned gates and the confidence bias of exited samples --------------------------------

GATED_MODEL = "mnist_multi_exit_cnn"


def _gap_cells(gaps) -> list[str]:
    return ["–" if not np.isfinite(v) else f"{100 * v:+.1f}" for v in [*gaps.gap, gaps.overall_gap]]


def test_gate_policy_is_offered_and_shown_beside_the_thresholds(env):
    at = _app(GATED_MODEL, policy="gate", t="0.99")
    assert not at.exception, at.exception
    assert "Learned gate (JEI-DNN)" in at.selectbox(key="w.kind").options
    assert at.selectbox(key="w.kind").value == "gate"
    trace = load_trace(GATED_MODEL)
    _assert_shows(at, trace, Policy("gate", threshold=0.99))
    fig = at.get("plotly_chart")[0].proto.spec
    for name in ("Max probability", "Entropy (DeeBERT)", "Patience (PABEE)"):
        assert name in fig, name  # the other kinds' curves are drawn on the same chart


def test_bias_table_shows_the_engines_signed_gaps(env):
    at = _app(GATED_MODEL, policy="max_prob", t="0.9")
    assert not at.exception, at.exception
    trace = load_trace(GATED_MODEL)
    exits = exit_index(trace, Policy("max_prob", threshold=0.9))
    mine = calibration.exit_gaps(trace, exits)
    c = tradeoff.curve(trace, "gate")
    s = tradeoff.evaluate(trace, exits)
    gate_exits = exit_index(trace, c.policy(tradeoff.nearest_cost(c, s.mean_cost)))
    theirs = calibration.exit_gaps(trace, gate_exits)
    table = at.table[0].value
    assert list(table["exit"]) == [*trace.meta.exit_names, "whole policy"]
    assert list(table["current: gap (points)"]) == _gap_cells(mine)
    assert list(table["matched: gap (points)"]) == _gap_cells(theirs)
    assert list(table["current: samples"])[:-1] == mine.count.tolist()
    said = " ".join(m.value for m in at.markdown)
    assert "under-confident" in said  # the MNIST CNN's exited samples, as measured
    assert any("fitted post hoc" in cap.value and "train split" in cap.value for cap in at.caption)
