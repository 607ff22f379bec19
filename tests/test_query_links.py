"""Links carry a page's setting in the URL (the tour's "go deeper"); bad values fall back."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine import families
from engine.families.act import records as halting

PAGES = Path(__file__).resolve().parent.parent / "pages"


def run(page: str, **params) -> AppTest:
    at = AppTest.from_file(str(PAGES / page), default_timeout=90)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, at.exception
    return at


def test_skipping_threshold_from_url():
    assert run("skipping.py", t="0.8").select_slider(key="skip_threshold").value == pytest.approx(
        0.8
    )
    assert run("skipping.py", t="0.83").select_slider(key="skip_threshold").value == pytest.approx(
        0.85
    )
    assert run("skipping.py", t="nonsense").select_slider(
        key="skip_threshold"
    ).value == pytest.approx(0.5)


def test_halting_eps_from_url():
    assert run("halting.py", eps="0.2").select_slider(key="halt_eps").value == pytest.approx(0.2)
    # out of range snaps to the nearest setting the results hold (the largest eps)
    largest = float(halting.EPS_GRID.max())
    assert run("halting.py", eps="7").select_slider(key="halt_eps").value == pytest.approx(largest)


def test_halting_model_from_url():
    models = [c.model_id for c, _ in families.cards_of_kind("halt")]
    if not models:
        pytest.skip("no ACT records bundled")
    for m in models:
        assert run("halting.py", model=m).selectbox(key="act_model").value == m
    assert run("halting.py", model="no_such_model").selectbox(key="act_model").value in models


def test_routing_model_and_tau_from_url():
    at = run("routing.py", model="fashion_d2dmoe_vit", tau="0.3")
    assert at.radio(key="moe.model").value == "fashion_d2dmoe_vit"
    assert at.select_slider(key="moe.tau").value == pytest.approx(0.3)
    at = run("routing.py", model="no_such_model")
    assert at.radio(key="moe.model").value in ("fashion_d2dmoe_vit", "fashion_moe_vit")
