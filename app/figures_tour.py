"""Figure builders for the guided tour: pure functions, data in, plotly figure out.

Colours come from ``app.palette`` only: exit k is ``exit_color(k)`` on every page, expert e is
``expert_color(e)``, right/wrong are CORRECT/WRONG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.palette import CORRECT, HIGHLIGHT, NEUTRAL, WRONG, exit_color, expert_color

FONT = 15
PRESENT_FONT = 20


def _layout(fig: go.Figure, height: int, present: bool, **kw) -> go.Figure:
    kw.setdefault("margin", dict(l=10, r=10, t=50, b=10))
    kw.setdefault("legend", dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0))
    fig.update_layout(
        template="plotly_white",
        height=height,
        font=dict(size=PRESENT_FONT if present else FONT),
        **kw,
    )
    return fig


def exit_ladder(
    probs: np.ndarray,
    cost: np.ndarray,
    stop: int,
    threshold: float,
    exit_names: Sequence[str],
    class_names: Sequence[str],
    height: int = 420,
    present: bool = False,
) -> go.Figure:
    """Exit by exit: the guess and its confidence, the threshold, where the model stops, and
    the compute spent against the full network (both on a 0–100% axis)."""
    k = probs.shape[0]
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    names = list(exit_names)
    frac = np.asarray(cost, float) / float(cost[-1]) if cost[-1] > 0 else np.ones(k)
    fig = go.Figure()
    fig.add_bar(
        x=names,
        y=conf,
        marker_color=[exit_color(i) for i in range(k)],
        marker_opacity=[1.0 if i <= stop else 0.3 for i in range(k)],
        text=[f"guess {class_names[p]}<br>{c:.0%}" for p, c in zip(pred, conf, strict=True)],
        textposition="inside",
        insidetextanchor="end",
        name="confidence",
        hovertemplate="%{x}: %{text}<extra></extra>",
    )
    fig.add_scatter(
        x=names[: stop + 1],
        y=frac[: stop + 1],
        mode="lines+markers",
        line=dict(color="black", width=3),
        marker=dict(size=10),
        name="compute spent",
        hovertemplate="%{y:.0%} of the full network<extra></extra>",
    )
    fig.add_hline(y=threshold, line=dict(color=NEUTRAL, dash="dash", width=2))
    fig.add_scatter(  # legend entry for the threshold line
        x=[None],
        y=[None],
        mode="lines",
        line=dict(color=NEUTRAL, dash="dash", width=2),
        name=f"threshold {threshold:.1%}",
    )
    fig.add_annotation(
        x=names[stop],
        y=1.08,
        text=f"stops here: {class_names[pred[stop]]}",
        showarrow=False,
        font=dict(color=exit_color(stop), size=(PRESENT_FONT if present else FONT) + 2),
    )
    fig.update_yaxes(range=[0, 1.15], tickformat=".0%", title=None)
    fig.update_xaxes(title=None)
    return _layout(fig, height, present, bargap=0.25)


def tradeoff_chart(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float, str]],
    height: int = 420,
    present: bool = False,
    markers: bool = False,
) -> go.Figure:
    """Accuracy against compute (share of the full network), curves plus marked points.

    curves: name -> (cost fraction [M], accuracy [M]); points: name -> (cost frac, acc, colour).
    """
    fig = go.Figure()
    line_colors = [exit_color(0), exit_color(1), exit_color(2)]
    for i, (name, (cost, acc)) in enumerate(curves.items()):
        order = np.argsort(cost)
        fig.add_scatter(
            x=np.asarray(cost)[order],
            y=np.asarray(acc)[order],
            mode="lines+markers" if markers else "lines",
            line=dict(color=line_colors[i % 3], width=3, shape="linear" if markers else "hv"),
            name=name,
            hovertemplate="compute %{x:.0%}, accuracy %{y:.2%}<extra></extra>",
        )
    symbols = ["circle", "star", "diamond", "square"]
    for i, (name, (cost, acc, color)) in enumerate(points.items()):
        fig.add_scatter(
            x=[cost],
            y=[acc],
            mode="markers",
            marker=dict(color=color, size=18, symbol=symbols[i % 4], line=dict(width=1)),
            name=name,
            hovertemplate=f"{name}: compute %{{x:.0%}}, accuracy %{{y:.2%}}<extra></extra>",
        )
    fig.update_xaxes(
        title="compute (share of the full network)", tickformat=".0%", rangemode="tozero"
    )
    fig.update_yaxes(title="accuracy", tickformat=".1%")
    return _layout(fig, height, present)


def exit_share_bars(
    counts: np.ndarray, exit_names: Sequence[str], height: int = 420, present: bool = False
) -> go.Figure:
    """How many inputs leave at each exit."""
    share = np.asarray(counts, float) / max(1, int(np.sum(counts)))
    fig = go.Figure(
        go.Bar(
            x=list(exit_names),
            y=share,
            marker_color=[exit_color(i) for i in range(len(share))],
            text=[f"{s:.0%}" for s in share],
            textposition="outside",
            hovertemplate="%{x}: %{y:.1%} of inputs<extra></extra>",
        )
    )
    fig.update_yaxes(title="share of inputs leaving here", tickformat=".0%", range=[0, 1.1])
    return _layout(fig, height, present, showlegend=False)


def digit_image(img: np.ndarray, height: int = 220, title: str | None = None) -> go.Figure:
    """A grey image as the model sees it (white ink on black), pixel grid kept."""
    fig = go.Figure(
        go.Heatmap(z=np.asarray(img)[::-1], colorscale="gray", showscale=False, hoverinfo="skip")
    )
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=30 if title else 0, b=0), title=title)
    return fig


def overthinking_grid(
    images: Sequence[np.ndarray] | None,
    probs: Sequence[np.ndarray],
    labels: Sequence[int],
    exit_names: Sequence[str],
    class_names: Sequence[str],
    height: int = 440,
    present: bool = False,
) -> go.Figure:
    """Per sample: the image (top) and its anytime-prediction curve (bottom): the probability
    of the true class and of the final guess at every exit (x axis: exit 1..K).
    Without images (data set not installed) only the curves are drawn."""
    n = len(probs)
    img_rows = 0 if images is None else 1
    final = [int(p[-1].argmax()) for p in probs]
    titles = [
        f"true {class_names[y]} · last exit: {class_names[f]}"
        for y, f in zip(labels, final, strict=True)
    ]
    fig = make_subplots(
        rows=1 + img_rows,
        cols=max(1, n),
        row_heights=[0.45, 0.55] if img_rows else None,
        vertical_spacing=0.08,
        horizontal_spacing=0.04,
        subplot_titles=titles + [""] * n * img_rows,
    )
    curve_row = 1 + img_rows
    k = len(exit_names)
    x = list(range(1, k + 1))
    for i in range(n):
        if img_rows:
            fig.add_trace(
                go.Heatmap(
                    z=np.asarray(images[i])[::-1],
                    colorscale="gray",
                    showscale=False,
                    hoverinfo="skip",
                ),
                row=1,
                col=i + 1,
            )
            fig.update_xaxes(visible=False, row=1, col=i + 1)
            fig.update_yaxes(visible=False, scaleanchor=f"x{i + 1 if i else ''}", row=1, col=i + 1)
        p = np.asarray(probs[i])
        for cls, color, name in (
            (labels[i], CORRECT, "p(true class)"),
            (final[i], WRONG, "p(last exit's guess)"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=p[:, cls],
                    mode="lines+markers",
                    line=dict(color=color, width=3, dash="solid" if color == CORRECT else "dot"),
                    marker=dict(size=9, color=color),
                    name=name,
                    legendgroup=name,
                    showlegend=i == 0,
                    hovertemplate="exit %{x}: %{y:.0%}<extra>" + name + "</extra>",
                ),
                row=curve_row,
                col=i + 1,
            )
        fig.update_xaxes(tickvals=x, title=None, row=curve_row, col=i + 1)
        fig.update_yaxes(
            range=[0, 1.05], tickformat=".0%", showticklabels=i == 0, row=curve_row, col=i + 1
        )
    fig.update_annotations(font_size=(PRESENT_FONT if present else FONT) - 4)
    return _layout(
        fig,
        height,
        present,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.08, xanchor="left", x=0),
    )


def steps_bars(
    values: np.ndarray,
    labels: Sequence[str],
    colors: Sequence[str],
    y_title: str,
    line: float | None = None,
    line_label: str = "",
    height: int = 420,
    present: bool = False,
    y_range: tuple[float, float] | None = None,
) -> go.Figure:
    """Generic bar chart (blocks executed, cumulative halting per step, expert weights)."""
    fig = go.Figure(
        go.Bar(
            x=list(labels),
            y=np.asarray(values, float),
            marker_color=list(colors),
            text=[f"{v:.2f}" for v in np.asarray(values, float)],
            textposition="outside",
            hovertemplate="%{x}: %{y:.3f}<extra></extra>",
        )
    )
    if line is not None:
        fig.add_hline(
            y=line,
            line=dict(color=NEUTRAL, dash="dash", width=2),
            annotation_text=line_label,
            annotation_position="top left",
        )
    fig.update_yaxes(title=y_title, range=list(y_range) if y_range else None)
    return _layout(fig, height, present, showlegend=False)


__all__ = [
    "CORRECT",
    "HIGHLIGHT",
    "WRONG",
    "digit_image",
    "exit_ladder",
    "exit_share_bars",
    "expert_color",
    "overthinking_grid",
    "steps_bars",
    "tradeoff_chart",
]
