"""AppTest: the shared FLOPs / time switch changes the cost axis and the metrics on each page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app import figures
from engine.core import costs, tradeoff
from engine.core.policies import Policy, exit_index
from engine.run.profile import load_profile
from engine.trace_store import load_trace

ROOT = Path(__file__).resolve().parent.parent
UNIT = "ms (batch 256)"


pytestmark = pytest.mark.usefixtures("page_env")  # its own folders, empty caches


def _run(page: str, **qp) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / f"{page}.py"), default_timeout=120)
    for k, v in qp.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, at.exception
    return at


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _x_titles(at: AppTest) -> list[str]:
    import json

    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return [s["layout"].get("xaxis", {}).get("title", {}).get("text", "") for s in specs]


def _x_title(at: AppTest, i: int = 0) -> str:
    return _x_titles(at)[i]


def test_tuning_page_switch_moves_curve_metrics_and_solver_to_ms():
    model = "mnist_multi_exit_cnn"
    at = _run("tuning", model=model, policy="max_prob", t="0.9")
    trace, profile = load_trace(model), load_profile(model)
    assert at.radio(key="w.cost_axis").options == costs.units(profile)
    assert "Mean FLOPs" in _metrics(at)
    at.radio(key="w.cost_axis").set_value(UNIT).run()
    assert not at.exception, at.exception
    timed = costs.trace_on_axis(trace, profile, UNIT)
    s = tradeoff.evaluate(timed, exit_index(timed, Policy("max_prob", threshold=0.9)))
    shown = _metrics(at)
    assert shown[f"Mean {UNIT}"] == figures.fmt_flops(s.mean_cost) + UNIT
    assert shown["Speed-up vs last exit"] == f"{s.speedup:.2f}×"
    assert UNIT in _x_title(at)
    # "best accuracy within X ms": the slider moves to the engine's choice on the ms curve
    budget = float(np.median(timed.cost[0]))
    at.number_input(key=f"w.solve_ms.{UNIT}").set_value(budget).run()
    at.button(key="b.solve_budget").click().run()
    c = tradeoff.curve(timed, "max_prob")
    i = tradeoff.best_within_budget(c, budget)
    assert np.isclose(at.session_state["w.t.max_prob"], c.params[i], atol=1e-3)


def test_compare_page_matches_a_time_budget():
    at = _run("compare")
    before = at.dataframe[0].value
    assert "mean compute" in before.columns
    at.radio(key="w.cost_axis").set_value(UNIT).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert f"mean {UNIT}" in table.columns
    budget = at.slider[0].value
    from app import loaders
    from engine import compare

    methods, _, _ = loaders.compare_sweeps(at.selectbox(key="cmp_dataset").value)
    for m, shown in zip(methods, table[f"mean {UNIT}"].to_list(), strict=True):
        r = costs.results_on_axis(m, load_profile(m.meta["model_id"]), UNIT)
        assert shown == float(f"{compare.match_budget(r, budget, absolute=True).mean_cost:.4g}")
    assert UNIT in _x_title(at)


def test_skipping_page_metrics_follow_the_switch():
    at = _run("skipping")
    assert "Mean FLOPs per input" in _metrics(at)
    at.radio(key="w.cost_axis").set_value(UNIT).run()
    assert not at.exception, at.exception
    profile = load_profile("mnist_skipnet")
    t = at.select_slider(key="skip_threshold").value
    i = int(np.argmin(np.abs(profile.points - t)))
    want = costs.fmt_cost(profile.timings[256].median_ms[i], UNIT)
    assert _metrics(at)[f"Mean {UNIT} per input"] == want


def test_halting_page_metric_and_curve_follow_the_switch():
    from engine import families
    from engine.registry import get_card

    at = _run("halting")
    assert _x_title(at, -1) == "mean FLOPs per input"
    at.radio(key="w.cost_axis").set_value(UNIT).run()
    assert not at.exception, at.exception
    card = get_card(at.selectbox(key="act_model").value)
    fam = families.get(card.family)
    value = at.select_slider(key=f"halt_{fam.setting}").value
    res = costs.results_on_axis(fam.results(card), load_profile(card.model_id), UNIT)
    want = costs.fmt_cost(res.mean_cost[res.index_of(value)], UNIT)
    assert _metrics(at)[f"Mean {UNIT} per input"] == want
    assert UNIT in _x_title(at, -1)


def test_routing_page_metric_and_curve_follow_the_switch():
    at = _run("routing")
    assert "FLOPs per sample" in _metrics(at)
    at.radio(key="w.cost_axis").set_value(UNIT).run()
    assert not at.exception, at.exception
    profile = load_profile(at.radio(key="moe.model").value)
    tau = at.select_slider(key="moe.tau").value
    i = int(np.argmin(np.abs(profile.points - tau)))
    want = costs.fmt_cost(profile.timings[256].median_ms[i], UNIT)
    assert _metrics(at)[f"{UNIT} per sample"] == want
    assert f"measured {UNIT} per sample" in _x_titles(at)


def test_inspector_shows_the_time_spent_at_the_exit_taken():
    model = "mnist_multi_exit_cnn"
    at = _run("inspector", model=model)
    assert "FLOPs spent" in _metrics(at)
    at.radio(key="w.cost_axis").set_value(UNIT).run()
    assert not at.exception, at.exception
    ms = np.maximum.accumulate(load_profile(model).timings[256].median_ms)
    exit_name = _metrics(at)["Policy exits at"]
    k = load_trace(model).meta.exit_names.index(exit_name)
    assert _metrics(at)[f"{UNIT} spent"] == figures.fmt_flops(ms[k]) + UNIT


def test_language_classifier_says_the_time_saved():
    from engine.families.multi_exit_bert.model import backbone_available

    if not backbone_available():
        pytest.skip("the MiniLM backbone is not installed")
    model = "tweets_multi_exit_minilm"
    at = _run("language")
    assert "Compute saved" in _metrics(at)
    at.radio(key="w.cost_axis").set_value(UNIT).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    names = list(table["exit"].unique())  # exit names as the page shows them
    ms = np.maximum.accumulate(load_profile(model).timings[256].median_ms)
    from engine.families.multi_exit_bert import analysis as language
    from engine.registry import get_card

    all_names = language.exit_names(get_card(model).config)
    assert set(names) <= set(all_names)
    k = np.array([all_names.index(e) for e in table["exit"].to_list()])
    assert _metrics(at)[f"Time saved ({UNIT})"] == f"{(1 - ms[k] / ms[-1]).mean():.0%}"
    assert "time saved" in table.columns


def test_reprofile_button_times_the_model_at_the_users_batch(tmp_path):
    model = "mnist_cascade"
    at = _run("tuning", model=model)
    assert "ms (batch 8)" not in at.radio(key="w.cost_axis").options
    at.number_input(key="w.profile_batch").set_value(8).run()
    at.button(key="b.reprofile").click().run()
    assert not at.exception, at.exception
    assert at.radio(key="w.cost_axis").options == ["FLOPs", "ms (batch 1)", "ms (batch 8)"]
    saved = tmp_path / "data" / "traces" / f"{model}__time.json"
    assert saved.is_file()  # in the user's data folder, never over the shipped profile
    p = load_profile(model)
    at.radio(key="w.cost_axis").set_value("ms (batch 8)").run()
    ms = np.maximum.accumulate(p.timings[8].median_ms)
    assert _metrics(at)["Mean ms (batch 8)"].endswith("ms (batch 8)")
    assert figures.fmt_flops(ms[-1]) + "ms (batch 8)" in " ".join(c.value for c in at.caption)
