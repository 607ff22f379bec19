"""Figures and highlighted text for the pretrained language model (SmolLM2-135M): pure
functions, data in, Plotly figure or HTML string out (every model-made character escaped).

With 30 layers a categorical colour per layer cannot be told apart, so exit layers use the
palette's sequential scale (Viridis, colour-blind safe): dark = early exit, yellow = last layer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from app.palette import OUTLINE_DARK, OUTLINE_LIGHT, SEQUENTIAL

_FONT = dict(family="sans-serif", size=13)


def layer_rgb(k: int, n_layer: int) -> tuple[int, int, int]:
    """Layer k's colour on the sequential scale (0: first layer, n_layer - 1: last)."""
    c = sample_colorscale(SEQUENTIAL, [k / max(1, n_layer - 1)])[0]
    r, g, b = (int(float(v)) for v in c[c.index("(") + 1 : -1].split(","))
    return r, g, b


def _rgba(k: int, n_layer: int, a: float) -> str:
    r, g, b = layer_rgb(k, n_layer)
    return f"rgba({r},{g},{b},{a})"


def _shown(piece: str) -> str:
    text = html.escape(piece)
    return text.replace("\n", "⏎<br>").replace(" ", "&nbsp;") if text else "∅"


def tokens_html(
    pieces: Sequence[str],
    exit_layer: Sequence[int],
    layers_run: Sequence[int],
    confidence: Sequence[float],
    prob: Sequence[float],
    n_layer: int,
) -> str:
    """Generated tokens, each shaded by the layer whose state chose it; hover: that layer, the
    layers its step ran, the rule's confidence and the token's probability."""
    out = []
    for i, piece in enumerate(pieces):
        k = int(exit_layer[i])
        tip = f"token {i + 1}: exit after layer {k + 1}/{n_layer}, {int(layers_run[i])} layers run"
        if math.isfinite(confidence[i]):
            tip += f", confidence {confidence[i]:.3f}"
        if math.isfinite(prob[i]):
            tip += f", p(token) {prob[i]:.3f}"
        out.append(
            f'<span class="aie-tok" data-layer="{k}" title="{html.escape(tip)}" '
            f'style="background:{_rgba(k, n_layer, 0.45)};border-bottom:3px solid '
            f'{_rgba(k, n_layer, 1)};padding:1px 1px;border-radius:2px">{_shown(piece)}</span>'
        )
    return "<div style='line-height:2.2;word-wrap:break-word'>" + "".join(out) + "</div>"


def layer_legend_html(n_layer: int, marks: int = 6) -> str:
    """A colour bar with the exit layers (1-based) it stands for."""
    ks = sorted({round(x) for x in np.linspace(0, n_layer - 1, min(marks, n_layer))})
    items = "".join(
        f'<span style="background:{_rgba(k, n_layer, 0.45)};border-bottom:3px solid '
        f'{_rgba(k, n_layer, 1)};padding:0 6px;margin-right:4px">{k + 1}</span>'
        for k in ks
    )
    return f"<div>exit layer (of {n_layer}): {items}</div>"


def layer_token_heatmap(
    values: np.ndarray,
    pieces: Sequence[str],
    exit_layer: Sequence[int] | None,
    title: str,
    colorbar: str,
    height: int = 460,
) -> go.Figure:
    """values [L, n]: one cell per layer and generated token; the token's exit layer marked."""
    values = np.asarray(values, dtype=np.float64)
    n_layer, n = values.shape
    x = list(range(1, n + 1))
    labels = [p.replace("\n", "⏎") or "∅" for p in pieces]
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=x,
            y=list(range(1, n_layer + 1)),
            colorscale=SEQUENTIAL,
            zmin=0,
            zmax=1,
            colorbar=dict(title=dict(text=colorbar, side="right")),
            customdata=np.tile(np.array(labels, dtype=object), (n_layer, 1)),
            hovertemplate="token %{x} “%{customdata}”<br>layer %{y}<br>"
            + colorbar
            + " %{z:.3f}<extra></extra>",
        )
    )
    if exit_layer is not None:
        ys = [int(e) + 1 for e in exit_layer]
        for color, size, width, legend in (
            (OUTLINE_DARK, 11, 4.5, False),
            (OUTLINE_LIGHT, 9, 2.5, True),
        ):
            fig.add_trace(  # a light cross over a dark one: it shows on every cell
                go.Scatter(
                    x=x,
                    y=ys,
                    mode="markers",
                    name="exit layer",
                    showlegend=legend,
                    marker=dict(symbol="x-thin", size=size, line=dict(width=width, color=color)),
                    hovertemplate="token %{x}: exited after layer %{y}<extra></extra>",
                )
            )
    fig.update_layout(
        title=dict(text=title, font=dict(size=15)),
        height=height,
        margin=dict(l=55, r=20, t=50, b=90),
        font=_FONT,
        template="plotly_white",
        xaxis=dict(
            title="generated token",
            tickvals=x,
            ticktext=labels,
            tickangle=-60,
            tickfont=dict(size=10),
        ),
        yaxis=dict(title="layer"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"),
    )
    return fig


def _attr_color(v: float) -> str:
    """Diverging colour for a normalised attribution in [-1, 1]: blue for, orange against."""
    a = min(1.0, abs(v)) * 0.75
    return f"rgba(0,114,178,{a:.2f})" if v >= 0 else f"rgba(213,94,0,{a:.2f})"


def attribution_rows_html(pieces: Sequence[str], rows: Sequence[tuple[str, np.ndarray]]) -> str:
    """One row of the prompt's tokens per (title, scores), all on one colour scale, so the rows
    compare: blue pushes toward the token, orange against; hover for the value."""
    scale = max((float(np.abs(s).max()) for _, s in rows if len(s)), default=0.0) or 1.0
    out = []
    for title, scores in rows:
        spans = "".join(
            f'<span class="aie-attr" title="{float(s):+.4f}" style="background:'
            f'{_attr_color(float(s) / scale)};border-radius:3px;padding:1px 1px">'
            f"{_shown(p)}</span>"
            for p, s in zip(pieces, scores, strict=True)
        )
        out.append(
            f"<div style='font-weight:600;margin-top:6px'>{html.escape(title)}</div>"
            f"<div style='line-height:2.0;word-wrap:break-word'>{spans}</div>"
        )
    return "".join(out)
