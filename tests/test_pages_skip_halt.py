"""AppTest for the layer-skipping and halting pages, asserting the numbers the engine computes."""

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from engine import halting, skipping
from engine.skipping import records_file

ROOT = Path(__file__).resolve().parent.parent
SKIP_OK = records_file("mnist_skipnet").exists()
HALT_MODELS = halting.available_models()
HALT_OK = bool(HALT_MODELS)


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.mark.skipif(not SKIP_OK, reason="mnist_skipnet records not bundled")
def test_skipping_page_shows_engine_numbers_and_reacts_to_the_threshold():
    rec = skipping.load_records("mnist_skipnet")
    at = AppTest.from_file(str(ROOT / "pages/skipping.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    s = skipping.summary(rec, rec.index_of(0.5))
    m = metrics(at)
    assert m["Accuracy"] == f"{s['accuracy']:.2%}"
    assert m["Blocks skipped"] == f"{s['skip_rate']:.1%}"
    assert m["Mean FLOPs per input"] == f"{s['mean_flops'] / 1e6:.2f} M"
    assert len(at.get("plotly_chart")) >= 4

    at.select_slider[0].set_value(1.0).run()
    s1 = skipping.summary(rec, rec.index_of(1.0))
    m1 = metrics(at)
    assert m1["Blocks skipped"] == f"{s1['skip_rate']:.1%}"
    assert m1["Accuracy"] == f"{s1['accuracy']:.2%}"
    assert m1["Mean FLOPs per input"] != m["Mean FLOPs per input"]

    at.select_slider[0].set_value(0.0).run()
    assert metrics(at)["Blocks skipped"] == "0.0%"  # threshold 0 runs every block


@pytest.mark.skipif(not HALT_OK, reason="ACT records not bundled")
@pytest.mark.parametrize("model_id", HALT_MODELS)
def test_halting_page_shows_engine_numbers_and_reacts_to_eps(model_id):
    rec = halting.load_records(model_id)
    at = AppTest.from_file(str(ROOT / "pages/halting.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    at.selectbox(key="act_model").set_value(model_id).run()
    assert not at.exception, at.exception
    r = halting.at_eps(rec, rec.eps)
    m = metrics(at)
    assert m["Accuracy"] == f"{r.accuracy:.2%}"
    assert m["Mean ponder steps"] == f"{r.steps.mean():.2f}"
    rho = halting.spearman(r.steps, rec.difficulty)
    assert m["Spearman(steps, difficulty)"] == f"{rho:.3f}"
    # at the trained eps the stored unroll reproduces the real run's steps
    assert (r.steps != rec.steps).mean() < 1e-3
    assert len(at.get("plotly_chart")) == 5

    at.slider(key="act_eps").set_value(0.5).run()
    r5 = halting.at_eps(rec, 0.5)
    m5 = metrics(at)
    assert m5["Mean ponder steps"] == f"{r5.steps.mean():.2f}"
    assert m5["Mean ponder steps"] != m["Mean ponder steps"]

    # one curve per ponder cost tau on the same task, and a table comparing them
    from engine.registry import get_card

    same = [
        o
        for o in HALT_MODELS
        if get_card(o).dataset == get_card(model_id).dataset
        and get_card(o).family == get_card(model_id).family
    ]
    if len(same) > 1:
        table = at.dataframe[0].value
        assert sorted(table["model"]) == sorted(same)
        steps_of = dict(zip(table["model"], table["mean steps"], strict=True))
        assert steps_of[model_id] == pytest.approx(r.steps.mean(), abs=1e-3)

    # browse from the input that pondered longest
    at.radio(key="act_order").set_value("most steps first").run()
    assert f"steps N = **{r5.steps.max()}**" in " ".join(md.value for md in at.markdown)


@pytest.mark.skipif("mnist_act" not in HALT_MODELS, reason="mnist_act not bundled")
def test_halting_page_ponders_an_uploaded_image_and_rejects_a_corrupt_one():
    import io

    from PIL import Image, ImageDraw

    from engine.models import act
    from engine.registry import load_model

    img = Image.new("L", (120, 120), 255)
    ImageDraw.Draw(img).line([(60, 15), (60, 105)], fill=0, width=12)  # a hand-drawn "1"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    at = AppTest.from_file(str(ROOT / "pages/halting.py"), default_timeout=60).run()
    at.selectbox(key="act_model").set_value("mnist_act").run()
    at.file_uploader(key="act_upload").upload("one.png", buf.getvalue(), "image/png").run()
    assert not at.exception, at.exception
    text = " ".join(md.value for md in at.markdown)
    assert "FLOPs" in text and "steps N" in text
    # the live run is the engine's
    from engine.data import photo
    from engine.data.images import to_model_input

    prep = photo.prepare_image(buf.getvalue(), "mnist", "one.png")
    out = act.run_act(load_model("mnist_act"), to_model_input(prep.model_input).numpy())
    assert f"FLOPs **{out['flops'][0]:,.0f}**" in text

    at.file_uploader(key="act_upload").upload("bad.png", b"not an image at all", "image/png").run()
    assert not at.exception
    assert any("cannot be used" in e.value for e in at.error)


def test_pages_fail_gracefully_without_records(monkeypatch, tmp_path):
    monkeypatch.setattr(skipping, "RECORDS_DIR", tmp_path)
    monkeypatch.setattr(halting, "RECORDS_DIR", tmp_path)
    import streamlit as st

    st.cache_data.clear()  # earlier tests cached the real records
    for page in ("pages/skipping.py", "pages/halting.py"):
        at = AppTest.from_file(str(ROOT / page), default_timeout=60).run()
        assert not at.exception
        assert "missing" in at.error[0].value


def test_halting_page_explains_damaged_records(monkeypatch, tmp_path):
    """A truncated records file gives a message naming the model, not a stack trace."""
    import shutil

    import streamlit as st

    if not HALT_OK:
        pytest.skip("no ACT records bundled")
    for m in HALT_MODELS:
        shutil.copy(halting.records_file(m), tmp_path / halting.records_file(m).name)
    first = HALT_MODELS[0]
    path = tmp_path / halting.records_file(first).name
    path.write_bytes(path.read_bytes()[:1000])
    monkeypatch.setattr(halting, "RECORDS_DIR", tmp_path)
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "pages/halting.py"), default_timeout=60)
    at.query_params["model"] = first
    at.run()
    assert not at.exception
    assert any(first in e.value and "cannot be read" in e.value for e in at.error)


@pytest.mark.skipif("parity_act" not in HALT_MODELS, reason="parity_act not bundled")
def test_halting_page_ponders_a_typed_string_and_explains_a_bad_one():
    from engine.models import act
    from engine.registry import load_model

    at = AppTest.from_file(str(ROOT / "pages/halting.py"), default_timeout=60)
    at.query_params["model"] = "parity_act"
    at.run()
    m = load_model("parity_act")
    text = "+-0+0-0++0-0"[: m.config.num_bits].ljust(m.config.num_bits, "0")
    at.text_input(key="act_bits").input(text).run()
    assert not at.exception, at.exception
    out = act.run_act(m, act.parse_bits(text, m.config.num_bits))
    shown = " ".join(md.value for md in at.markdown)
    assert f"steps N = **{int(out['steps'][0])}**" in shown
    assert f"FLOPs **{out['flops'][0]:,.0f}**" in shown
    for bad, why in (("+-x", "only"), ("+-", "exactly")):
        at.text_input(key="act_bits").input(bad).run()
        assert not at.exception
        assert any(why in e.value for e in at.error)


def test_parse_bits():
    from engine.models import act

    np.testing.assert_array_equal(act.parse_bits("+ - 0", 3), [[1.0, -1.0, 0.0]])
    with pytest.raises(ValueError, match="only"):
        act.parse_bits("+-1", 3)
    with pytest.raises(ValueError, match="exactly 4"):
        act.parse_bits("+-0", 4)
