"""Figures and highlighted-text renderers for the language page: pure functions, data in, out.

Plotly figures use the shared palette (``app.palette``): exit k always has ``exit_color(k)``.
Highlighted text is returned as an HTML string (every user-provided character escaped) for
``st.markdown(..., unsafe_allow_html=True)``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go

from app.palette import CORRECT, NEUTRAL, WRONG, exit_color

_FONT = dict(family="sans-serif", size=13)
# Below the x-axis title (plotly grows the bottom margin to fit), so it covers no label.
_LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.22, x=0)


def _layout(title: str, height: int = 340, **extra) -> dict:
    return dict(
        title=dict(text=title, font=dict(size=15)),
        height=height,
        margin=dict(l=50, r=20, t=50, b=45),
        font=_FONT,
        template="plotly_white",
        **extra,
    )


# --- text classifier -------------------------------------------------------------------------


def exit_probs_figure(
    probs: np.ndarray, class_names, exit_names, exit_taken: int | None = None
) -> go.Figure:
    """One text's class probabilities at every exit (lines per class), the exit taken marked."""
    fig = go.Figure()
    x = list(exit_names)
    class_colors = [WRONG, NEUTRAL, CORRECT] if len(class_names) == 3 else None
    for j, name in enumerate(class_names):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=probs[:, j],
                mode="lines+markers",
                name=str(name),
                line=dict(color=class_colors[j]) if class_colors else None,
                hovertemplate=f"{name}: " + "%{y:.3f} at %{x}<extra></extra>",
            )
        )
    if exit_taken is not None:
        fig.add_vline(
            x=exit_taken,
            line=dict(color=exit_color(exit_taken), width=3, dash="dash"),
            annotation_text=f"exits here ({x[exit_taken]})",
            annotation_position="top left",
        )
    fig.update_layout(
        **_layout("Class probabilities at every exit", height=360),
        # headroom above p = 1 for the "exits here" label, so no line runs through it
        yaxis=dict(title="probability", range=[0, 1.15], tickvals=[0, 0.2, 0.4, 0.6, 0.8, 1]),
        xaxis=dict(title="exit"),
        legend=_LEGEND_BELOW,
    )
    return fig


def _attr_color(v: float) -> str:
    """Diverging colour for a normalised attribution in [-1, 1]: orange against, blue for."""
    a = min(1.0, abs(v)) * 0.75
    return f"rgba(0,114,178,{a:.2f})" if v >= 0 else f"rgba(213,94,0,{a:.2f})"


def attribution_html(pieces: list[str], scores: np.ndarray, title: str = "") -> str:
    """Word pieces highlighted by attribution (blue: toward the class, orange: against)."""
    scores = np.asarray(scores, dtype=np.float64)
    scale = np.abs(scores).max() if len(scores) and np.abs(scores).max() > 0 else 1.0
    out = []
    for piece, s in zip(pieces, scores, strict=True):
        text = html.escape(piece)
        if piece.startswith("##"):
            text = html.escape(piece[2:])
            sep = ""
        else:
            sep = " "
        out.append(
            f'{sep}<span title="{s:+.4f}" style="background:{_attr_color(s / scale)};'
            f'border-radius:3px;padding:1px 2px">{text}</span>'
        )
    head = f"<div style='font-weight:600;margin-bottom:4px'>{html.escape(title)}</div>"
    return f"{head}<div style='line-height:2.0'>{''.join(out).strip()}</div>"


def depth_by_confidence_figure(d, exit_names, policy_label: str = "") -> go.Figure:
    """Mean exit layer per annotator-confidence bin, with standard errors and bin sizes."""
    mean = np.asarray(d.mean_exit, dtype=np.float64) + 1  # 1-based layer count
    fig = go.Figure(
        go.Bar(
            x=d.bin_labels,
            y=mean,
            error_y=dict(type="data", array=np.nan_to_num(d.sem_exit), visible=True),
            marker_color=[
                exit_color(int(round(m)) - 1) if np.isfinite(m) else NEUTRAL for m in mean
            ],
            customdata=np.stack([d.count, np.nan_to_num(d.accuracy)], axis=1),
            hovertemplate="annotator confidence %{x}<br>mean layers %{y:.2f}<br>"
            "%{customdata[0]} tweets, accuracy %{customdata[1]:.1%}<extra></extra>",
        )
    )
    rho = "n/a" if not math.isfinite(d.spearman) else f"{d.spearman:+.3f}"
    fig.update_layout(
        **_layout(f"Layers used vs annotator agreement (Spearman ρ = {rho}) {policy_label}"),
        xaxis=dict(title="annotator confidence (agreement)"),
        yaxis=dict(title="mean layers run", range=[0, len(exit_names) + 0.3]),
    )
    return fig


# --- early-exit language model ---------------------------------------------------------------


def token_exit_html(
    text: str, layers_run: list[int], confidence: list[float], n_layer: int, probs=None
) -> str:
    """Generated characters coloured by the number of layers they ran; hover: confidence."""
    out = []
    for i, ch in enumerate(text):
        k = int(layers_run[i]) - 1
        conf = confidence[i]
        tip = f"layers {k + 1}/{n_layer}"
        if conf is not None and math.isfinite(conf):
            tip += f", confidence {conf:.3f}"
        if probs is not None:
            tip += f", p(token) {probs[i]:.3f}"
        shown = "⏎<br>" if ch == "\n" else html.escape(ch).replace(" ", "&nbsp;")
        out.append(
            f'<span title="{html.escape(tip)}" style="background:{exit_color(k)}55;'
            f"border-bottom:3px solid {exit_color(k)};font-family:monospace;"
            f'padding:0 1px">{shown}</span>'
        )
    return "<div style='line-height:2.1;word-wrap:break-word'>" + "".join(out) + "</div>"


