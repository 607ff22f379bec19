"""Plotly figure builders: pure functions, data in, ``go.Figure`` out, no Streamlit.

Every colour comes from ``app.palette``: exit k is ``exit_color(k)`` on every chart. Bars that
can be selected carry ``customdata`` saying which samples they stand for (``[exit]`` or
``[class, exit]``), which ``selection_mask`` turns back into a per-sample mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.palette import (
    CATEGORICAL,
    CORRECT,
    DIVERGING,
    HIGHLIGHT,
    NEUTRAL,
    SEQUENTIAL,
    exit_color,
)
from engine.core.calibration import Reliability
from engine.core.tradeoff import PolicyStats

# Client-side PNG export from the mode bar (the camera icon) for every chart.
PLOT_CONFIG = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}
_MARGIN = dict(l=10, r=10, t=40, b=10)


def fmt_flops(x: float) -> str:
    """1234567 -> '1.23 M' (the unit is added by the caller)."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}"
    return f"{x:.3g} "


def _base_layout(title: str, height: int = 340, **extra) -> dict:
    return dict(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=15)),
        height=height,
        margin=_MARGIN,
        legend=dict(orientation="h", yanchor="top", y=-0.25, x=0, font=dict(size=11)),
        **extra,
    )


def _figure(data: list[dict], layout: dict) -> go.Figure:
    """A figure from plain trace dicts, skipping plotly's per-property validation.

    Validation costs tens of milliseconds per chart, which would dominate a slider rerun; the
    tests validate every builder's output once (``go.Figure(fig.to_dict())``). Short arrays
    (a few dozen bins or exits) are passed as lists: plotly turns every numpy array into a
    base64 typed array at a fixed cost (~0.2 ms each, dozens per reliability diagram), worth
    it only for long ones such as a curve's thousands of points.
    """
    return go.Figure(dict(data=data, layout=layout), _validate=False)


def _layout(fig: go.Figure, title: str, height: int = 340) -> go.Figure:
    fig.update_layout(**_base_layout(title, height))
    return fig


def tradeoff_figure(
    cost: np.ndarray,
    accuracy: np.ndarray,
    front: np.ndarray,
    current: PolicyStats,
    oracle: PolicyStats,
    last: PolicyStats,
    exit_points: Sequence[PolicyStats] = (),
    *,
    kind_label: str = "policy",
    cost_unit: str = "FLOPs",
    oracle_name: str = "oracle",
    others: Sequence[tuple[str, np.ndarray, np.ndarray]] = (),
) -> go.Figure:
    """The accuracy–compute curve of one policy kind, its Pareto front and reference points.

    cost, accuracy: the curve's points (already thinned); front: indices into them, the Pareto
    front ordered by cost. ``exit_points`` are the fixed-exit (static truncation) baselines.
    ``others`` are (name, cost, accuracy) of the other policy kinds' curves, drawn thinly
    beside it so a learned gate and the thresholds are compared on one chart.
    """
    hover = "%{x:.4s} " + cost_unit + "<br>accuracy %{y:.4f}<extra>%{fullData.name}</extra>"
    data = [
        dict(
            type="scatter",
            x=cost,
            y=accuracy,
            mode="lines",
            name="every threshold",
            line=dict(color=NEUTRAL, width=1.5),
            hovertemplate=hover,
        )
    ]
    for j, (name, o_cost, o_acc) in enumerate(others):
        data.append(
            dict(
                type="scatter",
                x=o_cost,
                y=o_acc,
                mode="lines",
                name=name,
                line=dict(color=CATEGORICAL[(j + 1) % len(CATEGORICAL)], width=1.2, dash="dot"),
                hovertemplate=hover,
            )
        )
    if len(front):
        data.append(
            dict(
                type="scatter",
                x=cost[front],
                y=accuracy[front],
                mode="lines+markers",
                name="Pareto front",
                line=dict(color=exit_color(0), width=2.5),
                marker=dict(size=4),
                hovertemplate=hover,
            )
        )
    if len(exit_points):
        k = len(exit_points)
        data.append(
            dict(
                type="scatter",
                x=[s.mean_cost for s in exit_points],
                y=[s.accuracy for s in exit_points],
                mode="markers",
                name="fixed exit (static truncation)",
                marker=dict(color=[exit_color(e) for e in range(k)], size=9, symbol="square"),
                text=[f"exit {e} only" for e in range(k)],
                hovertemplate="%{text}<br>" + hover,
            )
        )
    for s, name, symbol, color in (
        (oracle, oracle_name, "diamond", CORRECT),
        (last, "last exit", "circle-open", "#000000"),
        (current, "current setting", "star", HIGHLIGHT),
    ):
        data.append(
            dict(
                type="scatter",
                x=[s.mean_cost],
                y=[s.accuracy],
                mode="markers",
                name=name,
                marker=dict(
                    color=color,
                    size=16 if name == "current setting" else 12,
                    symbol=symbol,
                    line=dict(width=1.5, color="#000000"),
                ),
                hovertemplate=hover,
            )
        )
    layout = _base_layout(
        "Accuracy vs compute",
        440,
        xaxis=dict(title=dict(text=f"mean {cost_unit} per sample")),
        yaxis=dict(title=dict(text="accuracy")),
    )
    return _figure(data, layout)


