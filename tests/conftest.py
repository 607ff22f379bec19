"""Shared fixtures: one headless Chromium (Debian's, driven by Playwright) for all browser tests.

A process can hold only one sync Playwright session, so every browser test module uses this
session-scoped ``browser``. Outside CI the browser tests skip when Chromium or Playwright is
absent, saying so; in CI (env CI set) their absence is a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a user saved (policies, their own models) must never leak into a test run, nor a test's
# into the user's folder: every test process gets its own data directory.
os.environ["AIE_DATA_DIR"] = tempfile.mkdtemp(prefix="aie-data-")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def require_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium ({CHROMIUM}; apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        msg = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set, so this is not skipped)")
        pytest.skip(msg + "; skipped because CI is unset")


@pytest.fixture(scope="session")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(tmp: Path, env: dict | None = None):
    """A fresh ``streamlit run streamlit_app.py`` on a free local port with the Makefile's flags
    only (so .streamlit/config.toml applies, as under ``make app``); yields its base URL.

    Only /_stcore/health is asked before yielding, so the caller's first page is the server's.
    """
    require_browser()
    port = free_port()
    log_path = tmp / "streamlit.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
                "--server.headless", "true",
                "--server.address", "127.0.0.1",
                "--server.port", str(port),
                "--browser.gatherUsageStats", "false",
            ],
            cwd=ROOT,
            env={**os.environ, "AIE_DATA_DIR": str(tmp / "data"), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("streamlit did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.3)
        try:
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def page_env(tmp_path, monkeypatch):
    """A page test's own data and cache folders (``tmp_path``), empty Streamlit caches before
    and after, and local trace paths allowed (as on a loopback server)."""
    import streamlit as st

    from app import loaders

    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(loaders.LOCAL_PATHS_ENV, "1")
    st.cache_data.clear()
    st.cache_resource.clear()
    yield tmp_path
    st.cache_data.clear()
    st.cache_resource.clear()