def layer_legend_html(n_layer: int) -> str:
    items = [
        f'<span style="background:{exit_color(k)}55;border-bottom:3px solid {exit_color(k)};'
        f'padding:0 6px;margin-right:6px;font-family:monospace">{k + 1}</span>'
        for k in range(n_layer)
    ]
    return "<div>layers run: " + "".join(items) + "</div>"


_DASH = {"exit": "solid", "skip": "dot"}
_SYMBOL = {"max_prob": "circle", "margin": "diamond", "saturation": "square"}
MEASURE_LABELS = {
    "max_prob": "softmax max-prob",
    "margin": "top-2 margin",
    "saturation": "state saturation (cosine)",
}


def quality_vs_layers_figure(
    sweep: list[dict],
    oracles: list[dict],
    per_layer: dict,
    metric: str = "agreement",
    highlight: tuple[str, str] | None = None,
    current: dict | None = None,
    time_axis: tuple[str, list[float], Callable[[float], float]] | None = None,
) -> go.Figure:
    """Quality against mean fraction of layers: policy sweeps (lines), static exits, oracle.

    metric: "agreement" (with the full model's tokens, higher is better) or "perplexity".
    ``time_axis`` (unit, each sweep point's ms per token, fraction of layers -> ms of a static
    exit that deep): the x axis is time per token instead.
    """
    fig = go.Figure()
    ms = {}
    if time_axis is not None:
        unit, sweep_ms, static_x = time_axis
        ms = {id(p): x for p, x in zip(sweep, sweep_ms, strict=True)}
    else:
        unit, static_x = "", lambda f: f
    x_of = (lambda p: ms[id(p)]) if ms else (lambda p: p["fraction"])
    keys = sorted({(p["measure"], p["mode"]) for p in sweep})
    for j, (measure, mode) in enumerate(keys):
        pts = sorted(
            (p for p in sweep if p["measure"] == measure and p["mode"] == mode),
            key=lambda p: p["fraction"],
        )
        emph = highlight == (measure, mode)
        fig.add_trace(
            go.Scatter(
                x=[x_of(p) for p in pts],
                y=[p[metric] for p in pts],
                mode="lines+markers",
                name=f"{MEASURE_LABELS.get(measure, measure)}, {mode}",
                line=dict(color=exit_color(j), dash=_DASH.get(mode), width=4 if emph else 2),
                marker=dict(symbol=_SYMBOL.get(measure, "circle"), size=9 if emph else 6),
                customdata=[[p["threshold"], p["fraction"]] for p in pts],
                hovertemplate="threshold %{customdata[0]}<br>layers %{customdata[1]:.1%}<br>"
                + (f"%{{x:.3g}} {unit}<br>" if unit else "")
                + metric
                + " %{y:.4g}<extra>%{fullData.name}</extra>",
            )
        )
    n = len(per_layer[metric])
    fig.add_trace(
        go.Scatter(
            x=[static_x((k + 1) / n) for k in range(n)],
            y=per_layer[metric],
            mode="markers",
            name="every token exits after layer k",
            marker=dict(color=NEUTRAL, symbol="x", size=9),
            hovertemplate="all tokens at layer %{x:.0%}<br>" + metric + " %{y:.4g}<extra></extra>",
        )
    )
    orc = [
        o
        for o in oracles
        if o["criterion"] == ("agreement" if metric == "agreement" else "perplexity")
    ]
    if orc:
        fig.add_trace(
            go.Scatter(
                x=[static_x(o["fraction"]) for o in orc],
                y=[o[metric] for o in orc],
                mode="markers+text",
                name="per-sequence oracle",
                text=[
                    f"oracle ≥{o['target']:.0%}"
                    if o["criterion"] == "agreement"
                    else f"oracle ppl+{o['target']:.0%}"
                    for o in orc
                ],
                # labels near the right edge go up and left, inside the plot, clear of the legend
                textposition=["top left" if o["fraction"] > 0.75 else "bottom right" for o in orc],
                cliponaxis=False,
                marker=dict(color="#000000", symbol="star", size=14),
                hovertemplate="oracle<br>layers %{x:.1%}<br>" + metric + " %{y:.4g}<extra></extra>",
            )
        )
    if current is not None:
        fig.add_trace(
            go.Scatter(
                x=[current["ms"] if unit else current["fraction"]],
                y=[current[metric]],
                mode="markers",
                name="this prompt",
                marker=dict(color=WRONG, symbol="circle-open", size=18, line=dict(width=3)),
            )
        )
    fig.update_layout(
        **_layout(
            "Quality vs layers used (held-out BBC text)",
            height=520,
            xaxis=dict(title="mean fraction of layers run", tickformat=".0%", range=[0, 1.04])
            if not unit
            else dict(title=f"mean time per character, {unit} (this machine)", rangemode="tozero"),
            yaxis=dict(
                title="agreement with full-model tokens"
                if metric == "agreement"
                else "perplexity (lower is better)",
                tickformat=".0%" if metric == "agreement" else None,
            ),
            legend=dict(_LEGEND_BELOW, y=-0.15, font=dict(size=11)),
        )
    )
    return fig


def per_layer_figure(values: list[float], name: str = "perplexity") -> go.Figure:
    n = len(values)
    fig = go.Figure(
        go.Bar(
            x=[f"layer {k + 1}" for k in range(n)],
            y=values,
            marker_color=[exit_color(k) for k in range(n)],
            hovertemplate="%{x}: " + name + " %{y:.3f}<extra></extra>",
            text=[f"{v:.2f}" for v in values],
            textposition="outside",
        )
    )
    fig.update_layout(**_layout(f"{name.capitalize()} when every token exits at layer k", 300))
    return fig
