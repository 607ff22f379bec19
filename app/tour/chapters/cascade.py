"""Cascades: a chain of models, small first (the cascade's trace)."""

from __future__ import annotations

import streamlit as st

from app import figures_tour as ft
from app.tour import data
from app.tour.common import (
    Chapter,
    Ctx,
    deeper,
    pct,
    show_figure,
    text_and_figure,
)
from engine.registry import ModelCard


def cascade_card() -> ModelCard | None:
    """The first bundled cascade with its test trace."""
    return data.traced_card("cascade")


def cascade(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    names = list(trace.meta.exit_names)
    left, right = text_and_figure(
        ctx,
        "Instead of exits inside one network, a **cascade** runs a sequence of separate models, "
        "from small and cheap to big and slow. The small one answers first; only when it is "
        "not confident enough is the input passed to the next, bigger one. Most inputs never "
        "reach the big model.",
        "Cascades date back to Viola & Jones's face detector (2001); model cascades stop at the "
        "first model that is confident. The same rule works inside one network: a *slimmable* "
        "CNN (Yu et al. 2019) first runs a quarter of its channels, about a sixteenth of the "
        "FLOPs, and widens only for the inputs it is still unsure of (the Fashion-MNIST width "
        "cascade on the tuning page).",
    )
    with right:
        t = st.slider(
            "Confidence threshold", 0.5, 1.0, 0.9, 0.005, format="%.3f", key="tour.w.cascade_t"
        )
    s = data.policy_stats(card.model_id, "max_prob", t)
    last = data.policy_stats(card.model_id, "fixed", trace.num_exits - 1)
    with left:
        st.markdown(
            f"At threshold **{t:.3f}**: **{pct(s.accuracy, 1)}** correct with "
            f"**{pct(s.cost_fraction)}** of the compute of running every model "
            f"(the biggest model alone: {pct(last.accuracy, 1)}); "
            f"**{pct(s.exit_fraction[0])}** of the digits are answered by {names[0]}."
        )
        deeper(
            "pages/tuning.py",
            "Go deeper: tune the cascade on the whole test set",
            {"model": card.model_id, "policy": "max_prob", "t": t},
        )
    with right:
        fig = ft.exit_share_bars(
            s.exit_counts, names, height=ctx.fig_height - 60, present=ctx.present
        )
        show_figure(fig, "tour.fig.cascade")


CHAPTER = Chapter(
    "cascade", "Cascades: small model first", "a cascade model", cascade_card, cascade, order=60
)
