"""Figures of the mixture-of-experts page: pure functions, arrays in, plotly figures out.

Every expert has one colour on every figure (``palette.expert_color``); heatmaps use the
sequential colour-blind-safe scale.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app import palette


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def token_names(grid: int) -> list[str]:
    return [f"patch {t} (r{t // grid + 1},c{t % grid + 1})" for t in range(grid * grid)]


def routing_heatmap(
    scores: np.ndarray,
    chosen: np.ndarray,
    grid: int,
    score_name: str = "router probability",
    dropped: np.ndarray | None = None,
    title: str = "",
    subtitle: str = "",
) -> go.Figure:
    """Tokens x experts for one layer: colour = router score, dot = the expert ran.

    scores, chosen [T, E]; dropped [T] (router choices dropped by capacity) adds a cross at
    the token's row label. The dot is the expert's colour with a black outline inside a white
    ring, so it shows on the darkest and on the brightest cell. The title sits in the
    container's top margin (automargin), above the expert labels on the top axis.
    """
    t, e = scores.shape
    names = token_names(grid)
    if dropped is not None:
        names = [n + (" ✕ dropped" if d > 0 else "") for n, d in zip(names, dropped, strict=True)]
    experts = [f"E{j}" for j in range(e)]
    fig = go.Figure(
        go.Heatmap(
            z=scores.astype(float),
            x=experts,
            y=names,
            colorscale=palette.SEQUENTIAL,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": score_name, "side": "right"}},
            hovertemplate="%{y}<br>%{x}: %{z:.3f}<extra></extra>",
        )
    )
    rows, cols = np.nonzero(chosen)
    x, y = [experts[c] for c in cols], [names[r] for r in rows]
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="markers",
            marker={
                "symbol": "circle",
                "size": 10,
                "line": {"width": 1.5, "color": palette.OUTLINE_DARK},
                "color": [palette.expert_color(int(c)) for c in cols],
            },
            name="expert ran",
            legendgroup="ran",
            hoverinfo="skip",
            showlegend=True,
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="markers",
            marker={
                "symbol": "circle-open",  # an open symbol strokes in marker.color
                "size": 16,
                "color": palette.OUTLINE_LIGHT,
                "line": {"width": 2},
            },
            name="expert ran (ring)",
            legendgroup="ran",
            hoverinfo="skip",
            showlegend=False,
        )
    )
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title=None, side="top")
    fig.update_layout(
        title={
            "text": title or None,
            "subtitle": {"text": subtitle or None},
            "yref": "container",
            "y": 1,
            "yanchor": "top",
            "pad": {"t": 8},
            "automargin": True,
        },
        height=max(320, 24 * t + 160),
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.02, "yanchor": "top"},
    )
    return fig


def patch_overlay(
    image: np.ndarray, chosen: np.ndarray, scores: np.ndarray, patch: int, title: str = ""
) -> go.Figure:
    """The image with its patch grid, each patch filled with the colour of its top expert.

    image uint8 [H, W]; chosen, scores [T, E]. The label in each patch is its top expert and,
    when more ran, ``+n``; a patch whose experts were all dropped is left unfilled.
    """
    h, w = image.shape
    grid = h // patch
    fig = go.Figure(
        go.Heatmap(
            z=image[::-1].astype(float),
            colorscale="Greys",
            reversescale=True,
            showscale=False,
            hoverinfo="skip",
        )
    )
    used = set()
    shapes, annotations = [], []  # set at once: add_shape/add_annotation per patch cost ~1 s
    for t in range(grid * grid):
        r, c = divmod(t, grid)
        y0 = h - (r + 1) * patch - 0.5
        x0 = c * patch - 0.5
        ran = np.flatnonzero(chosen[t])
        if len(ran) == 0:
            label, colour = "—", None
        else:
            top = int(ran[np.argmax(scores[t, ran])])
            colour = palette.expert_color(top)
            used.add(top)
            label = f"E{top}" + (f" +{len(ran) - 1}" if len(ran) > 1 else "")
        shapes.append(
            dict(
                type="rect",
                x0=x0,
                x1=x0 + patch,
                y0=y0,
                y1=y0 + patch,
                line={"color": "white", "width": 1},
                fillcolor=_rgba(colour, 0.45) if colour else "rgba(0,0,0,0)",
            )
        )
        annotations.append(
            dict(
                x=x0 + patch / 2,
                y=y0 + patch / 2,
                text=label,
                showarrow=False,
                font={"color": "white", "size": 12},
                bgcolor="rgba(0,0,0,0.35)",
            )
        )
    fig.update_layout(shapes=shapes, annotations=annotations)
    for e in sorted(used):
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"color": palette.expert_color(e), "size": 10, "symbol": "square"},
                name=f"expert {e}",
            )
        )
    fig.update_xaxes(visible=False, range=[-0.5, w - 0.5], constrain="domain")
    fig.update_yaxes(visible=False, range=[-0.5, h - 0.5], scaleanchor="x", constrain="domain")
    fig.update_layout(
        title=title or None,
        height=460,
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        legend={"orientation": "h", "y": -0.02, "yanchor": "top"},
    )
    return fig


def expert_load(load: np.ndarray, tokens: int, layer_names: list[str] | None = None) -> go.Figure:
    """Share of tokens each expert processed, one panel per layer, with the uniform load line.

    load [L, E] token counts; tokens = number of tokens seen per layer. The ideal line is the
    layer's mean experts per token divided by E (every expert equally busy).
    """
    layers, experts = load.shape
    names = layer_names or [f"layer {i + 1}" for i in range(layers)]
    fig = make_subplots(rows=1, cols=layers, shared_yaxes=True, subplot_titles=names)
    share = load / max(tokens, 1)
    for i in range(layers):
        fig.add_trace(
            go.Bar(
                x=[f"E{e}" for e in range(experts)],
                y=share[i],
                marker_color=[palette.expert_color(e) for e in range(experts)],
                showlegend=False,
                hovertemplate="%{x}: %{y:.1%} of tokens<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
    # the uniform-load lines as plain shapes, set at once (add_hline per panel cost ~0.1 s each)
    axis = [("x", "y")] + [(f"x{i + 1}", f"y{i + 1}") for i in range(1, layers)]
    ideal = share.sum(axis=1) / experts
    fig.update_layout(
        shapes=[
            dict(
                type="line",
                xref=f"{xa} domain",
                yref=ya,
                x0=0,
                x1=1,
                y0=v,
                y1=v,
                line={"dash": "dash", "color": palette.NEUTRAL},
            )
            for (xa, ya), v in zip(axis, ideal, strict=True)
        ]
    )
    fig.add_annotation(
        text="uniform", xref="x domain", yref="y", x=1, y=ideal[0], showarrow=False, yshift=8
    )
    fig.update_yaxes(tickformat=".0%", row=1, col=1, title="share of tokens")
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def class_usage(usage: np.ndarray, class_names: list[str]) -> go.Figure:
    """Classes x experts: the share of each class's token-expert assignments per expert."""
    experts = usage.shape[1]
    fig = go.Figure(
        go.Heatmap(
            z=usage,
            x=[f"E{e}" for e in range(experts)],
            y=list(class_names),
            colorscale=palette.SEQUENTIAL,
            zmin=0,
            colorbar={"title": {"text": "share", "side": "right"}, "tickformat": ".0%"},
            hovertemplate="%{y} → %{x}: %{z:.1%}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=380, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


def experts_histogram(hist: list[float] | np.ndarray, title: str = "") -> go.Figure:
    """Fraction of (token, layer) pairs that ran 1, 2, ..., E experts."""
    hist = np.asarray(hist, dtype=float)
    fig = go.Figure(
        go.Bar(
            x=np.arange(1, len(hist) + 1),
            y=hist,
            marker_color=palette.exit_color(0),
            hovertemplate="%{x} experts: %{y:.1%}<extra></extra>",
        )
    )
    mean = float((np.arange(1, len(hist) + 1) * hist).sum() / max(hist.sum(), 1e-12))
    fig.add_vline(
        x=mean,
        line={"dash": "dash", "color": palette.HIGHLIGHT},
        annotation_text=f"mean {mean:.2f}",
    )
    fig.update_xaxes(title="experts run per token", dtick=1)
    fig.update_yaxes(title="share of tokens", tickformat=".0%")
    fig.update_layout(title=title or None, height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


def accuracy_compute(
    points: list[dict],
    dense_flops: float,
    current: int | None = None,
    name: str = "dynamic-k (τ sweep)",
    others: list[dict] | None = None,
    others_name: str = "top-k",
    time_ms: list[float] | None = None,
    time_unit: str = "",
) -> go.Figure:
    """Accuracy against FLOPs (relative to the dense-equivalent model) for a routing sweep.

    points: ``engine.families.moe.analysis.stats`` dicts; ``current`` is the index of the point in use,
    drawn larger; ``others`` (e.g. the top-k model's settings) are drawn as separate markers.
    ``time_ms`` (one per point): against the measured time per sample in ``time_unit`` instead.
    """
    fig = go.Figure()

    def xy(ps):
        return [p["flops_mean"] / dense_flops for p in ps], [p["accuracy"] for p in ps]

    x, y = xy(points)
    if time_ms is not None:
        x, others = list(time_ms), None
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="lines+markers+text",
            text=[p["setting"].replace("tau=", "τ=") for p in points],
            textposition="top center",
            textfont={"size": 10},
            marker={"color": palette.exit_color(0), "size": 8},
            line={"color": palette.exit_color(0)},
            name=name,
            customdata=[p["experts_per_token_mean"] for p in points],
            hovertemplate="%{text}<br>"
            + ("%{x:.3g} ms" if time_ms is not None else "%{x:.1%} of dense FLOPs")
            + "<br>accuracy %{y:.2%}<br>%{customdata:.2f} experts/token<extra></extra>",
        )
    )
    if others:
        ox, oy = xy(others)
        fig.add_trace(
            go.Scatter(
                x=ox,
                y=oy,
                mode="markers",
                marker={"color": palette.exit_color(2), "size": 8, "symbol": "diamond"},
                text=[p["setting"] for p in others],
                name=others_name,
                hovertemplate="%{text}<br>%{x:.1%} of dense FLOPs<br>accuracy %{y:.2%}"
                "<extra></extra>",
            )
        )
    if current is not None and 0 <= current < len(points):
        fig.add_trace(
            go.Scatter(
                x=[x[current]],
                y=[y[current]],
                mode="markers",
                marker={
                    "size": 18,
                    "color": "rgba(0,0,0,0)",
                    "line": {"color": palette.HIGHLIGHT, "width": 3},
                },
                name=f"current: {points[current]['setting'].replace('tau=', 'τ=')}",
                hoverinfo="skip",
            )
        )
    if time_ms is not None:
        fig.update_xaxes(title=f"measured {time_unit} per sample")
    else:
        fig.add_vline(
            x=1.0, line={"dash": "dot", "color": palette.NEUTRAL}, annotation_text="dense"
        )
        fig.update_xaxes(title="FLOPs per sample / dense-equivalent model", tickformat=".0%")
    fig.update_yaxes(title="test accuracy", tickformat=".1%")
    fig.update_layout(height=400, margin={"l": 10, "r": 10, "t": 20, "b": 10})
    return fig
