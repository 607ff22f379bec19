"""Figures for the layer-skipping and halting (ACT) pages: pure functions, data -> plotly figure.

No streamlit and no model here; every colour comes from ``app.palette``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from app import palette

RAN = palette.OKABE_ITO[0]  # blue: the block ran / the step ran
SKIPPED = palette.NEUTRAL  # grey: skipped / never reached
REMAINDER = palette.HIGHLIGHT  # orange: the remainder R at the halting step
LINE = palette.OKABE_ITO[7]  # black: thresholds and reference lines
MAX_MARKERS = 60  # curves with more points are drawn as lines only


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        height=height,
        margin=dict(l=50, r=20, t=50, b=45),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0),
    )
    return fig


# --- skipping -------------------------------------------------------------------------------


def block_strip(
    gate: np.ndarray, executed: np.ndarray, threshold: float, block_names: Sequence[str]
) -> go.Figure:
    """One input: a bar per block at its gate score, blue if it ran, grey if skipped.

    The dashed line is the threshold: a block runs when its score is at or above it.
    """
    gate = np.asarray(gate, dtype=float)
    executed = np.asarray(executed, dtype=bool)
    names = list(block_names)
    fig = go.Figure()
    for flag, name, colour in ((True, "ran", RAN), (False, "skipped", SKIPPED)):
        sel = executed == flag
        fig.add_bar(
            x=[n for n, s in zip(names, sel, strict=True) if s],
            y=gate[sel],
            name=name,
            marker_color=colour,
            text=[f"{g:.2f}" for g in gate[sel]],
            textposition="outside",
        )
    fig.add_hline(
        y=threshold, line_dash="dash", line_color=LINE, annotation_text=f"threshold {threshold:g}"
    )
    fig.update_xaxes(categoryorder="array", categoryarray=names)
    fig.update_yaxes(range=[0, 1.12])
    return _layout(fig, "Gate score per block (ran / skipped)", "block", "gate score (run prob.)")


def skip_rate_bars(skip_rate: np.ndarray, block_names: Sequence[str]) -> go.Figure:
    """Data set: fraction of inputs that skipped each block."""
    fig = go.Figure(
        go.Bar(
            x=list(block_names),
            y=np.asarray(skip_rate),
            marker_color=[palette.exit_color(b) for b in range(len(block_names))],
            text=[f"{v:.0%}" for v in skip_rate],
            textposition="outside",
        )
    )
    fig.update_yaxes(range=[0, 1.1], tickformat=".0%")
    return _layout(fig, "Skip rate per block", "block", "inputs that skipped it")


def skip_rate_heatmap(
    rates: np.ndarray, class_names: Sequence[str], block_names: Sequence[str]
) -> go.Figure:
    """Data set: skip rate per class (rows) and block (columns)."""
    fig = go.Figure(
        go.Heatmap(
            z=np.asarray(rates),
            x=list(block_names),
            y=list(class_names),
            colorscale=palette.SEQUENTIAL,
            zmin=0,
            zmax=1,
            colorbar=dict(title="skip rate", tickformat=".0%"),
            text=np.vectorize(lambda v: f"{v:.0%}")(rates),
            texttemplate="%{text}",
        )
    )
    fig.update_yaxes(type="category", autorange="reversed")
    return _layout(fig, "Skip rate per class and block", "block", "true class", height=380)


@dataclass(frozen=True)
class CurveSpec:
    """One accuracy-compute curve for ``tradeoff_figure``."""

    name: str
    cost: np.ndarray  # x: mean compute
    accuracy: np.ndarray  # y
    colour: str
    dash: str = "solid"
    labels: Sequence[str] | None = None  # hover text per point


def tradeoff_figure(
    curves: Sequence[CurveSpec],
    current: tuple[float, float] | None = None,
    x_title: str = "mean FLOPs per input",
    title: str = "Accuracy vs compute",
) -> go.Figure:
    """Accuracy against mean compute for several methods; ``current`` marks the chosen point."""
    fig = go.Figure()
    for c in curves:
        order = np.argsort(np.asarray(c.cost), kind="stable")
        fig.add_scatter(
            x=np.asarray(c.cost)[order],
            y=np.asarray(c.accuracy)[order],
            # a marker per point only on short sweeps: hundreds of SVG markers slow the browser
            mode="lines+markers" if len(order) <= MAX_MARKERS else "lines",
            name=c.name,
            line=dict(color=c.colour, dash=c.dash),
            marker=dict(size=6),
            text=None if c.labels is None else np.asarray(list(c.labels))[order],
            hovertemplate="%{text}<br>cost %{x:.3s}<br>accuracy %{y:.2%}<extra></extra>"
            if c.labels is not None
            else "cost %{x:.3s}<br>accuracy %{y:.2%}<extra></extra>",
        )
    if current is not None:
        fig.add_scatter(
            x=[current[0]],
            y=[current[1]],
            mode="markers",
            name="current setting",
            marker=dict(symbol="star", size=16, color=palette.HIGHLIGHT, line=dict(color=LINE)),
        )
    fig.update_yaxes(tickformat=".1%")
    return _layout(fig, title, x_title, "accuracy", height=420)


# --- halting --------------------------------------------------------------------------------


ACT_NAMES = {
    "before": "steps before N (weight h^n)",
    "last": "halting step N (weight: remainder R)",
    "after": "after N: not computed when halting at this ε (stored unroll)",
    "line": "1 - ε",
    "title": "Halting score per ponder step",
}


def halting_curve(
    h: np.ndarray, cum: np.ndarray, steps: int, eps: float, names: dict | None = None
) -> go.Figure:
    """One input: halting score per ponder step, cumulative halting and the 1 - eps line.

    Steps 1..N-1 are blue (weight p^n = h^n), step N is orange (its weight is the remainder R),
    steps after N are grey: a real run at this eps halts at N and never computes them; their
    scores come from the stored unroll of all M steps, so a smaller eps (a later N) can be
    read off the same bars. NaN scores (a live run: not computed) draw no bar and no legend.
    Each colour has its own legend entry, below the plot where it cannot cover the title.
    ``names`` relabels the parts for another halting rule (PonderNet's λ_n and q); ACT's by
    default.
    """
    names = {**ACT_NAMES, **(names or {})}
    h = np.asarray(h, dtype=float)
    n_idx = np.arange(1, len(h) + 1)
    fig = go.Figure()
    groups = (
        (n_idx < steps, RAN, names["before"]),
        (n_idx == steps, REMAINDER, names["last"]),
        (n_idx > steps, SKIPPED, names["after"]),
    )
    for sel, colour, name in groups:
        sel = sel & np.isfinite(h)
        if sel.any():
            fig.add_bar(x=n_idx[sel], y=h[sel], marker_color=colour, name=name)
    cum = np.asarray(cum, dtype=float)
    fig.add_scatter(
        x=n_idx[:steps],
        y=cum[:steps],
        mode="lines+markers",
        name="cumulative halting (with remainder)",
        line=dict(color=palette.OKABE_ITO[2]),
    )
    fig.add_hline(
        y=1 - eps,
        line_dash="dash",
        line_color=LINE,
        annotation_text=f"{names['line']} = {1 - eps:g}",
    )
    fig.add_vline(x=steps, line_dash="dot", line_color=REMAINDER, annotation_text=f"N = {steps}")
    fig.update_yaxes(range=[0, 1.1])
    fig.update_xaxes(dtick=1, range=[0.4, len(h) + 0.6])
    _layout(fig, names["title"], "ponder step n", "probability", height=380)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, x=0))
    return fig


def steps_histogram(steps: np.ndarray, max_steps: int) -> go.Figure:
    counts = np.bincount(np.asarray(steps, dtype=int), minlength=max_steps + 1)[1:]
    fig = go.Figure(
        go.Bar(x=np.arange(1, max_steps + 1), y=counts, marker_color=RAN, name="inputs")
    )
    fig.update_xaxes(dtick=1)
    return _layout(fig, "Ponder steps taken", "steps N", "inputs")


def steps_by_class(class_names: Sequence[str], mean: np.ndarray, accuracy: np.ndarray) -> go.Figure:
    """Mean ponder steps per true class, with the class's accuracy in the hover."""
    fig = go.Figure(
        go.Bar(
            x=list(class_names),
            y=mean,
            marker_color=RAN,
            customdata=np.asarray(accuracy),
            hovertemplate="%{x}: %{y:.2f} steps, accuracy %{customdata:.1%}<extra></extra>",
            name="mean steps",
        )
    )
    fig.update_xaxes(type="category")
    return _layout(fig, "Steps per class", "true class", "mean ponder steps")


def steps_vs_difficulty(
    lengths: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    accuracy: np.ndarray,
    x_title: str = "string length (non-zero entries)",
) -> go.Figure:
    """Mean steps (with one standard deviation) and accuracy per difficulty level."""
    fig = go.Figure()
    fig.add_scatter(
        x=lengths,
        y=mean,
        error_y=dict(type="data", array=std, visible=True),
        mode="lines+markers",
        name="mean steps",
        line=dict(color=RAN),
    )
    fig.add_scatter(
        x=lengths,
        y=accuracy,
        mode="lines+markers",
        name="accuracy",
        yaxis="y2",
        line=dict(color=palette.CORRECT, dash="dot"),
    )
    fig.update_layout(
        yaxis2=dict(
            title="accuracy",
            overlaying="y",
            side="right",
            range=[0, 1.05],
            tickvals=[0, 0.25, 0.5, 0.75, 1.0],
            tickformat=".0%",
            showgrid=False,
        )
    )
    fig.update_xaxes(dtick=1)
    return _layout(fig, "Steps vs difficulty", x_title, "ponder steps")
