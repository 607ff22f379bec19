"""AppTest for the layer-skipping page (and both record-driven pages without records), asserting
the numbers the engine computes."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.families.act import records as halting
from engine.families.skipnet import records as skipping
from engine.families.skipnet.records import records_file

ROOT = Path(__file__).resolve().parent.parent
SKIP_OK = records_file("mnist_skipnet").exists()


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.mark.skipif(not SKIP_OK, reason="mnist_skipnet records not bundled")
def test_skipping_page_shows_engine_numbers_and_reacts_to_the_threshold():
    rec = skipping.load_records("mnist_skipnet")
    at = AppTest.from_file(str(ROOT / "pages/skipping.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    s = skipping.summary(rec, rec.index_of(0.5))
    m = metrics(at)
    assert m["Accuracy"] == f"{s['accuracy']:.2%}"
    assert m["Blocks skipped"] == f"{s['skip_rate']:.1%}"
    assert m["Mean FLOPs per input"] == f"{s['mean_flops'] / 1e6:.2f} M"
    assert len(at.get("plotly_chart")) >= 4

    at.select_slider[0].set_value(1.0).run()
    s1 = skipping.summary(rec, rec.index_of(1.0))
    m1 = metrics(at)
    assert m1["Blocks skipped"] == f"{s1['skip_rate']:.1%}"
    assert m1["Accuracy"] == f"{s1['accuracy']:.2%}"
    assert m1["Mean FLOPs per input"] != m["Mean FLOPs per input"]

    at.select_slider[0].set_value(0.0).run()
    assert metrics(at)["Blocks skipped"] == "0.0%"  # threshold 0 runs every block


def test_pages_fail_gracefully_without_records(monkeypatch, tmp_path):
    monkeypatch.setattr(skipping, "RECORDS_DIR", tmp_path)
    monkeypatch.setattr(halting, "RECORDS_DIR", tmp_path)
    import streamlit as st

    st.cache_data.clear()  # earlier tests cached the real records
    try:
        for page in ("pages/skipping.py", "pages/halting.py"):
            at = AppTest.from_file(str(ROOT / page), default_timeout=60).run()
            assert not at.exception
            assert "missing" in at.error[0].value
    finally:
        st.cache_data.clear()  # nor may later tests see the empty lists cached here
