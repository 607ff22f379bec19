"""Every page's charts stay small: no chart, and no rerun's charts together, over 500 KB of JSON.

A slider move reruns the page and sends its charts again (unchanged ones of 10 KB or more go as
a reference to the browser's copy, but a chart marking the current setting always changes).
Whole curves (one point per distinct score) and per-input scatters once sent megabytes per
move and took seconds to draw; figures are thinned for drawing while the numbers come from the
exact arrays. Each page runs on the bundled models, the slider is moved once, and every chart
of that rerun is measured and validated by plotly (the builders skip validation for speed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

from engine.core import tradeoff

ROOT = Path(__file__).resolve().parent.parent
MAX_KB = 500

# page -> (widget kind, key, value a user might move to, query params)
PAGES = {
    "tuning": ("slider", "w.t.max_prob", 0.8, {"model": "mnist_skipnet", "policy": "max_prob"}),
    "skipping": ("select_slider", "skip_threshold", 0.8, {}),
    "halting": ("select_slider", "halt_eps", 0.1, {}),
    "routing": ("select_slider", "moe.tau", 0.7, {}),
    "language": ("slider", "lang.t.entropy", 0.4, {}),
    "compare": ("slider", "cmp_budget", 0.5, {}),
    "precision": ("slider", "quee_budget", 0.7, {}),
}


def chart_kb(at) -> list[float]:
    return [len(c.proto.spec) / 1e3 for c in at.get("plotly_chart")]


@pytest.mark.parametrize("page", list(PAGES))
def test_a_slider_rerun_sends_under_500_kb_of_charts(page):
    kind, key, value, params = PAGES[page]
    at = AppTest.from_file(str(ROOT / "pages" / f"{page}.py"), default_timeout=180)
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, at.exception
    if not at.get("plotly_chart"):
        pytest.skip(f"{page}: no charts (bundled model data missing)")
    widget = getattr(at, kind)(key=key)
    widget.set_value(value).run()
    assert not at.exception, at.exception
    sizes = chart_kb(at)
    assert sizes, f"{page}: the rerun drew no charts"
    assert max(sizes) < MAX_KB, f"{page}: a chart is {max(sizes):.0f} KB (sizes {sizes})"
    assert sum(sizes) < MAX_KB, f"{page}: the rerun's charts total {sum(sizes):.0f} KB"
    for c in at.get("plotly_chart"):
        go.Figure(json.loads(c.proto.spec))  # valid plotly (builders skip validation)


def test_drawing_indices_keep_the_front_and_ends():
    rng = np.random.default_rng(0)
    cost = np.sort(rng.uniform(0, 1, 30_000))[::-1]
    acc = np.clip(cost + rng.normal(0, 0.01, cost.size), 0, 1)
    idx = tradeoff.drawing_indices(cost, acc, max_points=300)
    front = tradeoff.pareto_front(cost, acc)
    assert len(idx) < 300 + len(front) + 1 and len(idx) < 2000
    assert set(front) <= set(idx)  # the front is drawn exactly
    assert idx[0] == 0 and idx[-1] == cost.size - 1  # both ends of the curve
    assert np.all(np.diff(idx) > 0)
    small = tradeoff.drawing_indices(cost[:50], acc[:50])
    assert np.array_equal(small, np.arange(50))  # short curves are drawn whole
