"""AppTest for the comparison page: the numbers shown are the engine's, and the budget slider
re-matches every method."""

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from engine import compare, compare_sources
from engine.families.act import records as halting

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "compare.py")


def engine_matched(dataset: str, budget: float):
    found, _ = compare_sources.load_sweeps(dataset)
    aligned = compare.align([*found, compare_sources.load_oracle(dataset)])
    return [compare.match_budget(s, budget) for s in aligned[:-1]]


@pytest.fixture(scope="module")
def at():
    at = AppTest.from_file(PAGE, default_timeout=90)
    at.run()
    assert not at.exception, at.exception
    # the default data set is the one with most models (ties: by name); these tests are MNIST's
    at.selectbox(key="cmp_dataset").set_value("mnist").run()
    return at


def table(at, i=0):
    return at.dataframe[i].value


def test_renders_with_all_mnist_methods_and_engine_numbers(at):
    df = table(at)
    expected = [
        "early exit (CNN) · mnist_multi_exit_cnn",
        "early exit (CNN) · mnist_multi_exit_cnn_jei",  # the same backbone, JEI-DNN gates
        "cascade",
        "skip gates (SkipNet)",
        "pondering (ACT)",
    ]
    if not halting.records_file("mnist_act").exists():
        expected = expected[:4]
    assert list(df["method"]) == expected
    budget = at.slider(key="cmp_budget").value
    for m, (_, row) in zip(engine_matched("mnist", budget), df.iterrows(), strict=True):
        assert row["mean compute"] == round(m.mean_fraction, 3)
        assert row["accuracy"] == round(m.accuracy, 4)
    assert len(at.get("plotly_chart")) >= 5
    assert not at.error


def test_budget_slider_rematches_methods(at):
    before = table(at)["mean compute"].tolist()
    at.slider(key="cmp_budget").set_value(0.35).run()
    assert not at.exception
    after = table(at)["mean compute"].tolist()
    assert after != before
    expected = [round(m.mean_fraction, 3) for m in engine_matched("mnist", 0.35)]
    assert after == expected


def test_fashion_includes_dynamic_k_moe(at):
    at.selectbox(key="cmp_dataset").set_value("fashion_mnist").run()
    assert not at.exception
    assert "dynamic-k MoE (D2DMoE)" in table(at)["method"].tolist()


def test_compute_scatter_says_what_points_and_colours_are():
    from app import figures_compare as figs

    rng = np.random.default_rng(1)
    label = np.array([0, 1, 2, 1, 0, 2, 2])
    fig = figs.compute_scatter(
        rng.random(7), rng.random(7), "cascade", "early exit", np.arange(7), label, ["a", "b", "c"]
    )
    assert "cascade" in fig.layout.title.text and "early exit" in fig.layout.title.text
    assert "true class" in fig.layout.title.subtitle.text
    assert fig.layout.legend.title.text == "true class"
    points, *keys = fig.data
    assert len(points.x) == 7  # every input, in one trace: no class hides another
    colour = {k.name: k.marker.color for k in keys if k.showlegend is not False}
    assert list(colour) == ["a", "b", "c"]
    # each legend key has the colour of that class's points
    assert [colour["abc"[c]] for c in label] == list(points.marker.color)
    assert "compute" in fig.layout.xaxis.title.text and "compute" in fig.layout.yaxis.title.text


def test_page_scatter_has_a_title_and_one_legend_entry_per_class(at):
    import json

    from engine.data import images

    at.selectbox(key="cmp_dataset").set_value("mnist").run()
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    scatter = next(s for s in specs if "against" in s["layout"].get("title", {}).get("text", ""))
    assert scatter["layout"]["title"]["text"].startswith("Compute per test input")
    names = [t["name"] for t in scatter["data"] if t.get("showlegend", True)]
    assert set(names) <= set(images.CLASS_NAMES["mnist"]) and len(names) >= 2


def test_parity_puts_act_and_pondernet_side_by_side_without_an_oracle():
    """A data set with only halting models (no early-exit model for an oracle): every halting
    family is a method, the strings are shown, and the correlations are the engine's."""
    from engine.registry import list_cards

    fams = {c.family for c in list_cards() if c.dataset == "parity12"}
    if not {"act", "pondernet"} <= fams:
        pytest.skip("ACT and PonderNet parity models are not both bundled")
    app = AppTest.from_file(PAGE, default_timeout=90).run()
    app.selectbox(key="cmp_dataset").set_value("parity12").run()
    assert not app.exception, app.exception
    methods = list(table(app)["method"])
    assert any("ACT" in m for m in methods) and "pondering (PonderNet)" in methods
    found, _ = compare_sources.load_sweeps("parity12")
    budget = app.slider(key="cmp_budget").value
    matched = [compare.match_budget(s, budget) for s in compare.align(found)]
    for m, (_, row) in zip(matched, table(app).iterrows(), strict=True):
        assert row["mean compute"] == round(m.mean_fraction, 3)
    assert any("+" in c.value or "-" in c.value for c in app.code)  # the parity strings
    assert not app.error
