"""AppTest of the mixture-of-experts page (pages/routing.py) with the bundled models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from engine.data import photo
from engine.families.moe import analysis as moe

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "routing.py")


def metrics(at: AppTest) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in at.metric:
        out.setdefault(m.label, []).append(m.value)
    return out


def sweep_point(model_id: str, setting: str) -> dict:
    pts = moe.load_sweep(moe.sweep_file(model_id))["points"]
    return next(p for p in pts if p["setting"] == setting)


@pytest.fixture(scope="module")
def at() -> AppTest:
    app = AppTest.from_file(PAGE, default_timeout=90).run()
    assert not app.exception
    return app


def test_default_view_shows_dynamic_k_routing(at):
    assert at.radio(key="moe.model").value == "fashion_d2dmoe_vit"
    m = metrics(at)
    point = sweep_point("fashion_d2dmoe_vit", "tau=0.5")
    assert m["Test accuracy"] == [f"{point['accuracy']:.2%}"]
    assert m["Experts per token"][1] == f"{point['experts_per_token_mean']:.2f}"
    assert 1 <= float(m["Experts per token"][0]) <= 8  # the one input's routing
    assert len(at.get("plotly_chart")) == 6  # heatmap, overlay, and the four data-set views
    assert not at.error


def test_tau_extremes_on_the_page(at):
    at.select_slider(key="moe.tau").set_value(1.0).run()
    m = metrics(at)
    assert m["Experts per token"] == ["1.00", "1.00"]
    at.select_slider(key="moe.tau").set_value(0.0).run()
    m = metrics(at)
    assert m["Experts per token"] == ["8.00", "8.00"]
    assert m["FLOPs per sample"][0].startswith("6.95")
    at.select_slider(key="moe.tau").set_value(0.5).run()


def test_top_k_model_respects_k(at):
    at.radio(key="moe.model").set_value("fashion_moe_vit").run()
    at.radio(key="moe.k").set_value(1).run()
    at.radio(key="moe.cf").set_value("no limit").run()
    assert not at.exception
    m = metrics(at)
    assert m["Experts per token"] == ["1.00", "1.00"]
    assert m["Dropped token choices"] == ["0"]
    point = sweep_point("fashion_moe_vit", "top-1, capacity none")
    assert m["Test accuracy"] == [f"{point['accuracy']:.2%}"]
    at.radio(key="moe.cf").set_value("1.0").run()
    m = metrics(at)
    assert float(m["Experts per token"][0]) < 1  # capacity drops tokens
    at.radio(key="moe.model").set_value("fashion_d2dmoe_vit").run()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_good_and_bad(at):
    at.radio(key="moe.source").set_value("Upload").run()
    assert any("Upload an image" in i.value for i in at.info)
    img = np.zeros((56, 56), np.uint8)
    img[10:46, 20:36] = 255
    at.get("file_uploader")[0].upload("trouser.png", png(img), "image/png").run()
    assert not at.exception and not at.error
    assert "Prediction" in metrics(at)
    assert len(at.get("plotly_chart")) == 6
    # the upload is shown before and after preparation, and the model ran on the "after"
    captions = [c for img in at.get("image") for c in img.captions]
    assert captions[:2] == ["before: as uploaded", "after: what the model sees (28×28)"]
    at.get("file_uploader")[0].upload("notes.png", b"definitely not a png", "image/png").run()
    assert not at.exception
    assert any("cannot be used: notes.png is not an image" in e.value for e in at.error)
    huge = b"\x89PNG" + bytes(photo.MAX_UPLOAD_BYTES + 10)
    at.get("file_uploader")[0].upload("huge.png", huge, "image/png").run()
    assert any("images up to 10 MB are accepted" in e.value for e in at.error)
    assert "Prediction" not in metrics(at)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_flat_upload_is_refused_as_on_the_other_pages(at, value):
    """A blank image used to be routed (and classified) here; the inspector refused it."""
    at.radio(key="moe.source").set_value("Upload").run()
    flat = np.full((64, 48), value, np.uint8)
    at.get("file_uploader")[0].upload("flat.png", png(flat), "image/png").run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "This file cannot be used: flat.png is blank (a single flat colour): there is nothing "
        "to read"
    ]
    assert "Prediction" not in metrics(at)


def _luminance(colour: str) -> float:
    from plotly.colors import hex_to_rgb

    r, g, b = (v / 255 for v in hex_to_rgb(colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_ran_markers_show_on_dark_and_bright_cells_and_title_clears_the_labels():
    """Every 'expert ran' position is outlined in a dark and in a light colour (the cells run
    from Viridis's dark purple to its yellow), and the two-line title pushes the plot down
    rather than overlapping the expert labels on the top axis."""
    from app import figures_moe as figs

    scores = np.linspace(0, 1, 16 * 8).reshape(16, 8)  # the darkest to the brightest cell
    chosen = np.zeros((16, 8), bool)
    chosen[0, 0] = chosen[15, 7] = chosen[7, 3] = True
    fig = figs.routing_heatmap(scores, chosen, 4, title="Layer 1", subtitle="colour: score")
    at = {(x, y) for x, y in zip(fig.data[1].x, fig.data[1].y, strict=True)}
    # the colour each trace strokes: an open symbol strokes in marker.color, not line.color
    outlines = [
        tr.marker.color if str(tr.marker.symbol).endswith("-open") else tr.marker.line.color
        for tr in fig.data[1:]
        if {(x, y) for x, y in zip(tr.x, tr.y, strict=True)} == at
    ]
    assert None not in outlines and len(outlines) >= 2
    lum = [_luminance(c) for c in outlines]
    assert min(lum) <= 0.1 and max(lum) >= 0.9
    assert sum(tr.showlegend is not False for tr in fig.data[1:]) == 1  # one legend entry
    title = fig.layout.title
    assert fig.layout.xaxis.side == "top"
    assert title.text == "Layer 1" and title.subtitle.text == "colour: score"
    assert "<br>" not in title.text
    # in the container's margin, which plotly grows until title and tick labels do not meet
    assert title.yref == "container" and title.automargin is True and title.yanchor == "top"


def test_figures_mark_what_ran():
    from app import figures_moe as figs
    from app.palette import expert_color

    rng = np.random.default_rng(0)
    scores = rng.random((16, 8))
    chosen = scores > 0.7
    fig = figs.routing_heatmap(scores, chosen, 4, dropped=np.zeros(16, int))
    marks = fig.data[1]
    assert len(marks.x) == chosen.sum()
    assert list(marks.marker.color) == [expert_color(int(c)) for c in np.nonzero(chosen)[1]]
    over = figs.patch_overlay(np.zeros((28, 28), np.uint8), chosen, scores, 7)
    assert len(over.layout.shapes) == 16
    load = np.array([[2, 2, 2, 2, 0, 0, 0, 0]] * 2)
    fig = figs.expert_load(load, tokens=8)
    assert [s.y0 for s in fig.layout.shapes] == [0.125, 0.125]  # 1 expert/token over 8
    pts = [
        {"setting": f"tau={t}", "flops_mean": f, "accuracy": a, "experts_per_token_mean": e}
        for t, f, a, e in [(0, 10.0, 0.9, 8), (1, 5.0, 0.8, 1)]
    ]
    fig = figs.accuracy_compute(pts, dense_flops=10.0, current=1)
    cur = fig.data[-1]
    assert (list(cur.x), list(cur.y)) == ([0.5], [0.8]) and "τ=1" in cur.name
