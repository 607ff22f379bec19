"""AppTest of pages/halting.py, for every bundled model of the halting kind, read through the
families: the numbers on screen are the family's results, a setting move changes them, a live
run is the engine's, and bad input or a damaged file gets a message."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from engine import families
from engine.core import stats
from engine.core.results import at
from engine.families.act import records as halting
from engine.registry import get_card

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "halting.py")


def _halt_models() -> list[str]:
    out = []
    for card, fam in families.cards_of_kind("halt"):
        try:
            fam.results(card)
        except FileNotFoundError:
            continue
        out.append(card.model_id)
    return out


HALT_MODELS = _halt_models()


def metrics(app) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def _page(model_id: str | None = None) -> AppTest:
    a = AppTest.from_file(PAGE, default_timeout=60)
    if model_id:
        a.query_params["model"] = model_id
    return a.run()


@pytest.mark.skipif(not HALT_MODELS, reason="no halting records bundled")
@pytest.mark.parametrize("model_id", HALT_MODELS)
def test_page_shows_the_family_results_and_reacts_to_the_setting(model_id):
    card = get_card(model_id)
    fam = families.get(card.family)
    res = fam.results(card)
    app = _page(model_id)
    assert not app.exception, app.exception
    r = at(res, fam.default_setting(card))
    m = metrics(app)
    assert m["Accuracy"] == f"{r.accuracy:.2%}"
    assert m["Mean steps"] == f"{r.detail['steps'].mean():.2f}"
    if "difficulty" in res.extra:
        rho = stats.spearman(r.detail["steps"], res.extra["difficulty"])
        assert m["Spearman(steps, difficulty)"] == f"{rho:.3f}"

    far = (
        res.settings[-1]
        if abs(res.settings[-1] - r.value) > abs(res.settings[0] - r.value)
        else res.settings[0]
    )
    app.select_slider(key=f"halt_{fam.setting}").set_value(float(far)).run()
    assert not app.exception, app.exception
    r2 = at(res, far)
    assert metrics(app)["Mean steps"] == f"{r2.detail['steps'].mean():.2f}"

    # every halting model of the data set is drawn and tabled beside this one
    same = [c.model_id for c, _ in families.cards_of_kind("halt", dataset=card.dataset)]
    same = [s for s in same if s in HALT_MODELS]
    if len(same) > 1:
        table = app.dataframe[0].value
        assert sorted(table["model"]) == sorted(same)

    # the grey bars after the halting step are explained next to the chart
    assert any("Grey bars" in c.value and "never computes" in c.value for c in app.caption)
    # browse from the input that took the most steps: its record says so
    app.radio(key="act_order").set_value("most steps first").run()
    most = int(r2.detail["steps"].max())
    assert any(f"after {most} of" in md.value for md in app.markdown)


@pytest.mark.skipif("mnist_act" not in HALT_MODELS, reason="mnist_act not bundled")
def test_page_ponders_an_uploaded_image_and_rejects_a_corrupt_one():
    from PIL import Image, ImageDraw

    from engine.data import photo

    img = Image.new("L", (120, 120), 255)
    ImageDraw.Draw(img).line([(60, 15), (60, 105)], fill=0, width=12)  # a hand-drawn "1"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    app = _page("mnist_act")
    app.file_uploader(key="act_upload").upload("one.png", buf.getvalue(), "image/png").run()
    assert not app.exception, app.exception
    text = " ".join(md.value for md in app.markdown)
    card = get_card("mnist_act")
    fam = families.get(card.family)
    prep = photo.prepare_image(buf.getvalue(), "mnist", "one.png")
    run = fam.run_one(
        families.load_model("mnist_act"), card, prep.model_input, fam.default_setting(card)
    )
    assert f"FLOPs **{run.cost:,.0f}**" in text and run.decision in text

    app.file_uploader(key="act_upload").upload("bad.png", b"not an image at all", "image/png").run()
    assert not app.exception
    assert any("cannot be used" in e.value for e in app.error)


@pytest.mark.skipif("parity_act" not in HALT_MODELS, reason="parity_act not bundled")
def test_page_ponders_a_typed_string_and_explains_a_bad_one():
    from engine.families.act import model as act

    app = _page("parity_act")
    m = families.load_model("parity_act")
    text = "+-0+0-0++0-0"[: m.config.num_bits].ljust(m.config.num_bits, "0")
    app.text_input(key="act_bits").input(text).run()
    assert not app.exception, app.exception
    out = act.run_act(m, act.parse_bits(text, m.config.num_bits))
    shown = " ".join(md.value for md in app.markdown)
    assert f"halted after {int(out['steps'][0])} of" in shown
    assert f"FLOPs **{out['flops'][0]:,.0f}**" in shown
    for bad, why in (("+-x", "only"), ("+-", "exactly")):
        app.text_input(key="act_bits").input(bad).run()
        assert not app.exception
        assert any(why in e.value for e in app.error)


def test_page_explains_damaged_records(monkeypatch, tmp_path):
    """A truncated records file gives a message naming the model, not a stack trace."""
    acts = [m for m in HALT_MODELS if get_card(m).family in ("act", "act_cnn")]
    if not acts:
        pytest.skip("no ACT records bundled")
    for m in acts:
        shutil.copy(halting.records_file(m), tmp_path / halting.records_file(m).name)
    path = tmp_path / halting.records_file(acts[0]).name
    path.write_bytes(path.read_bytes()[:1000])
    monkeypatch.setattr(halting, "RECORDS_DIR", tmp_path)
    st.cache_data.clear()
    try:
        app = _page(acts[0])
        assert not app.exception
        # the damaged model is either left out of the picker or named in the message
        shown = " ".join(e.value for e in app.error) + " ".join(
            str(o) for o in app.selectbox(key="act_model").options
        )
        assert acts[0] not in app.selectbox(key="act_model").options or "cannot be read" in shown
    finally:
        st.cache_data.clear()


def test_parse_bits():
    from engine.families.act import model as act

    np.testing.assert_array_equal(act.parse_bits("+ - 0", 3), [[1.0, -1.0, 0.0]])
    with pytest.raises(ValueError, match="only"):
        act.parse_bits("+-1", 3)


def test_halting_curve_legend_names_every_bar_colour():
    """One legend entry per bar colour; the grey one says those steps are not computed, and a
    live run (NaN after N: really not computed) has no grey bars and no such entry."""
    from app import figures_dynamic as figs

    h = np.array([0.1, 0.2, 0.8, 0.5, 0.9])
    cum = np.array([0.1, 0.3, 1.0, 1.0, 1.0])
    fig = figs.halting_curve(h, cum, steps=3, eps=0.01)
    bars = {t.marker.color: (t.name, list(t.x)) for t in fig.data if t.type == "bar"}
    assert bars[figs.RAN][1] == [1, 2]
    assert bars[figs.REMAINDER][1] == [3] and "remainder" in bars[figs.REMAINDER][0]
    grey_name, grey_x = bars[figs.SKIPPED]
    assert grey_x == [4, 5] and "not computed" in grey_name
    assert all(t.showlegend is not False for t in fig.data)
    assert fig.layout.legend.y < 0  # below the plot, clear of the title

    live = figs.halting_curve(np.array([0.1, 0.2, 0.8, np.nan, np.nan]), cum, 3, 0.01)
    assert [t.marker.color for t in live.data if t.type == "bar"] == [figs.RAN, figs.REMAINDER]


def _curves(app) -> tuple[dict, dict[str, dict]]:
    """The accuracy-compute chart (the last chart) and its traces by the model their hover
    names, with plotly's typed arrays decoded."""
    import base64
    import json

    def arr(v):
        if isinstance(v, dict) and "bdata" in v:
            return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return np.asarray(v)

    spec = json.loads(app.get("plotly_chart")[-1].proto.spec)
    for t in spec["data"]:
        t["x"], t["y"] = arr(t["x"]), arr(t["y"])
    return spec, {t["text"][0].split(",")[0]: t for t in spec["data"] if t.get("text")}


