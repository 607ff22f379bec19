"""Figures for the comparison page: pure functions, data -> Plotly figure."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from app import palette
from engine.core.stats import seeded_subset


def correlation_heatmap(names: list[str], matrix: np.ndarray, title: str) -> go.Figure:
    text = [["–" if np.isnan(v) else f"{v:.2f}" for v in row] for row in matrix]
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=names,
            y=names,
            zmin=-1,
            zmax=1,
            colorscale=palette.DIVERGING,
            text=text,
            texttemplate="%{text}",
            hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title, height=380, margin=dict(l=10, r=10, t=40, b=10), yaxis_autorange="reversed"
    )
    return fig


MAX_SCATTER_POINTS = 2000  # inputs drawn in the scatter; every statistic uses all of them


def scatter_subset(n: int, max_points: int = MAX_SCATTER_POINTS) -> np.ndarray:
    """Sorted indices of a fixed random subset of n inputs (the same for every method pair).

    Ten thousand markers with their colours and hover data made each budget move send ~0.4 MB
    and take seconds to draw; a seeded subset of a few thousand shows the same joint shape.
    """
    return seeded_subset(n, max_points, seed=0)


def compute_scatter(
    x: np.ndarray,
    y: np.ndarray,
    x_name: str,
    y_name: str,
    sample_id: np.ndarray,
    label: np.ndarray,
    class_names: list[str] | None = None,
) -> go.Figure:
    """Per-input compute of two methods, coloured by true class, with a legend of the classes.

    One trace in input order, so no class is drawn over the others; the legend entries are
    key-only traces. Jitter separates the few distinct early-exit costs; the subtitle says so.
    At most ``MAX_SCATTER_POINTS`` inputs are drawn (``scatter_subset``), built from plain dicts
    without plotly's per-element validation (tests validate it once).
    """
    n = len(x)
    idx = scatter_subset(n)
    x, y, sample_id, label = (np.asarray(a)[idx] for a in (x, y, sample_id, label))
    rng = np.random.default_rng(0)
    jitter = 0.02
    names = [class_names[int(c)] if class_names is not None else f"class {int(c)}" for c in label]
    points = dict(
        type="scattergl",
        x=(x + rng.uniform(-jitter, jitter, len(x))).astype(np.float32),
        y=(y + rng.uniform(-jitter, jitter, len(y))).astype(np.float32),
        mode="markers",
        showlegend=False,
        marker=dict(size=5, opacity=0.45, color=[palette.exit_color(int(v)) for v in label]),
        customdata=np.stack([sample_id, names], axis=1),
        hovertemplate="sample %{customdata[0]} (%{customdata[1]})<br>"
        f"{x_name}: %{{x:.2f}}<br>{y_name}: %{{y:.2f}}<extra></extra>",
    )
    keys = [
        dict(
            type="scatter",
            x=[None],
            y=[None],
            mode="markers",
            name=names[int(np.flatnonzero(label == c)[0])],
            marker=dict(size=9, color=palette.exit_color(int(c))),
        )
        for c in np.unique(label)
    ]
    drawn = f"{len(idx):,} of {n:,} inputs drawn (a fixed random subset); " if len(idx) < n else ""
    layout = dict(
        title=dict(
            text=f"Compute per test input: {x_name} against {y_name}",
            subtitle=dict(
                text=f"{drawn}one point per input, coloured by its true class; "
                f"jittered by up to ±{jitter} so equal costs do not hide each other"
            ),
        ),
        xaxis=dict(title=dict(text=f"{x_name}: compute (fraction of full)")),
        yaxis=dict(title=dict(text=f"{y_name}: compute (fraction of full)")),
        legend=dict(title=dict(text="true class")),
        height=460,
        margin=dict(l=10, r=10, t=80, b=10),
    )
    return go.Figure(dict(data=[points, *keys], layout=layout), _validate=False)


def per_class_compute(names: list[str], class_names: list[str], means: np.ndarray) -> go.Figure:
    """means: [methods, classes] mean compute fraction."""
    fig = go.Figure()
    for i, name in enumerate(names):
        fig.add_bar(x=class_names, y=means[i], name=name, marker_color=palette.CATEGORICAL[i])
    fig.update_layout(
        barmode="group",
        yaxis_title="mean compute (fraction of full)",
        height=360,
        margin=dict(l=10, r=10, t=30, b=10),
        legend=dict(orientation="h", y=1.12),
    )
    return fig


def sparsity_histograms(layers: list[str], zeros: np.ndarray) -> go.Figure:
    """Distribution over inputs of the exactly-zero fraction, one violin per ReLU layer."""
    fig = go.Figure()
    for i, name in enumerate(layers):
        fig.add_violin(
            y=zeros[:, i].astype(np.float32),  # half the bytes; fractions need no more
            name=name,
            box_visible=True,
            meanline_visible=True,
            line_color=palette.CATEGORICAL[i % len(palette.CATEGORICAL)],
            points=False,
        )
    fig.update_layout(
        yaxis_title="fraction of activations exactly 0",
        yaxis_range=[0, 1],
        showlegend=False,
        height=360,
        margin=dict(l=10, r=10, t=30, b=10),
    )
    return fig


def budget_curves(sweeps, matched, unit: str | None = None) -> go.Figure:
    """Accuracy against mean compute for every method, with the matched setting marked;
    ``unit`` (a time unit): against the measured mean time instead of the FLOPs fraction."""
    fig = go.Figure()
    for i, (s, m) in enumerate(zip(sweeps, matched, strict=True)):
        x = s.mean_cost if unit else s.mean_fraction
        order = np.argsort(x)
        color = palette.CATEGORICAL[i]
        fig.add_scatter(
            x=x[order],
            y=s.accuracy[order],
            mode="lines",
            name=s.name,
            line_color=color,
        )
        fig.add_scatter(
            x=[m.mean_cost if unit else m.mean_fraction],
            y=[m.accuracy],
            mode="markers",
            showlegend=False,
            marker=dict(size=12, color=color, line=dict(color="black", width=1)),
            hovertemplate=f"{s.name}: {s.setting} {m.param:.3g}<extra></extra>",
        )
    fig.update_layout(
        xaxis_title=f"mean {unit} per input"
        if unit
        else "mean compute (fraction of each method's full model)",
        yaxis_title="accuracy",
        height=360,
        margin=dict(l=10, r=10, t=30, b=10),
        legend=dict(orientation="h", y=1.12),
    )
    return fig
