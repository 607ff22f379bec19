"""AppTest of pages/my_models.py: the user's models listed, a typed local path added through
the same engine function as the CLI, every bad input one sentence on the page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from engine.families.hf_causal_lm import tuned_lens as TL
from engine.registry import get_card
from tests import helpers_byo as H

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "my_models.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_files")
    pickled = d / "pickled"
    H.tiny_bert(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    bad_csv = d / "bad.csv"
    bad_csv.write_text("review,label\n" + "a,b\n" * 30)
    return {
        "bert": H.tiny_bert(d / "bert"),
        "csv": H.keyword_csv(d / "reviews.csv"),
        "llama": H.tiny_llama(d / "llama"),
        "text": H.text_file(d / "notes.txt"),
        "pickled": pickled,
        "bad_csv": bad_csv,
        "dir": d,
    }


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    st.cache_data.clear()
    st.cache_resource.clear()
    yield tmp_path / "data"
    st.cache_data.clear()
    st.cache_resource.clear()


def submit(path="", name="", data="", joint=False, overwrite=False) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=240).run()
    assert not at.exception, at.exception
    at.text_input[0].input(str(path))
    at.text_input[1].input(name)
    at.text_input[2].input(str(data))
    if joint:
        at.checkbox[0].check()
    if overwrite:
        at.checkbox[1].check()
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_empty_page_says_python_files_come_from_the_command_line(data_dir):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("only from the command line" in i.value for i in at.info)
    assert any("not added a model yet" in c.value for c in at.caption)
    assert not at.dataframe


def test_adds_a_causal_lm_and_lists_it(files, data_dir):
    at = submit(files["llama"], "page_llama", files["text"])
    assert not errors(at), errors(at)
    assert any("Added page_llama" in s.value for s in at.success)
    table = at.dataframe[0].value
    row = table.to_dict("records")[0]
    assert row["id"] == "page_llama" and row["kind"] == "causal LM"
    assert "logit-lens agreement" in row["metrics"]
    assert str(files["text"]) in row["data"]
    card = get_card("page_llama")
    assert len(card.raw["metrics"]["logit_lens"]["agreement_per_layer"]) == 3
    assert "held-out KL at layer 1: tuned lens" in row["metrics"]  # a tuned lens, trained on it
    lens = TL.lens_for(card)
    assert lens is not None and lens.path.parent == data_dir / "models" / "lenses"
    # the same name again, without "replace": refused, the card as it was
    before = card.path.read_bytes()
    at = submit(files["llama"], "page_llama")
    assert any("tick “Replace my model of the same name”" in e for e in errors(at)), errors(at)
    assert card.path.read_bytes() == before
    # ticked: replaced (without a text file this time, so no lens metrics)
    at = submit(files["llama"], "page_llama", overwrite=True)
    assert not errors(at), errors(at)
    assert get_card("page_llama").raw["metrics"] == {}
    assert TL.lens_for(get_card("page_llama")) is None and not lens.path.exists()


def test_adds_an_encoder_with_trained_exits(files, data_dir):
    at = submit(files["bert"], "page_bert", files["csv"])
    assert not errors(at), errors(at)
    row = at.dataframe[0].value.to_dict("records")[0]
    assert row["kind"] == "encoder + exits" and "test accuracy" in row["metrics"]
    assert (data_dir / "traces" / "page_bert__test.parquet").exists()


@pytest.mark.parametrize(
    "case, args, words",
    [
        ("empty path", ("", "x"), "Type the path"),
        ("no name", ("FOLDER", ""), "Give the model a name"),
        ("missing", ("NOWHERE", "x", "CSV"), "is not a model folder"),
        ("pickled", ("pickled", "x", "CSV"), "convert them to safetensors"),
        ("no text column", ("bert", "x", "bad_csv"), "no 'text' column"),
        ("encoder without data", ("bert", "x"), "give --csv"),
        ("bad name", ("bert", "Bad Name!", "CSV"), "use 1-64 lower-case"),
    ],
)
def test_bad_input_is_one_sentence(case, args, words, files, data_dir):
    subst = {"FOLDER": files["bert"], "NOWHERE": files["dir"] / "nowhere", "CSV": files["csv"]}
    args = [subst.get(a) or files.get(a) or a for a in args]
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / "keep.json").write_text(json.dumps({"untouched": True}))
    at = submit(*args)
    errs = errors(at)
    assert len(errs) == 1 and words in errs[0], errs
    assert "Traceback" not in errs[0] and "\n" not in errs[0]
    assert sorted(p.name for p in (data_dir / "models").iterdir()) == ["keep.json"]
    shutil.rmtree(data_dir / "models")


def test_router_lists_the_page():
    src = (ROOT / "streamlit_app.py").read_text()
    assert '("pages/my_models.py", "Your models"' in src