@pytest.mark.skipif("parity_act" not in HALT_MODELS, reason="parity_act not bundled")
def test_cost_axis_switch_puts_flops_or_time_on_the_curves_and_keeps_the_steps():
    """FLOPs draw the results' mean FLOPs per setting (not mean steps), ms the measured time;
    the mean steps stay in the metrics and in every point's hover."""
    from engine.core import costs
    from engine.run.profile import load_profile

    app = _page("parity_act")
    assert not app.exception, app.exception
    assert app.radio(key="w.cost_axis").value == costs.FLOPS
    same = [m for m in HALT_MODELS if get_card(m).dataset == get_card("parity_act").dataset]
    for unit in [costs.FLOPS, *app.radio(key="w.cost_axis").options[1:]]:
        app.radio(key="w.cost_axis").set_value(unit).run()
        assert not app.exception, app.exception
        spec, curves = _curves(app)
        assert spec["layout"]["xaxis"]["title"]["text"] == f"mean {unit} per input"
        assert sorted(curves) == sorted(same)
        for m in same:
            card = get_card(m)
            res = costs.results_on_axis(
                families.get(card.family).results(card), load_profile(m), unit
            )
            order = np.argsort(res.mean_cost, kind="stable")
            np.testing.assert_allclose(curves[m]["x"], res.mean_cost[order], rtol=1e-9)
            np.testing.assert_allclose(curves[m]["y"], res.accuracy[order], rtol=1e-9)
            steps = res.detail["steps"].mean(axis=1)[order]
            for text, n in zip(curves[m]["text"], steps, strict=True):
                assert f"mean steps {n:.2f}" in text and unit in text
        card = get_card("parity_act")
        fam = families.get(card.family)
        res = costs.results_on_axis(fam.results(card), load_profile("parity_act"), unit)
        i = res.index_of(fam.default_setting(card))
        m = metrics(app)
        assert m[f"Mean {unit} per input"] == costs.fmt_cost(res.mean_cost[i], unit)
        assert m["Mean steps"] == f"{res.detail['steps'][i].mean():.2f}"
        star = next(t for t in spec["data"] if t.get("name") == "current setting")
        assert np.isclose(star["x"][0], res.mean_cost[i])
