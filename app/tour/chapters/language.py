"""Per-token early exit in a language model, from its card's measured sweep."""

from __future__ import annotations

import numpy as np
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


def _exit_points(card: ModelCard) -> list[dict]:
    return [p for p in card.raw.get("metrics", {}).get("sweep", []) if p.get("mode") == "exit"]


def lm_card() -> ModelCard | None:
    """The first bundled language model whose card carries a measured per-token exit sweep."""
    return data.first_card("lm", where=lambda c, _: bool(_exit_points(c)))


def language(ctx: Ctx, card: ModelCard) -> None:
    metrics = card.raw.get("metrics", {})
    pts = sorted(
        (p for p in metrics["sweep"] if p.get("mode") == "exit" and p.get("measure") == "max_prob"),
        key=lambda p: p["threshold"],
    )
    n_layer = int(card.config.get("n_layer", 0)) or None
    left, right = text_and_figure(
        ctx,
        "A language model writes one token (here: one character) at a time, and every token "
        "normally goes through every layer. But many tokens are easy: after “th”, an “e” is "
        "likely. **Per-token early exit** lets each token leave at the first layer whose "
        "prediction is confident enough, and measures how often the text still matches what "
        "the full model would have written.",
        "CALM (Schuster et al., 2022): up to ×3 faster on T5 across three generation tasks "
        "while provably maintaining quality; LayerSkip (Elhoushi et al., 2024): up to 2.16× "
        "on summarisation.",
    )
    ts = [float(p["threshold"]) for p in pts]
    with right:
        t = st.select_slider(
            "Confidence threshold per token", options=ts, value=ts[len(ts) // 2], key="tour.w.lm_t"
        )
    p = pts[ts.index(t)]
    layers = f" of {n_layer} layers" if n_layer else " of the layers"
    with left:
        st.markdown(
            f"At threshold **{t:g}**: tokens run **{pct(p['fraction'])}**{layers} on "
            f"average, and **{pct(p['agreement'], 1)}** of them are the character the full "
            f"model would have chosen (perplexity {p['perplexity']:.2f} against "
            f"{metrics.get('full_perplexity', float('nan')):.2f} for the full model)."
        )
        st.caption("Measured on held-out BBC News text when the model was trained (model card).")
        deeper("pages/language.py", "Go deeper: generate text and watch each character", {})
    with right:
        fig = ft.tradeoff_chart(
            {
                "every threshold": (
                    np.array([q["fraction"] for q in pts]),
                    np.array([q["agreement"] for q in pts]),
                )
            },
            {
                f"threshold {t:g}": (p["fraction"], p["agreement"], exit_color(1)),
                "full model": (1.0, 1.0, "black"),
            },
            height=ctx.fig_height - 60,
            present=ctx.present,
            markers=True,
        )
        fig.update_xaxes(title="layers run (share of the full depth)")
        fig.update_yaxes(title="same character as the full model")
        show_figure(fig, "tour.fig.language")


CHAPTER = Chapter(
    "language",
    "Early exit per token in a language model",
    "the early-exit language model",
    lm_card,
    language,
    order=100,
)