def exit_histogram(
    exit_counts: np.ndarray,
    exit_accuracy: np.ndarray,
    exit_names: Sequence[str],
) -> go.Figure:
    """Samples leaving at each exit (selectable; customdata = [exit, fraction])."""
    k = len(exit_counts)
    counts = np.asarray(exit_counts)
    total = max(1, int(counts.sum()))
    acc_txt = ["–" if not np.isfinite(a) else f"{a:.3f}" for a in exit_accuracy]
    data = [
        dict(
            type="bar",
            x=list(exit_names),
            y=counts.tolist(),
            marker=dict(color=[exit_color(i) for i in range(k)]),
            customdata=np.c_[np.arange(k), counts / total].tolist(),  # lists: echoed on select
            text=[f"{c / total:.1%}" for c in counts],
            textposition="auto",
            hovertext=acc_txt,
            hovertemplate="%{x}: %{y} samples (%{customdata[1]:.1%})<br>"
            "accuracy there %{hovertext}<extra></extra>",
            name="samples",
        )
    ]
    layout = _base_layout(
        "Where samples exit",
        clickmode="event+select",
        dragmode="select",
        yaxis=dict(title=dict(text="samples")),
        xaxis=dict(type="category"),
    )
    return _figure(data, layout)


def per_class_figure(
    rates: np.ndarray, class_names: Sequence[str], exit_names: Sequence[str]
) -> go.Figure:
    """[C, K] exit rates per class as stacked horizontal bars (customdata = [class, exit])."""
    c, k = rates.shape
    data = [
        dict(
            type="bar",
            y=list(class_names),
            x=rates[:, e].tolist(),
            orientation="h",
            name=exit_names[e],
            marker=dict(color=exit_color(e)),
            customdata=np.c_[np.arange(c), np.full(c, e)].tolist(),
            hovertemplate=f"%{{y}}: %{{x:.1%}} leave at {exit_names[e]}<extra></extra>",
        )
        for e in range(k)
    ]
    layout = _base_layout(
        "Exit rates per class",
        max(300, 60 + 24 * c),
        barmode="stack",
        clickmode="event+select",
        dragmode="select",
        xaxis=dict(title=dict(text="fraction of the class"), range=[0, 1], tickformat=".0%"),
        yaxis=dict(autorange="reversed", type="category"),
    )
    return _figure(data, layout)


RELIABILITY_HOVER = (
    "confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} samples<extra></extra>"
)


