"""A real browser on the real server: `streamlit run` + Debian's headless Chromium (Playwright).

Moves the tuning page's threshold slider with the keyboard and checks the displayed accuracy
changes, uploads an image in the inspector, and saves screenshots of both pages (to a temp
dir; set AIE_SCREENSHOT_DIR=assets/screenshots to refresh the README's). Skips outside CI
(env CI unset) when Chromium or Playwright is absent; in CI their absence is a failure.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM, require_browser, serve  # noqa: F401
from tests.helpers_app import SYNTH_ID, bundled_image_model, make_trace, png_bytes

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.browser


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`streamlit run streamlit_app.py` on a free local port; yields (base_url, model_id)."""
    require_browser()
    tmp = tmp_path_factory.mktemp("browser")
    env = {}
    model_id = bundled_image_model(("mnist", "fashion_mnist", "digits"))
    if model_id is None:  # no bundled model yet: a synthetic trace for the tuning page
        env["AIE_CACHE_DIR"] = str(tmp / "cache")
        make_trace(n=2000).write_parquet(tmp / "cache" / "traces" / f"{SYNTH_ID}__test.parquet")
        model_id = SYNTH_ID
    with serve(tmp, env) as base:
        yield base, model_id, tmp


def _shots_dir(tmp: Path) -> Path:
    d = Path(os.environ.get("AIE_SCREENSHOT_DIR", tmp / "screenshots"))
    if not d.is_absolute():
        d = ROOT / d
    d.mkdir(parents=True, exist_ok=True)
    return d


def _open(browser, url: str, height: int):
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.goto(url, timeout=60_000)
    return page


def _metric_value(page, label: str) -> str:
    m = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return m.locator('[data-testid="stMetricValue"]').inner_text().strip()


def test_tuning_slider_by_keyboard(server, browser):
    base, model_id, tmp = server
    page = _open(browser, f"{base}/tuning?model={model_id}&policy=max_prob&t=0.5", 2300)
    page.get_by_text("Accuracy vs compute").first.wait_for(timeout=60_000)
    before = _metric_value(page, "Accuracy")
    slider = page.get_by_role("slider").first
    slider.focus()
    after = before
    for _ in range(40):  # steps of 0.001 from 0.5, each a rerun of the fragment
        slider.press("ArrowRight")
        page.wait_for_timeout(400)
        after = _metric_value(page, "Accuracy")
        if after != before:
            break
    deadline = time.time() + 30
    while after == before and time.time() < deadline:
        page.wait_for_timeout(300)
        after = _metric_value(page, "Accuracy")
    assert after != before, f"accuracy stayed at {before}"
    deadline = time.time() + 30
    while page.url.endswith("t=0.5") and time.time() < deadline:  # the URL follows the slider
        page.wait_for_timeout(300)
    t = float(page.url.rsplit("t=", 1)[1])
    assert 0.5 < t <= 0.54, page.url
    # the screenshot shows a typical setting rather than the extreme the keys reached
    page.goto(f"{base}/tuning?model={model_id}&policy=max_prob&t=0.99", timeout=60_000)
    page.get_by_text("Accuracy vs compute").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)  # let the charts settle
    page.screenshot(path=str(_shots_dir(tmp) / "tuning.png"))
    # linked selection: clicking a bar of the exit histogram filters the metrics and the table
    # (box-select over the exit histogram's plot area, the way a user drags across bars)
    area = page.locator('[data-testid="stPlotlyChart"]').nth(1).locator("rect.nsewdrag").first
    box = area.bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] - 5, steps=8)
    page.mouse.move(box["x"] + box["width"] - 5, box["y"] + box["height"] - 5, steps=8)
    page.mouse.up()
    page.get_by_text("Selected slice").first.wait_for(timeout=60_000)
    page.get_by_text("Samples in the selected slice").first.wait_for(timeout=30_000)
    page.close()


