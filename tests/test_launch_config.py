"""The launch config in .streamlit/config.toml, and the router's page config (favicon)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest
from streamlit.watcher.folder_black_list import FolderBlackList

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".streamlit" / "config.toml"


def _options() -> dict[str, object]:
    with open(CONFIG, "rb") as f:
        return {f"{s}.{k}": v for s, opts in tomllib.load(f).items() for k, v in opts.items()}


def test_config_names_only_real_streamlit_options():
    for name in _options():
        st.get_option(name)  # raises for a name Streamlit does not know (and would ignore)


def test_no_recursive_watch_over_the_project_folder():
    """watchdog watches the entry script's folder recursively, .venv included; polling only
    watches the app's own modules."""
    assert _options()["server.fileWatcherType"] in ("poll", "none")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/lib/python3.11/site-packages/numpy/__init__.py",
        ".cache/traces/x.parquet",
        ".data/policies/x.json",
        "assets/models/x.py",
    ],
)
def test_venv_caches_and_assets_are_not_watched(path):
    blacklist = FolderBlackList(_options()["server.folderWatchBlacklist"])
    assert blacklist.is_blacklisted(str(ROOT / path))
    assert not blacklist.is_blacklisted(str(ROOT / "app" / "widgets.py"))


def test_favicon_is_a_file_shipped_in_assets(monkeypatch):
    """A ":material/..." page icon becomes a favicon URL on a font host; a file is served here."""
    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        st.stop()  # the router's page config is all this test needs

    monkeypatch.setattr(st, "set_page_config", capture)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    icon = seen["page_icon"]
    assert isinstance(icon, (str, Path)) and not str(icon).startswith(":"), icon
    path = Path(icon)
    assert path.resolve().parent == ROOT / "assets", path
    with Image.open(path) as img:
        assert img.size[0] >= 16 and img.size == img.size[::-1]