def _reliability_traces(
    per_exit: Sequence[Reliability],
    overall: Reliability,
    exit_label,
    overall_label: str,
    exit_dash: str | None = None,
    show_legend: bool = True,
    **axes,
) -> list[dict]:
    """The diagonal, one line per exit and a starred line for all samples together: what both
    reliability diagrams draw (``exit_label(k, r)`` names exit k's line)."""

    def line(r: Reliability, **style) -> dict:
        m = r.count > 0
        return dict(
            type="scatter",
            x=r.confidence[m].tolist(),
            y=r.accuracy[m].tolist(),
            mode="lines+markers",
            customdata=r.count[m].tolist(),
            hovertemplate=RELIABILITY_HOVER,
            showlegend=show_legend,
            **style,
            **axes,
        )

    diagonal = dict(
        type="scatter",
        x=[0, 1],
        y=[0, 1],
        mode="lines",
        name="perfect calibration",
        showlegend=show_legend,
        line=dict(color=NEUTRAL, dash="dot", width=1),
        hoverinfo="skip",
        **axes,
    )
    exits = [
        line(
            r,
            name=exit_label(k, r),
            legendgroup=f"exit{k}",
            line=dict(color=exit_color(k), width=1.2, dash=exit_dash),
            marker=dict(size=5),
        )
        for k, r in enumerate(per_exit)
    ]
    total = line(
        overall,
        name=overall_label,
        legendgroup="all",
        line=dict(color="#000000", width=3),
        marker=dict(size=8, symbol="star"),
    )
    return [diagonal, *exits, total]


def reliability_figure(
    per_exit: Sequence[Reliability], policy: Reliability, exit_names: Sequence[str]
) -> go.Figure:
    """Reliability diagram: accuracy against confidence per exit and for the policy's outputs."""
    data = _reliability_traces(
        per_exit,
        policy,
        lambda k, r: f"{exit_names[k]} (ECE {r.ece:.3f})",
        f"policy's outputs (ECE {policy.ece:.3f})",
        exit_dash="dash",
    )
    layout = _base_layout(
        "Reliability",
        440,
        xaxis=dict(title=dict(text="confidence (max probability)"), range=[0, 1.02]),
        yaxis=dict(title=dict(text="accuracy"), range=[0, 1.02]),
    )
    return _figure(data, layout)


def exited_reliability_figure(
    panels: Sequence[tuple[str, Sequence[Reliability], Reliability]],
    exit_names: Sequence[str],
) -> go.Figure:
    """Reliability of the samples that *exit* at each exit, one panel per policy.

    panels: (title, per-exit reliability over the samples leaving there, the policy's outputs).
    Points below the diagonal are over-confident, above it under-confident.
    """
    n = max(1, len(panels))
    gap = 0.08
    width = (1 - gap * (n - 1)) / n
    data, layout_axes, notes = [], {}, []
    for p, (title, per_exit, overall) in enumerate(panels):
        ax = "" if p == 0 else str(p + 1)
        x0 = p * (width + gap)
        layout_axes[f"xaxis{ax}"] = dict(
            domain=[x0, x0 + width],
            range=[0, 1.02],
            title=dict(text="confidence of the exited samples"),
            anchor=f"y{ax}",
        )
        layout_axes[f"yaxis{ax}"] = dict(
            range=[0, 1.02], title=dict(text="accuracy" if p == 0 else ""), anchor=f"x{ax}"
        )
        notes.append(
            dict(
                text=f"<b>{title}</b>",
                x=x0 + width / 2,
                y=1.0,
                xref="paper",
                yref="paper",
                xanchor="center",
                yanchor="bottom",
                showarrow=False,
            )
        )
        data += _reliability_traces(
            per_exit,
            overall,
            lambda k, r: f"exits at {exit_names[k]}",
            "all exited samples",
            show_legend=p == 0,
            xaxis=f"x{ax}",
            yaxis=f"y{ax}",
        )
    layout = _base_layout(
        "Reliability of the samples that exit", 440, annotations=notes, **layout_axes
    )
    layout["margin"] = dict(l=10, r=10, t=60, b=10)
    return _figure(data, layout)


