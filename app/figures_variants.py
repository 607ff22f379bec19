"""Figure: one architecture trained three ways (``engine.training_variants``), on one chart."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from app.figures import _base_layout, _figure
from app.palette import CATEGORICAL
from engine.training_variants import VariantCurve


def _accuracy_range(curves: Sequence[VariantCurve]) -> list[float] | None:
    """From the worst accuracy any curve has above a quarter of the cost to the best oracle:
    below that the curves only fall to the first exit, which would flatten the part that
    differs."""
    lows = [
        float(c.accuracy[c.cost_fraction >= 0.25].min())
        for c in curves
        if (c.cost_fraction >= 0.25).any()
    ]
    if not lows:
        return None
    return [min(lows) - 0.01, max(c.oracle_accuracy for c in curves) + 0.01]


def variants_figure(curves: Sequence[VariantCurve], current: str | None = None) -> go.Figure:
    """Accuracy against mean cost (fraction of the full model) of each training variant's
    policy sweep (its Pareto front), each with its oracle as a star in the same colour; the
    selected model's curve is drawn thicker."""
    hover = "%{x:.1%} of the full cost<br>accuracy %{y:.4f}<extra>%{fullData.name}</extra>"
    data = []
    for j, c in enumerate(curves):
        color = CATEGORICAL[j % len(CATEGORICAL)]
        data.append(
            dict(
                type="scatter",
                x=c.cost_fraction,
                y=c.accuracy,
                mode="lines",
                name=c.label,
                line=dict(color=color, width=3 if c.model_id == current else 1.6),
                hovertemplate=hover,
            )
        )
        data.append(
            dict(
                type="scatter",
                x=[c.oracle_cost_fraction],
                y=[c.oracle_accuracy],
                mode="markers",
                name=f"oracle of {c.label.split(',')[0]}",
                marker=dict(color=color, size=12, symbol="star"),
                hovertemplate=hover,
            )
        )
    layout = _base_layout(
        "Same CNN, three trainings: accuracy vs cost",
        height=380,
        xaxis=dict(title="mean cost (fraction of the full model)", tickformat=".0%"),
        yaxis=dict(title="accuracy", range=_accuracy_range(curves)),
    )
    return _figure(data, layout)
