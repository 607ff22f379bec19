"""Patience: stop when consecutive exits agree (PABEE), against the confidence threshold."""

from __future__ import annotations

import streamlit as st

from app import figures_tour as ft
from app.palette import exit_color
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


def patience(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    k = trace.num_exits
    left, right = text_and_figure(
        ctx,
        "Confidence can be misleading. **Patience** ignores it and watches the answers instead: "
        "stop as soon as *p* exits in a row have given the same answer. A network that keeps "
        "changing its mind keeps going; one that has settled stops. Patience 0 stops at the "
        "first exit; a larger patience is slower and safer.",
        "PABEE (Zhou et al., 2020): a better accuracy–speed trade-off than earlier exit methods, "
        "and higher accuracy than the full ALBERT on GLUE.",
    )
    with right:
        p = st.slider(
            "Patience (exits in a row that must agree)",
            0,
            k - 1,
            value=min(2, k - 1),
            key="tour.w.patience",
        )
    with left:
        s = data.policy_stats(card.model_id, "patience", p)
        st.markdown(
            f"With patience **{p}**: **{pct(s.accuracy, 1)}** correct with "
            f"**{pct(s.cost_fraction)}** of the compute."
        )
        deeper(
            "pages/tuning.py",
            "Go deeper: patience on the whole test set",
            {"model": card.model_id, "policy": "patience", "p": p},
        )
    with right:
        cost_t, acc_t = data.curve_points(card.model_id, "max_prob")
        cost_p, acc_p = data.curve_points(card.model_id, "patience")
        fig = ft.tradeoff_chart(
            {"confidence threshold": (cost_t, acc_t), "patience 0…K-1": (cost_p, acc_p)},
            {f"patience {p}": (s.cost_fraction, s.accuracy, exit_color(1))},
            height=ctx.fig_height,
            present=ctx.present,
        )
        show_figure(fig, "tour.fig.patience")


CHAPTER = Chapter(
    "patience",
    "Patience: stop when the answers agree",
    "the multi-exit CNN",
    data.exit_card,
    patience,
    order=50,
)
