"""Layer skipping: a gate per block decides whether it runs (the skip model's records)."""

from __future__ import annotations

import streamlit as st

from app import figures_tour as ft
from app import loaders
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
from engine.families.skipnet import records as sk
from engine.registry import ModelCard


def skip_records(model_id: str):
    """The model's records (the skipping page's cached copy), None when they do not load."""
    try:
        return loaders.skip_records(model_id)
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None


def skip_card() -> ModelCard | None:
    """The first bundled layer-skipping model with its per-threshold records."""
    return data.first_card("skip", where=lambda c, _: skip_records(c.model_id) is not None)


def skipping(ctx: Ctx, card: ModelCard) -> None:
    rec = skip_records(card.model_id)
    blocks = list(rec.meta.get("block_names", [f"block {b + 1}" for b in range(rec.num_blocks)]))
    left, right = text_and_figure(
        ctx,
        "Instead of stopping, a network can **skip** layers it does not need. A tiny *gate* in "
        "front of each residual block looks at the input and decides: run this block, or pass "
        "the input straight through. A higher gate threshold skips more blocks; every input "
        "still reaches the final classifier.",
        "SkipNet (Wang et al., 2018): 30–90% less computation at the original accuracy on four "
        "benchmarks.",
    )
    with right:
        t = st.select_slider(
            "Gate threshold (a block runs when its gate says at least this)",
            options=[float(x) for x in rec.thresholds],
            value=float(rec.thresholds[rec.index_of(0.5)]),
            key="tour.w.skip_t",
        )
    i = rec.index_of(t)
    summ = sk.summary(rec, i)
    with left:
        st.markdown(
            f"At gate threshold **{t:.2f}**: **{pct(summ['accuracy'], 1)}** correct with "
            f"**{pct(summ['cost_fraction'])}** of the compute; on average "
            f"**{summ['mean_blocks_run']:.1f} of {rec.num_blocks}** blocks run."
        )
        deeper("pages/skipping.py", "Go deeper: the layer-skipping page", {"t": t})
    with right:
        run_rate = rec.executed[i].mean(axis=0)
        fig = ft.steps_bars(
            run_rate,
            blocks,
            [exit_color(b) for b in range(rec.num_blocks)],
            "share of test digits that run the block",
            height=ctx.fig_height - 60,
            present=ctx.present,
            y_range=(0, 1.15),
        )
        show_figure(fig, "tour.fig.skipping")


CHAPTER = Chapter(
    "skipping",
    "Layer skipping: gates",
    "the layer-skipping (SkipNet) model",
    skip_card,
    skipping,
    order=70,
)