def anytime_figure(
    probs: np.ndarray,
    class_names: Sequence[str],
    exit_names: Sequence[str],
    exit_taken: int,
    cum_cost: np.ndarray | None = None,
    label: int | None = None,
    top: int = 5,
) -> go.Figure:
    """Each exit's probability for each class (the anytime-prediction curve), [K, C] in.

    Only the ``top`` classes by their highest probability are drawn; a marker shows where the
    policy exits. Line colours are per class; the exit marker uses the exit's colour.
    """
    k, c = probs.shape
    order = np.argsort(-probs.max(axis=0))[: min(top, c)]
    if label is not None and 0 <= label < c and label not in order:
        order = np.r_[order, label]
    x = list(exit_names)
    fig = go.Figure()
    for j in order:
        name = class_names[j] + (" (true label)" if label == j else "")
        fig.add_trace(
            go.Scatter(
                x=x,
                y=probs[:, j],
                mode="lines+markers",
                name=name,
                line=dict(
                    color=CATEGORICAL[int(j) % len(CATEGORICAL)], width=3 if label == j else 2
                ),
                hovertemplate=f"{class_names[j]}: " + "%{y:.3f} at %{x}<extra></extra>",
            )
        )
    fig.add_vline(
        x=exit_taken,
        line=dict(color=exit_color(exit_taken), width=3, dash="dash"),
        annotation_text=f"policy exits at {exit_names[exit_taken]}",
        annotation_position="top left" if exit_taken > k / 2 else "top right",
    )
    fig.update_yaxes(title_text="probability", range=[0, 1.05])
    fig.update_xaxes(title_text="exit", type="category")
    return _layout(fig, "Anytime prediction", 340)


def attribution_figure(
    maps: dict[str, np.ndarray], image: np.ndarray | None = None, cols: int = 2
) -> go.Figure:
    """A grid of attribution heatmaps (name -> [H, W]); signed maps use a diverging scale."""
    names = list(maps)
    rows = max(1, -(-len(names) // cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.06)
    for i, name in enumerate(names):
        m = np.asarray(maps[name], dtype=np.float64)
        signed = bool((m < 0).any())
        lim = float(np.abs(m).max()) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=m[::-1],
                colorscale=DIVERGING if signed else SEQUENTIAL,
                reversescale=signed,
                zmid=0 if signed else None,
                zmin=-lim if signed else 0,
                zmax=lim,
                showscale=False,
                hovertemplate="%{z:.3g}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    for i in range(len(names)):
        axis = "x" if i == 0 else f"x{i + 1}"
        fig.update_yaxes(scaleanchor=axis, row=i // cols + 1, col=i % cols + 1)
    fig = _layout(fig, "", 230 * rows)
    fig.update_layout(margin=dict(l=10, r=10, t=30, b=10))
    return fig


def figure_html(fig: go.Figure) -> bytes:
    """A self-contained HTML file of the figure (plotly.js inlined, works offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True).encode()


def selection_mask(
    selection: dict | None,
    exits: np.ndarray,
    label: np.ndarray,
    chart: str,
) -> np.ndarray | None:
    """Per-sample mask of the samples behind the selected bars, or None when nothing is selected.

    chart="exits": bars carry customdata [exit]; chart="classes": [class, exit].
    """
    selection = selection or {}
    if "selection" in selection:  # the chart's whole state, as st.session_state[key] holds it
        selection = selection["selection"] or {}
    points = selection.get("points") or []
    if not points:
        return None
    mask = np.zeros(len(exits), dtype=bool)
    for p in points:
        cd = p.get("customdata")
        if cd is None:
            continue
        try:
            cd = [int(v) if i == 0 or chart == "classes" else v for i, v in enumerate(cd)]
        except (TypeError, ValueError):
            continue  # not one of our bars
        if chart == "exits":
            mask |= exits == int(cd[0])
        elif chart == "classes" and len(cd) >= 2:
            mask |= (label == int(cd[0])) & (exits == int(cd[1]))
    return mask
