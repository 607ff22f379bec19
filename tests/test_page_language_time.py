"""AppTest: the language page's decoders on the time axis (SmolLM2's study chart, a live run's
measured against predicted time, the char LM's tab)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from engine.core import costs
from engine.run.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
B1 = costs.time_unit(1)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("AIE_LM_CARD", raising=False)
    st.cache_data.clear()
    yield
    st.cache_data.clear()


def page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    return at


def decode(v):
    """A trace's array as sent to the browser (plotly sends numpy arrays base64)."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return v


def traces_with(at: AppTest, name: str) -> tuple[dict, list[dict]]:
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        if any(t.get("name") == name for t in spec["data"]):
            data = [{k: decode(v) for k, v in t.items()} for t in spec["data"]]
            return spec["layout"], data
    raise AssertionError(f"no chart has a trace {name!r}")


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_study_chart_moves_to_ms_per_token_with_each_tokens_reads():
    from engine.families.hf_causal_lm.study import METHOD_LABELS, load_study, study_files
    from engine.families.hf_causal_lm.timing import exits_ms, static_ms, study_curves_ms

    if not study_files()["card"].exists():
        pytest.skip("the SmolLM2 study is not built")
    profile, study = load_profile("smollm2_135m"), load_study()
    at = page()
    fixed = METHOD_LABELS["exit_fixed"]
    layout, data = traces_with(at, fixed)
    assert "layers per token" in layout["xaxis"]["title"]["text"]
    at.radio(key="slm.st.axis").set_value(B1).run()
    assert not at.exception, at.exception
    layout, data = traces_with(at, fixed)
    assert B1 in layout["xaxis"]["title"]["text"]
    by_name = {t["name"]: t for t in data}
    n = study.n_layer
    np.testing.assert_allclose(
        by_name[fixed]["x"], np.sort(static_ms(profile, B1, np.arange(1, n + 1)))
    )
    ms = study_curves_ms(study, profile, B1)
    calm = study.curves["method"].to_numpy() == "calm_max_prob"
    np.testing.assert_allclose(
        sorted(by_name[METHOD_LABELS["calm_max_prob"]]["x"]), np.sort(ms[calm])
    )
    # the slider's setting: its tokens' exits, with the reads max-prob asks at each
    out = study.simulate("max_prob", 0.9)
    want = exits_ms(profile, B1, out.exit_layer, n, "max_prob").mean()
    star = next(t for t in data if t["name"].startswith("your setting"))
    assert star["x"] == pytest.approx([want])
    assert metrics(at)[f"Time per token, {B1}"] == f"{want:.3g} ms"
    # reads cost: at equal mean depth, max-prob's time is above the static exit's
    assert want > float(static_ms(profile, B1, out.mean_layers))
    assert "One read costs" in " ".join(c.value for c in at.caption)


def test_char_lm_tab_says_its_time_per_character():
    from engine import families
    from engine.families.early_exit_lm import analysis as lm
    from engine.registry import get_card

    card = get_card("bbc_char_early_exit_lm")
    profile = load_profile(card.model_id)
    at = page()
    assert "Layers saved" in metrics(at)
    at.radio(key="lm.axis").set_value(B1).run()
    assert not at.exception, at.exception
    model = families.get(card.family).load(card)
    g, full = lm.generate_pair(model, "The government said", 80, "max_prob", "exit", 0.8)
    ms = lm.generation_ms(model, g, profile, B1, "exit", 0.8)
    assert metrics(at)[f"Time per character, {B1}"] == f"{ms:.3g} ms"
    layout, data = traces_with(at, "every token exits after layer k")
    assert B1 in layout["xaxis"]["title"]["text"]
    static = next(t for t in data if t["name"] == "every token exits after layer k")
    np.testing.assert_allclose(static["x"], lm.static_ms(profile, B1, model.n_layer))
    sweep = card.raw["metrics"]["sweep"]
    drawn = sorted(x for t in data if t.get("mode") == "lines+markers" for x in t["x"])
    np.testing.assert_allclose(drawn, sorted(lm.sweep_ms(sweep, profile, B1, model.n_layer)))


def test_a_live_generation_is_timed_against_its_prediction(tmp_path, monkeypatch):
    from app import loaders
    from tests.helpers_lm import N_LAYER, save_tiny_lm

    card = save_tiny_lm(tmp_path / "tiny")
    monkeypatch.setenv("AIE_LM_CARD", str(card))
    step = 1000.0 * np.arange(1, N_LAYER + 1)
    bt = costs.BatchTiming(1, step, step * 0, step[:, None], {"read": 100.0, "fill": 10.0})
    fake = costs.Profile("tiny_lm", "hf_causal_lm", "layers", step / 1000, {1: bt}, {})
    real = loaders.time_profile
    monkeypatch.setattr(loaders, "time_profile", lambda m: fake if m == "tiny_lm" else real(m))
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=180).run()

    def predicted(**widgets) -> float:
        for key, value in widgets.items():
            at.slider(key=key).set_value(value).run()
        at.button(key="slm.go").click().run()
        assert not at.exception, at.exception
        text = next(c.value for c in at.caption if c.value.startswith("Time per token after"))
        assert re.search(r"\d+ ms measured", text), text
        return float(re.search(r"predicts (\d+) ms", text).group(1))

    # never confident: every token runs all layers, asked at layers 3 .. L - 1
    assert predicted(**{"slm.t.max_prob": 1.01}) == 1000 * N_LAYER + 100 * (N_LAYER - 3)
    # always confident: every token stops at the earliest exit allowed (layer 3), asked once
    assert predicted(**{"slm.t.max_prob": 0.0}) == 3000 + 100


def test_a_users_decoder_is_timed_from_the_page_and_its_runs_get_a_prediction(
    tmp_path, monkeypatch
):
    from engine.registry import save_user_model
    from engine.run.profile import user_profile_file
    from tests.helpers_lm import save_tiny_lm

    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    raw = json.loads(save_tiny_lm(tmp_path / "tiny").read_text())
    save_user_model({**raw, "model_id": "my_decoder", "title": "A tiny Llama (yours)"})
    at = page()
    at.selectbox(key="slm.model").set_value("my_decoder").run()
    assert any(c.value.startswith("Not timed on this machine") for c in at.caption)
    at.number_input(key="slm.profile_batch").set_value(2).run()
    at.button(key="slm.reprofile").click().run()
    assert not at.exception, at.exception
    p = load_profile("my_decoder")
    assert user_profile_file("my_decoder").is_file() and p.axis == "layers"
    assert p.batches == [1, 2] and set(p.timings[1].parts_ms) == {"read", "fill", "token"}
    assert any(c.value.startswith("Measured ") for c in at.caption), [c.value for c in at.caption]
    at.slider(key="slm.n").set_value(4).run()
    at.button(key="slm.go").click().run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Time per token after the first") for c in at.caption)
