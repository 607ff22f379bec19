"""The Your models page in a real browser: a typed local path becomes a model in the pickers.

A tiny BERT and a keyword CSV made here are added through the form and its test trace is
written where the tuning page finds it (that page's listing is checked with AppTest in
tests/test_byo_hf.py); a pickled checkpoint gets one sentence on the page.
"""

from __future__ import annotations

import pytest

from tests import helpers_byo as H
from tests.conftest import serve

pytestmark = pytest.mark.browser


def test_add_an_encoder_from_the_page(browser, tmp_path):
    bert = H.tiny_bert(tmp_path / "bert")
    csv = H.keyword_csv(tmp_path / "reviews.csv")
    pickled = H.tiny_bert(tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with serve(tmp_path, {"AIE_CACHE_DIR": str(tmp_path / "cache")}) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(base + "/my_models", timeout=60_000)
        page.get_by_text("only from the command line").wait_for(timeout=60_000)

        def add(path, name, data):
            page.get_by_role("textbox", name="Model folder or GGUF file").fill(str(path))
            page.get_by_role("textbox", name="Name in the app").fill(name)
            page.get_by_role("textbox", name="Data file").fill(str(data))
            page.get_by_role("button", name="Add the model").click()

        add(pickled, "pickled_bert", csv)
        page.get_by_text("convert them to safetensors").wait_for(timeout=120_000)
        add(bert, "browser_bert", csv)
        page.get_by_text("Added browser_bert").wait_for(timeout=300_000)
        # the list (a canvas grid, not DOM text) replaces the "no model yet" line
        page.locator('[data-testid="stDataFrame"]').wait_for(timeout=60_000)
        assert page.get_by_text("not added a model yet").count() == 0
        assert (tmp_path / "data" / "traces" / "browser_bert__test.parquet").exists()
