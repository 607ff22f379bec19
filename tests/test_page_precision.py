"""AppTest of pages/precision.py (QuEE): the numbers on screen are the engine's over the bundled
records, the budget slider and the cost model move them, a deep link opens where it says, and a
missing or damaged records file gets a message, not a stack trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine import paths, quee_build
from engine.core import quee

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "precision.py")
MODELS = sorted(p.name.removesuffix("__quee.npz") for p in paths.RECORDS_DIR.glob("*__quee.npz"))
needs_records = pytest.mark.skipif(not MODELS, reason="no QuEE records bundled")


def metrics(app) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def page(**params) -> AppTest:
    a = AppTest.from_file(PAGE, default_timeout=120)
    for k, v in params.items():
        a.query_params[k] = v
    return a.run()


def engine_at(model_id: str, cost_model: str, budget: float) -> quee.Outcome:
    b = quee_build.load(quee_build.records_file(model_id))
    choice = quee.solve(b["fit"], b["gains"], b["costs"][cost_model], budget)
    return quee.simulate(b["test"], choice)


@needs_records
def test_page_shows_the_engine_numbers_and_follows_the_budget():
    model_id = MODELS[0]
    app = page(model=model_id)
    assert not app.exception, app.exception
    want = engine_at(model_id, "measured", 0.5)
    m = metrics(app)
    assert m["Accuracy (learned choice)"] == f"{want.accuracy:.4f}"
    assert m["Mean cost"] == f"{want.mean_cost:.3f}"
    assert len(app.get("plotly_chart")) == 2
    card = json.loads(quee_build.card_file(model_id).read_text())
    cost = card["int8_cost"]
    ratio = sum(cost["stage_ms_int8"]) / sum(cost["stage_ms_float"])
    says = [w.value for w in app.warning] + [c.value for c in app.caption]
    said = [t for t in says if f"{ratio:.2f}×" in t]
    assert said, "the measured int8 / float32 time ratio is not on the page"
    assert all(f"{r:.2f}×" in said[0] for r in cost["measured_ratio"])
    assert ("not cheaper" in said[0]) != cost["int8_cheaper_here"]
    assert f"batch {cost['batch']}" in said[0]
    if card.get("real"):
        assert len(app.dataframe) == 1
    app.slider(key="quee_budget").set_value(0.8).run()
    assert not app.exception
    want8 = engine_at(model_id, "measured", 0.8)
    assert metrics(app)["Mean cost"] == f"{want8.mean_cost:.3f}"
    assert app.query_params["budget"] == "0.80"


@needs_records
def test_nominal_costs_switch_samples_to_int8_and_deep_link():
    model_id = MODELS[-1]
    app = page(model=model_id, cost="nominal", budget="0.45")
    assert not app.exception, app.exception
    assert app.slider(key="quee_budget").value == 0.45
    assert app.radio(key="quee_cost").value == "nominal"
    want = engine_at(model_id, "nominal", 0.45)
    share = (want.int8_from < want.actions.shape[1]).mean()
    assert share > 0
    assert metrics(app)["Finished in int8"] == f"{share:.1%}"
    assert len(app.dataframe) == 0  # the measured runs belong to the measured cost model


def test_no_records_gets_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RECORDS_DIR", tmp_path)
    app = page()
    assert not app.exception
    assert any("quee_build" in i.value for i in app.info)


@needs_records
def test_damaged_records_get_a_message(tmp_path, monkeypatch):
    model_id = MODELS[0]
    (tmp_path / f"{model_id}__quee.npz").write_bytes(b"not a zip file")
    (tmp_path / f"{model_id}__quee.json").write_bytes(quee_build.card_file(model_id).read_bytes())
    monkeypatch.setattr(paths, "RECORDS_DIR", tmp_path)
    monkeypatch.setattr(quee_build, "RECORDS_DIR", tmp_path)
    app = page(model=model_id)
    assert not app.exception, app.exception
    assert any("could not be read" in e.value for e in app.error)
