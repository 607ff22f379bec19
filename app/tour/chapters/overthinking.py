"""Overthinking: digits an earlier exit gets right and the last exit gets wrong."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_tour as ft
from app.tour import data
from app.tour.common import (
    Chapter,
    Ctx,
    current_threshold,
    deeper,
    pct,
    show_figure,
    text_and_figure,
)
from engine.registry import ModelCard

OVER_PAGE = "tour.over.page"
OVER_PER_PAGE = 3


def _more_overthinking() -> None:
    st.session_state[OVER_PAGE] = st.session_state.get(OVER_PAGE, 0) + 1


def overthinking(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    rows = data.overthinking_rows(card.model_id)
    shown = np.intersect1d(rows, data.rows_with_images(card, trace))
    n_wrong = int((~trace.correct[:, -1] & (trace.label != -1)).sum())
    left, right = text_and_figure(
        ctx,
        "More layers are not always better. Sometimes an early exit gets a digit **right** and "
        "the last exit, after thinking longer, gets it **wrong**: the network *overthinks*. "
        "Each curve shows, exit by exit, how sure the network is of the true class "
        "(solid line) and of the last exit's wrong answer (dotted line).",
        "Shallow-Deep Networks (Kaya et al., 2019): in their experiments, half of the "
        "misclassifications were *destructive overthinking* — an earlier exit had been right.",
    )
    with left:
        if n_wrong:
            st.markdown(
                f"Here: **{len(rows)} of the {n_wrong}** test digits the last exit gets wrong "
                f"(**{pct(len(rows) / n_wrong)}**) were right at an earlier exit."
            )
        st.button("Show other examples", key="tour.over.more", on_click=_more_overthinking)
        deeper(
            "pages/inspector.py",
            "Go deeper: inspect this sample exit by exit",
            {"model": card.model_id, "policy": "max_prob", "t": current_threshold()}
            | ({"sample": trace.sample_id[rows[0]]} if len(rows) else {}),
        )
    with right:
        if len(rows) == 0:
            st.markdown("This model never overthinks on its test set.")
            return
        gallery = shown if len(shown) else rows  # rows whose image the app has, if any
        page = st.session_state.get(OVER_PAGE, 0)
        start = (page * OVER_PER_PAGE) % len(gallery)
        pick = np.take(gallery, range(start, start + min(OVER_PER_PAGE, len(gallery))), mode="wrap")
        imgs = data.sample_images(card, trace, pick)
        fig = ft.overthinking_grid(
            None if imgs is None else list(imgs),
            [trace.probs[i] for i in pick],
            [int(trace.label[i]) for i in pick],
            trace.meta.exit_names,
            trace.meta.class_names,
            height=ctx.fig_height,
            present=ctx.present,
        )
        show_figure(fig, "tour.fig.overthinking")


CHAPTER = Chapter(
    "overthinking", "Overthinking", "the multi-exit CNN", data.exit_card, overthinking, order=40
)
