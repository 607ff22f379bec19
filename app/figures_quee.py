"""Figures for the QuEE page (exit / continue in int8 / continue in float32): data -> plotly.

No streamlit and no model here; every colour comes from ``app.palette``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from app import palette

RULES = {  # curve key -> (label, colour, dash)
    "learned": ("QuEE learned choice", palette.OKABE_ITO[0], "solid"),
    "band": ("band rule (fixed confidence band)", palette.OKABE_ITO[1], "dash"),
    "float": ("float32 only (max-prob)", palette.OKABE_ITO[4], "dot"),
    "int8": ("int8 only (max-prob)", palette.OKABE_ITO[3], "dashdot"),
    "oracle": ("oracle of the three-way choice", palette.NEUTRAL, "longdash"),
}
ACTION_COLOURS = (palette.OKABE_ITO[0], palette.OKABE_ITO[3], palette.OKABE_ITO[4])
ACTION_LABELS = ("exit", "continue in int8", "continue in float32")


def _frontier(cost: np.ndarray, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points sorted by cost (threshold sweeps revisit costs; a line needs an order)."""
    o = np.argsort(cost, kind="stable")
    return cost[o], acc[o]


def tradeoff(
    curves: dict,
    real: Sequence[dict] = (),
    at: tuple[float, float] | None = None,
    lo: float = 0.0,
) -> go.Figure:
    """Accuracy vs mean cost (fraction of the float32 full model) of every rule, simulated on
    the test records; ``real`` adds the measured runs (wall-clock / float32 full model);
    ``at`` marks the learned choice at the slider's budget."""
    fig = go.Figure()
    for key, (label, colour, dash) in RULES.items():
        c = curves.get(key)
        if c is None or not len(c.cost):
            continue
        x, y = _frontier(np.asarray(c.cost), np.asarray(c.accuracy))
        keep = np.isfinite(x)
        fig.add_trace(
            go.Scatter(
                x=x[keep],
                y=y[keep],
                mode="lines+markers" if key in ("learned", "oracle") else "lines",
                name=label,
                line=dict(color=colour, dash=dash, width=3 if key == "learned" else 2),
                hovertemplate="cost %{x:.3f}<br>accuracy %{y:.4f}<extra>" + label + "</extra>",
            )
        )
    for key, (label, colour, _dash) in RULES.items():
        pts = [r for r in real if r["rule"] == key]
        if not pts:
            continue
        fig.add_trace(
            go.Scatter(
                x=[r["ms_over_full_float"] for r in pts],
                y=[r["accuracy"] for r in pts],
                mode="markers",
                name=f"{label}, measured",
                marker=dict(color=colour, symbol="diamond-open", size=12, line=dict(width=2)),
                hovertemplate="wall-clock %{x:.3f} × float32 full<br>accuracy %{y:.4f}"
                "<extra>measured</extra>",
            )
        )
    if at is not None:
        fig.add_trace(
            go.Scatter(
                x=[at[0]],
                y=[at[1]],
                mode="markers",
                name="at this budget",
                marker=dict(color=palette.OKABE_ITO[7], symbol="x", size=13),
            )
        )
    fig.update_layout(
        title="Accuracy vs compute: learned choice, band rule, float32 only, int8 only",
        xaxis_title="mean cost (fraction of the float32 full model); ◇ = measured wall-clock",
        yaxis_title="accuracy",
        height=420,
        margin=dict(l=55, r=20, t=60, b=50),
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
    )
    fig.update_yaxes(range=[lo, None] if lo else None)
    return fig


def fractions(share: np.ndarray, exit_names: Sequence[str]) -> go.Figure:
    """Stacked bars: per exit, the share of all samples that exited there, switched to int8
    there or went on in float32 (samples that had left earlier are not counted)."""
    share = np.asarray(share, dtype=float)
    fig = go.Figure()
    for a, (label, colour) in enumerate(zip(ACTION_LABELS, ACTION_COLOURS, strict=True)):
        fig.add_trace(
            go.Bar(
                x=list(exit_names),
                y=share[:, a],
                name=label,
                marker_color=colour,
                hovertemplate="%{x}: %{y:.1%}<extra>" + label + "</extra>",
            )
        )
    fig.update_layout(
        barmode="stack",
        title="What the learned choice does at each exit (share of all samples)",
        yaxis_title="share of samples",
        yaxis_tickformat=".0%",
        height=340,
        margin=dict(l=55, r=20, t=60, b=45),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
    )
    return fig
