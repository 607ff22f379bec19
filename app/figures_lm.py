"""Figures and highlighted text for the pretrained language model (SmolLM2-135M): pure
functions, data in, Plotly figure or HTML string out (every model-made character escaped).

With 30 layers a categorical colour per layer cannot be told apart, so exit layers use the
palette's sequential scale (Viridis, colour-blind safe): dark = early exit, yellow = last layer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from app.palette import (
    CATEGORICAL,
    HIGHLIGHT,
    NEUTRAL,
    OUTLINE_DARK,
    OUTLINE_LIGHT,
    SEQUENTIAL,
)

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


# --- the study: quality against compute, and the lens comparison ------------------------------

# One colour per method family: early exits blue-ish, skips orange-ish; dashes tell them apart.
_METHOD_STYLE = {
    "exit_fixed": (NEUTRAL, "dot"),
    "calm_max_prob": (CATEGORICAL[0], "solid"),
    "calm_margin": (CATEGORICAL[2], "solid"),
    "calm_saturation": (CATEGORICAL[3], "solid"),
    "calm_gate": (CATEGORICAL[4], "dash"),
    "skip_middle": (CATEGORICAL[1], "solid"),
    "skip_even": (CATEGORICAL[6], "dash"),
    "skip_greedy": (CATEGORICAL[7], "dot"),
}
QUALITY_LABELS = {
    "agreement": "next-token agreement with the full model",
    "perplexity": "perplexity of the text (log scale)",
}
_BELOW = dict(orientation="h", yanchor="top", y=-0.18, x=0, xanchor="left")


def study_curves_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    labels: dict[str, str],
    metric: str,
    n_layer: int,
    oracle: Sequence[tuple[str, float]],
    reference_fraction: float,
    full_quality: float,
    current: tuple[float, float, str] | None = None,
    max_points: int = 200,
    time_axis: tuple[str, Callable[[float], float]] | None = None,
) -> go.Figure:
    """Quality (``metric``) against mean layers per token: one line per method (``curves``:
    method -> (layers, quality), sorted by layers; thinned for drawing), the per-sequence
    oracle(s) (``oracle``: (label, fraction of layers)) drawn at the full model's quality, the
    published oracle's fraction as a vertical line, and ``current`` (layers, quality, label).

    ``time_axis`` (unit, layers -> ms of a static plan that deep): the x axis is time per
    token; ``curves`` and ``current`` then carry ms, and the oracles (static plans) are placed
    at the time of their depth."""
    from engine.core.tradeoff import drawing_indices

    unit, to_x = time_axis or ("layers", lambda layers: layers)
    fig = go.Figure()
    ys = []
    for method, (x, y) in curves.items():
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        keep = drawing_indices(x, y if metric == "agreement" else -y, max_points)
        color, dash = _METHOD_STYLE.get(method, (NEUTRAL, "solid"))
        ys.append(y[np.isfinite(y)])
        fig.add_trace(
            go.Scatter(
                x=x[keep],
                y=y[keep],
                mode="lines+markers" if len(keep) <= 30 else "lines",
                name=labels.get(method, method),
                line=dict(color=color, dash=dash, width=2),
                marker=dict(size=5),
                hovertemplate="%{x:.3g} " + unit + "<br>" + metric + " %{y:.4g}<extra>"
                "%{fullData.name}</extra>",
            )
        )
    # two oracles at the same quality, often the same depth: tell them apart by mark and label
    looks = (("diamond", "top left"), ("square-open", "bottom left"))
    for (label, frac), (symbol, where) in zip(oracle, looks, strict=False):
        short = label.split(": ", 1)[-1]
        fig.add_trace(
            go.Scatter(
                x=[float(to_x(frac * n_layer))],
                y=[full_quality],
                mode="markers+text",
                name=label,
                text=[f"oracle ({short}): {frac:.0%}"],
                textposition=where,
                cliponaxis=False,
                marker=dict(color=OUTLINE_DARK, symbol=symbol, size=12, line=dict(width=2)),
                hovertemplate=f"{label}<br>%{{x:.3g}} {unit} ({frac:.1%} of the layers)"
                "<extra></extra>",
            )
        )
    flat = np.concatenate(ys) if ys else np.array([0.0, 1.0])
    lo, hi = (0.0, 1.02) if metric == "agreement" else (float(flat.min()), float(flat.max()))
    x_ref = float(to_x(reference_fraction * n_layer))
    fig.add_trace(
        go.Scatter(
            x=[x_ref, x_ref],
            y=[lo, hi],
            mode="lines",
            name=f"oracle of Glavas et al. 2024 ({reference_fraction:.1%} of the layers)",
            line=dict(color=NEUTRAL, dash="dashdot", width=1.5),
            hovertemplate=f"published per-sequence oracle: {reference_fraction:.1%} of the "
            "layers<extra></extra>",
        )
    )
    if current is not None:
        cx, cy, label = current
        fig.add_trace(
            go.Scatter(
                x=[cx],
                y=[cy],
                mode="markers",
                name=label,
                marker=dict(
                    color=HIGHLIGHT, symbol="star", size=18, line=dict(width=1.5, color="black")
                ),
                hovertemplate="%{x:.3g} " + unit + "<br>" + metric + " %{y:.4g}<extra>your "
                "setting</extra>",
            )
        )
    fig.update_layout(
        height=540,
        margin=dict(l=60, r=20, t=60, b=40),  # room above the top for an oracle's label
        font=_FONT,
        template="plotly_white",
        xaxis=dict(
            title=f"mean layers per token (of {n_layer})"
            if time_axis is None
            else f"mean time per token, {unit} (a decode step, this machine)",
            range=[0, n_layer + 0.5] if time_axis is None else None,
            rangemode="tozero",  # time: CALM's reads can cost more than the full depth's step
        ),
        yaxis=dict(
            title=QUALITY_LABELS[metric],
            type="log" if metric == "perplexity" else "linear",
            range=[0, 1.02] if metric == "agreement" else None,
        ),
        legend=_BELOW,
    )
    return fig


LENS_METRICS = {
    "agreement": "top-1 agreement with the full model",
    "kl": "KL(full ‖ lens), nats",
    "perplexity": "perplexity (log scale)",
}
LENS_NAMES = {"logit": "logit lens", "tuned": "tuned lens"}


def lens_layers_figure(rows: dict[str, Sequence[float]], metric: str) -> go.Figure:
    """One line per lens (``rows``: lens -> value per layer, layer 1 first) of ``metric``."""
    fig = go.Figure()
    for j, (lens, values) in enumerate(rows.items()):
        fig.add_trace(
            go.Scatter(
                x=list(range(1, len(values) + 1)),
                y=list(values),
                mode="lines+markers",
                name=LENS_NAMES.get(lens, lens),
                line=dict(color=CATEGORICAL[j], width=2, dash="solid" if j == 0 else "dash"),
                hovertemplate="layer %{x}<br>" + metric + " %{y:.4g}<extra>%{fullData.name}"
                "</extra>",
            )
        )
    fig.update_layout(
        height=400,
        margin=dict(l=60, r=20, t=30, b=40),
        font=_FONT,
        template="plotly_white",
        xaxis=dict(title="layer read"),
        yaxis=dict(
            title=LENS_METRICS[metric],
            type="log" if metric == "perplexity" else "linear",
        ),
        legend=_BELOW,
    )
    return fig
