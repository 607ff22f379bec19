"""AppTest of pages/inspector.py: live runs agree with the engine, bad uploads are refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from engine.core.policies import Policy, exit_index
from engine.data import photo
from engine.run.exits import image_exits
from engine.trace_store import load_trace
from tests.helpers_app import (
    SYNTH_ID,
    bundled_image_model,
    install_fake_image_model,
    make_trace,
    png_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "inspector.py")


@pytest.fixture
def live(tmp_path, monkeypatch):
    """An image model the page can run: a bundled one when present, else an untrained fake."""
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    st.cache_data.clear()
    st.cache_resource.clear()
    model_id = bundled_image_model() or install_fake_image_model(monkeypatch, tmp_path)
    yield model_id
    st.cache_data.clear()
    st.cache_resource.clear()


def _app(model_id: str, **qp) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=90)
    at.query_params["model"] = model_id
    for k, v in qp.items():
        at.query_params[k] = v
    return at.run()


def _metrics(at: AppTest) -> list[tuple[str, str]]:
    return [(m.label, m.value) for m in at.metric]


def test_test_sample_matches_live_engine_run(live):
    from app.loaders import load_images, load_model

    trace = load_trace(live)
    sid = int(trace.sample_id[5])
    at = _app(live, sample=str(sid), policy="max_prob", t="0.6")
    assert not at.exception, at.exception
    model = load_model(live)
    from engine.registry import get_card

    images = load_images(get_card(live).dataset, "test")
    probs = image_exits(model, images.images[sid])
    k = int(exit_index(probs, Policy("max_prob", threshold=0.6)))
    shown = dict(_metrics(at))
    assert shown["Policy exits at"] == trace.meta.exit_names[k]
    assert shown["Prediction"] == trace.meta.class_names[int(probs[k].argmax())]
    # the live run agrees with the bundled trace's probabilities (real models only)
    if live != "fake_digits_cnn":
        row = int(np.flatnonzero(trace.sample_id == sid)[0])
        np.testing.assert_allclose(probs, trace.probs[row], atol=1e-4)
    # galleries of easiest / hardest samples are there
    assert any(b.label.isdigit() for b in at.button)
    # moving the policy's threshold can move the exit; it is the engine's answer again
    at.slider(key="w.t.max_prob").set_value(1.001).run()
    assert dict(_metrics(at))["Policy exits at"] == trace.meta.exit_names[-1]


def test_upload_image_and_attributions(live):
    at = _app(live)
    at.radio(key="w.input_source").set_value("Upload an image").run()
    at.file_uploader(key="w.image_upload").upload("one.png", png_bytes(64), "image/png")
    at.run()
    assert not at.exception, at.exception
    captions = [c for img in at.get("image") for c in img.captions]
    assert "before: as uploaded" in captions  # before and after preprocessing
    assert "background removed, cropped to the ink" in captions
    assert "after: what the model sees (28×28)" in captions
    labels = [m[0] for m in _metrics(at)]
    assert "Policy exits at" in labels and "FLOPs spent" in labels
    at.button(key="current.attr").click().run()
    assert not at.exception, at.exception
    assert any("IG convergence delta" in c.value for c in at.caption)


def test_pin_and_compare(live):
    trace = load_trace(live)
    a, b = (str(int(x)) for x in trace.sample_id[:2])
    at = _app(live, sample=a)
    at.button(key="b.pin").click().run()
    at.text_input(key="w.sample").set_value(b).run()
    assert not at.exception
    assert len([m for m in _metrics(at) if m[0] == "Policy exits at"]) == 2
    assert at.query_params["pin"] in (a, [a])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_image_uploads_show_a_message(live):
    cases = [
        ("corrupt.png", png_bytes(32)[:60], "corrupt or truncated"),
        ("notes.txt", b"this is not an image at all", "not an image"),
        ("blank.png", _png(Image.new("L", (40, 40), 0)), "blank"),
        ("paper.png", _png(Image.new("RGB", (640, 480), (235, 230, 220))), "blank"),
        ("lit.png", _png(Image.linear_gradient("L").resize((320, 240))), "nothing stands out"),
        ("huge.png", _png(Image.new("1", (6000, 6000), 0)), "megapixels"),  # tiny file
    ]
    at = _app(live)
    at.radio(key="w.input_source").set_value("Upload an image").run()
    for name, data, needle in cases:
        at.file_uploader(key="w.image_upload").upload(name, data, "application/octet-stream")
        at.run()
        assert not at.exception, at.exception
        errors = [e.value for e in at.error]
        assert any(needle in e for e in errors), (name, errors)
        assert not any(m.label == "Policy exits at" for m in at.metric)
    # and a good image afterwards works again: nothing broke
    at.file_uploader(key="w.image_upload").upload("ok.png", png_bytes(28), "image/png")
    at.run()
    assert not at.error and any(m.label == "Policy exits at" for m in at.metric)


def test_decode_image_messages():
    with pytest.raises(photo.ImageInputError, match="empty"):
        photo.decode_image(b"", "x.png")
    with pytest.raises(photo.ImageInputError, match="MB"):
        photo.decode_image(b"0" * (photo.MAX_UPLOAD_BYTES + 1), "x.png")
    prep = photo.prepare_image(png_bytes(50, mode="RGB"), "fashion_mnist")
    assert prep.model_input.shape == (28, 28) and prep.model_input.dtype == np.uint8
    assert not prep.inverted
    # dark ink on white paper is inverted to MNIST's white on black
    arr = np.full((60, 40), 255, dtype=np.uint8)
    arr[10:50, 18:22] = 0
    prep = photo.prepare_image(_png(Image.fromarray(arr)), "mnist")
    assert prep.inverted and prep.model_input.max() == 255 and prep.model_input[0, 0] == 0


def test_external_trace_shows_trace_rows_only(tmp_path, monkeypatch):
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    st.cache_data.clear()
    t = make_trace(n=300)
    t.write_parquet(tmp_path / "cache" / "traces" / f"{SYNTH_ID}__test.parquet")
    at = _app(SYNTH_ID, sample="7", policy="patience", p="1")
    assert not at.exception
    assert any("recorded outputs only" in i.value for i in at.info)
    k = int(exit_index(t, Policy("patience", patience=1))[7])
    assert dict(_metrics(at))["Policy exits at"] == t.meta.exit_names[k]
    assert at.radio(key="w.input_source").options == ["Test split"]
    at.text_input(key="w.sample").set_value("not-a-number").run()
    assert any("not a sample id" in e.value for e in at.error)
    st.cache_data.clear()


def test_test_images_position_full_and_gallery():
    from app.loaders import TestImages

    imgs = np.zeros((3, 28, 28), dtype=np.uint8)
    full = TestImages(imgs, np.arange(3), np.arange(3), "")
    assert [full.position(i) for i in (0, 2, 3, -1, "x")] == [0, 2, None, None, None]
    gallery = TestImages(imgs, np.arange(3), np.array([4, 17, 230]), "gallery only")
    assert [gallery.position(i) for i in (4, 17, 230, 5, 0)] == [0, 1, 2, None, None]


def test_photo_of_a_digit_is_read_as_the_clean_digit(tmp_path, monkeypatch):
    """Issue #14: a 640x480 photo of a dark digit on grey paper was called "8" at the first
    exit. Uploaded, it is now read as the engine reads the clean test digit."""
    from engine.data.images import load
    from engine.families import load_model
    from engine.registry import RegistryError
    from tests.test_photo import last_exit, render_photo

    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    st.cache_data.clear()
    try:
        model = load_model("mnist_multi_exit_cnn")
    except RegistryError as e:
        pytest.skip(f"bundled mnist_multi_exit_cnn not available: {e}")
    ts = load("mnist", "test")
    digit = ts.images[int(np.flatnonzero(ts.labels == 3)[0])]
    shot = render_photo(digit, np.random.default_rng(3), light_paper=True)
    at = _app("mnist_multi_exit_cnn", policy="max_prob", t="1.001")  # the last exit's answer
    at.radio(key="w.input_source").set_value("Upload an image").run()
    at.file_uploader(key="w.image_upload").upload("three.jpg", shot, "image/jpeg").run()
    assert not at.exception, at.exception
    assert not at.error
    assert dict(_metrics(at))["Prediction"] == str(int(last_exit(model, digit[None])[0])) == "3"
    assert any("inverted to white on black" in c.value for c in at.caption)
    st.cache_data.clear()
