"""What a user hits in the first hour, in a real browser on a server started as `make app` does.

A burst of 40 key presses on the threshold slider must all count, and afterwards the slider,
the metrics and the URL must agree; a shared link opened first on a fresh server must show the
router's page titles; and no page may ask anything outside this machine (its favicon included).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app import figures
from engine.core import tradeoff
from engine.core.policies import Policy, exit_index
from engine.trace_store import load_trace, trace_file
from tests.conftest import serve

ROOT = Path(__file__).resolve().parent.parent
MODEL = "mnist_multi_exit_cnn"
TITLES = ["Guided tour", "Threshold tuning", "Sample inspector", "Compare methods"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("first_hour")) as base:
        yield base


def _page(browser, height: int = 1800):
    """A new page that records every URL it requests."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.requested = []
    page.on("request", lambda r: page.requested.append(r.url))
    return page


def _nav(page) -> str:
    nav = page.locator('[data-testid="stSidebarNav"]')
    nav.wait_for(timeout=60_000)
    return nav.inner_text()


def _wait_idle(page, quiet_s: float = 3.0, timeout_s: float = 120.0) -> None:
    """Until the app has shown no running indicator for quiet_s (a slow box takes a while)."""
    deadline = time.time() + timeout_s
    quiet_since = None
    while time.time() < deadline:
        if page.locator('[data-testid="stStatusWidget"]').count():  # shown while a run is on
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since >= quiet_s:
            return
        page.wait_for_timeout(200)
    pytest.fail(f"the app was still rerunning after {timeout_s:.0f} s at {page.url}")


def _shown(page) -> dict[str, str]:
    """Slider text, the policy caption and the four metrics, as rendered."""
    out = {"slider": page.locator('[data-testid="stSliderThumbValue"]').first.inner_text()}
    cap = page.locator('[data-testid="stCaptionContainer"]').filter(has_text="labelled)").first
    out["policy"] = cap.inner_text().split(" · ")[0].strip()
    for m in page.locator('[data-testid="stMetric"]').all():
        label = m.locator('[data-testid="stMetricLabel"]').inner_text().strip()
        out[label] = m.locator('[data-testid="stMetricValue"]').inner_text().strip()
    return out


def _expected(policy: Policy) -> dict[str, str]:
    trace = load_trace(MODEL)
    s = tradeoff.evaluate(trace, exit_index(trace, policy))
    unit = trace.meta.cost_unit
    return {
        "policy": policy.describe(),
        "Accuracy": f"{s.accuracy:.4f}",
        f"Mean {unit}": figures.fmt_flops(s.mean_cost) + unit,
        f"p95 {unit}": figures.fmt_flops(s.p95_cost) + unit,
        "Speed-up vs last exit": f"{s.speedup:.2f}×",
    }


def _local_only(page, base: str) -> None:
    outside = [u for u in page.requested if not u.startswith(base) and not u.startswith("data:")]
    assert not outside, f"the page asked outside hosts: {outside}"


@pytest.mark.browser
def test_deep_link_first_on_a_fresh_server_shows_page_titles(browser, tmp_path):
    """/tuning as the very first request: the router's titles, not file names, and the page."""
    with serve(tmp_path) as base:
        page = _page(browser)
        page.goto(f"{base}/tuning", timeout=60_000)
        page.get_by_text("Accuracy vs compute").first.wait_for(timeout=90_000)
        _wait_idle(page)
        nav = _nav(page)
        for title in TITLES:
            assert title in nav, nav
        assert "streamlit app" not in nav, nav
        assert page.locator("h1").first.inner_text().startswith("Threshold tuning")
        assert page.url.startswith(f"{base}/tuning")
        # a second browser session on the same server sees the titles as well
        other = _page(browser)
        other.goto(f"{base}/inspector", timeout=60_000)
        nav = _nav(other)
        assert all(t in nav for t in TITLES), nav
        other.close()
        page.close()


@pytest.mark.browser
def test_every_key_press_counts_and_the_numbers_follow(server, browser):
    """40 fast ArrowLeft presses from t=0.9: the slider says 0.8600 and every number is t=0.86."""
    if not trace_file(MODEL).exists():
        pytest.skip(f"{MODEL}'s trace is not bundled")
    page = _page(browser)
    page.goto(f"{server}/tuning?model={MODEL}&t=0.9", timeout=60_000)
    page.get_by_text("Accuracy vs compute").first.wait_for(timeout=90_000)
    _wait_idle(page)
    shown = _shown(page)
    assert shown.pop("slider") == "0.9000", shown
    assert shown == _expected(Policy("max_prob", threshold=0.9))
    page.get_by_role("slider").first.focus()
    for _ in range(40):
        page.keyboard.press("ArrowLeft")  # no waits: as fast as a held key
    _wait_idle(page)
    shown = _shown(page)
    assert shown.pop("slider") == "0.8600", shown
    assert shown == _expected(Policy("max_prob", threshold=0.86))
    t = page.url.split("t=", 1)[1].split("&")[0]
    assert float(t) == pytest.approx(0.86), page.url
    _local_only(page, server)
    page.close()


@pytest.mark.browser
def test_no_request_leaves_the_machine(server, browser):
    """Offline means offline: the landing page and its favicon come from this server."""
    page = _page(browser)
    page.goto(f"{server}/", timeout=60_000)
    nav = _nav(page)
    assert "Threshold tuning" in nav
    _wait_idle(page)
    icons = [
        page.locator("link[rel*=icon]").nth(i).get_attribute("href")
        for i in range(page.locator("link[rel*=icon]").count())
    ]
    assert icons, "no favicon"
    for href in icons:
        assert href.startswith(("/", server, "./", "data:")) or "://" not in href, href
    _local_only(page, server)
    page.close()
