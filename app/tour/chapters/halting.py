"""Adaptive computation time on parity strings: steps against difficulty."""

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
from engine.core import stats
from engine.families.act import records as hl
from engine.registry import ModelCard


@st.cache_data(show_spinner=False)
def halt_records(model_id: str):
    try:
        return hl.load_records(model_id)
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None


def act_card() -> ModelCard | None:
    """The first bundled halting model on bit strings (parity), with its stored unroll."""
    return data.first_card(
        "halt",
        where=lambda c, fam: fam.live_input(c) == "bits" and halt_records(c.model_id) is not None,
    )


def halting(ctx: Ctx, card: ModelCard) -> None:
    rec = halt_records(card.model_id)
    left, right = text_and_figure(
        ctx,
        "**Adaptive computation time** lets a network repeat the same step as often as it "
        "needs. After every step a *halting unit* adds a little to a running total; when the "
        "total reaches 1 − ε, the network stops. Here the task is parity (is the number of +1s "
        "odd?): strings with more non-zero entries are harder. Does the network think longer "
        "about them? The bars answer it, measured on the test strings.",
        "ACT (Graves, 2016): learns parity with an input-dependent number of steps; "
        "PonderNet (Banino et al., 2021) refines the halting rule.",
    )
    grid = [float(e) for e in hl.EPS_GRID if e <= 0.5]
    with right:
        eps = st.select_slider(
            "ε (stop when the halting total reaches 1 − ε)",
            options=grid,
            value=min(grid, key=lambda e: abs(e - float(rec.meta.get("eps", 0.01)))),
            key="tour.w.eps",
        )
    r = hl.at_eps(rec, eps)
    lengths, mean, _, acc, _ = stats.by_level(rec.difficulty, r.steps, r.correct)
    with left:
        st.markdown(
            f"At ε = **{eps:g}**: **{pct(float(r.correct.mean()), 1)}** correct, "
            f"**{r.steps.mean():.2f}** steps on average (from {r.steps.min()} to "
            f"{r.steps.max()}); rank correlation between steps and length "
            f"**{stats.spearman(r.steps, rec.difficulty):.2f}**."
        )
        deeper(
            "pages/halting.py",
            "Go deeper: the halting page",
            {"eps": eps, "model": card.model_id},
        )
    with right:
        fig = ft.steps_bars(
            mean,
            [str(int(x)) for x in lengths],
            [exit_color(0)] * len(lengths),
            "mean steps taken",
            height=ctx.fig_height - 60,
            present=ctx.present,
        )
        fig.update_xaxes(title="input difficulty (number of bits that matter)")
        show_figure(fig, "tour.fig.halting")


CHAPTER = Chapter(
    "halting", "Adaptive computation time: halting", "the ACT model", act_card, halting, order=80
)