def _digit_png() -> bytes:
    """A test digit drawn dark on light and enlarged, like a photo of a pen drawing."""
    try:
        from engine.data.images import load

        digit = load("mnist", "test").images[3]
    except Exception:
        return png_bytes(96)
    from PIL import Image

    img = Image.fromarray(255 - digit).resize((112, 112), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_inspector_upload(server, browser):
    base, model_id, tmp = server
    if model_id == SYNTH_ID:
        msg = "no bundled image model yet: the inspector's upload needs one"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    img = tmp / "digit.png"
    img.write_bytes(_digit_png())
    page = _open(browser, f"{base}/inspector?model={model_id}&policy=max_prob&t=0.9", 2600)
    page.get_by_text("Upload an image").first.wait_for(timeout=60_000)
    page.get_by_text("Upload an image").first.click()
    page.locator('input[type="file"]').first.set_input_files(str(img))
    page.get_by_text("what the model sees").first.wait_for(timeout=60_000)
    page.get_by_text("Policy exits at").first.wait_for(timeout=30_000)
    assert not page.get_by_text("Traceback").count()
    page.get_by_role("button", name="Compute attributions").first.click()
    page.get_by_text("IG convergence delta").first.wait_for(timeout=60_000)
    page.wait_for_timeout(800)
    page.screenshot(path=str(_shots_dir(tmp) / "inspector.png"))
    page.close()


def test_halting_page_ponders_an_uploaded_digit(server, browser):
    """Pick the image ACT model by URL, upload a digit, see its live halting curve."""
    from engine import families

    base, _, tmp = server
    if "mnist_act" not in [c.model_id for c, _ in families.cards_of_kind("halt")]:
        pytest.skip("mnist_act is not bundled")
    img = tmp / "digit_act.png"
    img.write_bytes(_digit_png())
    page = _open(browser, f"{base}/halting?model=mnist_act&eps=0.05", 2300)
    page.get_by_text("Ponder your own image").first.wait_for(timeout=60_000)
    assert _metric_value(page, "Mean steps")
    page.locator('input[type="file"]').first.set_input_files(str(img))
    page.get_by_text("counted by torch on the steps that ran").first.wait_for(timeout=60_000)
    page.get_by_text("never computed those steps").first.wait_for(timeout=30_000)
    assert not page.get_by_text("Traceback").count()
    # the README's screenshot: parity, where difficulty is known exactly
    page.goto(f"{base}/halting?model=parity_act", timeout=60_000)
    page.get_by_text("every halting model on this data set").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(_shots_dir(tmp) / "halting.png"))
    page.close()


def test_tuning_trace_upload_shows_field_names_and_cost_unit_as_typed(server, browser):
    """What a user reads after uploading: the NaN field as typed (Markdown once rendered
    ``prob_e*_c*`` as "prob_e_c" in italics), and a CSV header's cost unit on the metrics."""
    base, model_id, tmp = server
    ext = make_trace(n=200, k=3, c=4, seed=3, model_id="gbm")
    df = ext.to_frame()
    (tmp / "nan.csv").write_bytes(
        df.with_columns(df["prob_e1_c2"].scatter(7, float("nan"))).write_csv().encode()
    )
    (tmp / "gbm.csv").write_bytes(b"# cost_unit: trees\n" + ext.to_csv_bytes())
    page = _open(browser, f"{base}/tuning?model={model_id}", 2300)
    page.get_by_text("Accuracy vs compute").first.wait_for(timeout=60_000)
    panel = page.locator('[data-testid="stExpander"]').filter(has_text="Upload a trace").first
    panel.get_by_text("Upload a trace").first.click()
    panel.get_by_text("aie.trace").first.wait_for(timeout=30_000)  # the format, in the app
    assert not panel.get_by_text("engine/trace.py").count()
    panel.locator('input[type="file"]').first.set_input_files(str(tmp / "nan.csv"))
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="rejected").first
    alert.wait_for(timeout=60_000)
    assert "prob_e*_c*" in alert.inner_text() and "prob_e1_c2" in alert.inner_text()
    panel.locator('input[type="file"]').first.set_input_files(str(tmp / "gbm.csv"))
    page.get_by_text("it is the selected trace now").first.wait_for(timeout=60_000)
    page.locator('[data-testid="stMetric"]').filter(has_text="Mean trees").first.wait_for(
        timeout=60_000
    )
    assert _metric_value(page, "Mean trees").endswith("trees")
    assert not page.get_by_text("Traceback").count()
    page.close()
