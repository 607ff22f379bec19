"""Slider-to-numbers latency and bytes per rerun, in a real browser, for every page with a slider.

Starts ``streamlit run streamlit_app.py`` headless on a free port (and a minimal one-slider app
as the baseline), drives Debian's Chromium with Playwright and, on each page, presses
ArrowRight on the page's first slider ``--presses`` times. Per press it records

* **numbers**: key press → the page's watched number text (metric values, captions, the compare
  page's subheader) has changed in the DOM;
* **idle**: key press → the rerun is over (Streamlit's status widget gone) and a frame painted,
  so large charts drawing after the numbers are counted too;
* **KB**: bytes of the websocket frames the server sent for that rerun (unchanged elements of
  10 KB or more go as a reference to the browser's copy, so this is what really travelled).

Medians per page are printed as a table with the load average before and after. Speed target
(issue #14 item 5, quiet machine): numbers < 0.5 s on every page, and no rerun over 500 KB.

    python bench/browser_latency.py [--presses 7] [--pages tuning,skipping]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
TARGET_S = 0.5
TARGET_KB = 500
PAGES = ("tuning", "skipping", "halting", "routing", "language", "compare")
BASELINE_APP = """
import streamlit as st
x = st.slider("x", 0, 100, 50)
st.metric("twice x", 2 * x)
"""
# the text whose change means "the numbers are updated": metrics, captions and subheaders
WATCH_JS = """() => [...document.querySelectorAll(
    '[data-testid="stMetricValue"], [data-testid="stCaptionContainer"], h3')]
    .map(e => e.innerText).join('|')"""
RUNNING_JS = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(script: Path, cwd: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port),
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, base
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("streamlit did not start:\n" + log.read_text()[-3000:])


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_idle(page, timeout_ms: int = 120_000) -> None:
    page.wait_for_function(RUNNING_JS, timeout=timeout_ms, polling=50)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)))")


def measure_page(page, url: str, presses: int, received: list[int]) -> dict:
    """Median seconds to updated numbers and to idle, and median KB received, per press."""
    page.goto(url)
    slider = page.get_by_role("slider").first
    slider.wait_for(timeout=180_000)
    page.wait_for_timeout(1500)  # let the first run settle (status widget shows after a delay)
    wait_idle(page)
    numbers, idle, kb = [], [], []
    for _ in range(presses):
        before = page.evaluate(WATCH_JS)
        slider.focus()
        received.clear()
        t0 = time.perf_counter()
        page.keyboard.press("ArrowRight")
        try:
            page.wait_for_function(
                f"old => ({WATCH_JS})() !== old", arg=before, timeout=60_000, polling="raf"
            )
            t_num = time.perf_counter() - t0
        except Exception:  # the watched text did not change (slider at its end): skip it
            t_num = None
        wait_idle(page)
        t_idle = time.perf_counter() - t0
        page.wait_for_timeout(300)  # late frames of this rerun
        if t_num is not None:
            numbers.append(t_num)
            idle.append(max(t_idle, t_num))
            kb.append(sum(received) / 1e3)
    if not numbers:
        return {"numbers": float("nan"), "idle": float("nan"), "kb": float("nan"), "n": 0}
    return {
        "numbers": statistics.median(numbers),
        "idle": statistics.median(idle),
        "kb": statistics.median(kb),
        "kb_max": max(kb),
        "n": len(numbers),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presses", type=int, default=7)
    ap.add_argument("--pages", default=",".join(PAGES))
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"needs Debian Chromium at {CHROMIUM}")
        return 1
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM_ARGS

    tmp = Path(tempfile.mkdtemp(prefix="aie-bench-browser-"))
    env = {**os.environ, "AIE_DATA_DIR": str(tmp / "data"), "HF_HUB_OFFLINE": "1"}
    (tmp / "baseline.py").write_text(BASELINE_APP)
    load_before = os.getloadavg()
    rows = []
    app, base = start_server(ROOT / "streamlit_app.py", ROOT, env, tmp / "app.log")
    mini, mini_base = start_server(tmp / "baseline.py", tmp, env, tmp / "baseline.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            received: list[int] = []
            targets = [("baseline (one slider)", mini_base + "/")]
            targets += [(name, f"{base}/{name}") for name in args.pages.split(",") if name]
            for name, url in targets:
                page = browser.new_page(viewport={"width": 1400, "height": 2400})
                page.on(
                    "websocket",
                    lambda ws: ws.on("framereceived", lambda f: received.append(len(f))),
                )
                page.goto(url)  # warm-up visit: caches filled, first model runs done
                page.get_by_role("slider").first.wait_for(timeout=180_000)
                page.wait_for_timeout(1500)
                wait_idle(page, 300_000)
                r = measure_page(page, url, args.presses, received)
                rows.append((name, r))
                print(
                    f"{name}: numbers {r['numbers']:.2f} s, idle {r['idle']:.2f} s, "
                    f"{r['kb']:.0f} KB/rerun ({r['n']} presses)",
                    flush=True,
                )
                page.close()
            browser.close()
    finally:
        stop(app)
        stop(mini)
    load_after = os.getloadavg()
    print(f"\nload average before: {' '.join(f'{v:.2f}' for v in load_before)}")
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in load_after)}")
    print(f"targets: numbers < {TARGET_S} s, < {TARGET_KB} KB per rerun\n")
    print(
        "| page | slider → numbers (median) | slider → idle (median) | KB per rerun (median, max) |"
    )
    print("|---|---|---|---|")
    for name, r in rows:
        ok = r["numbers"] < TARGET_S and r.get("kb_max", 0) < TARGET_KB
        print(
            f"| {name} | {r['numbers']:.2f} s | {r['idle']:.2f} s | "
            f"{r['kb']:.0f}, {r.get('kb_max', float('nan')):.0f} |" + ("" if ok else " ✘")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
