"""A real pretrained decoder read at every layer: where would each token of its answer exit?

The model (SmolLM2-135M, ~25 s to load) is loaded only when the student asks: the tour stays
quick, and says so plainly when the model's package is not installed. After that, the slider
moves over one cached logit-lens pass of a fixed answer, so it re-renders at once."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_lm as flm
from app import loaders, progress
from app.tour import data
from app.tour.common import Chapter, Ctx, deeper, pct, show_figure, text_and_figure
from engine.core.family import FamilyError
from engine.families.hf_causal_lm import live
from engine.registry import ModelCard, RegistryError

PROMPT = "What is the capital of France?"
N_TOKENS = 16
GO = "tour.slm.go"  # session_state: the student asked for the model


def pretrained_lm_card() -> ModelCard | None:
    """The first bundled language model that is pretrained elsewhere (no trainer of ours)."""
    for card, fam in data.cards_of_kind("lm"):
        if fam.trainer is None:
            return card
    return None


def real_lm(ctx: Ctx, card: ModelCard) -> None:
    ref = loaders.lm_ref(card.model_id)
    name = card.title.split(" (")[0]
    left, right = text_and_figure(
        ctx,
        f"**{name}** is a real pretrained language model: 30 layers, trained by others, with "
        "no early-exit heads. Still, each layer's state can be read through the model's own "
        "final layer (the *logit lens*). Here it answers “" + PROMPT + "”; every column is one "
        "token of its answer, every row a layer, and the colour how sure that layer already "
        "is. A token could **exit** at the first layer that is sure enough.",
        "CALM (Schuster et al., 2022): per-token exits, up to ×3 on T5. Glavas et al. (2024): "
        "in decoder-only models, skipping layers is far more robust than exiting early.",
    )
    if not (loaders.lm_is_loaded(ref) or st.session_state.get(GO)):
        with right:
            st.button(
                f"Load {name} and read its layers (about 25 s, once)",
                key="tour.w.slm_load",
                on_click=lambda: st.session_state.__setitem__(GO, True),
            )
        return
    try:
        if not loaders.lm_is_loaded(ref):
            with (
                right,
                progress.status(f"Loading {name} (once per server)…", f"Loaded {name}") as bar,
            ):
                loaders.causal_lm(ref, progress=bar)
        with right, st.spinner(f"Reading every layer of {name}…"):
            ans = loaders.lm_answer_lens(ref, PROMPT, N_TOKENS)
    except (live.LoadError, RegistryError, FamilyError, OSError) as e:
        with right:
            st.warning(f"The model cannot run here: {e}")
        return
    n_layer = ans.max_prob.shape[0]
    with right:
        t = st.slider(
            "Exit when a layer's top probability reaches",
            0.0,
            1.0,
            0.5,
            0.05,
            key="tour.w.slm_t",
        )
    exits = live.lens_exits(ans.max_prob, t, min_layer=n_layer // 2)
    same = ans.agrees[exits, np.arange(len(exits))]
    with left:
        st.markdown(
            f"The first layers are sure of the wrong token (read through the last layer's "
            f"head they mostly echo their input), so here a token may stop from layer "
            f"{n_layer // 2 + 1} on. "
            f"At **{t:.2f}**, its answer's tokens would stop after **{exits.mean() + 1:.1f}** "
            f"of {n_layer} layers on average ({pct((exits + 1).mean() / n_layer)} of the "
            f"work), and **{int(same.sum())} of {len(same)}** would still be the token the "
            "full model writes."
        )
        st.markdown(
            flm.tokens_html(
                ans.pieces,
                exits,
                exits + 1,
                ans.max_prob[exits, np.arange(len(exits))],
                [float("nan")] * len(exits),
                n_layer,
            ),
            unsafe_allow_html=True,
        )
        deeper("pages/language.py", "Go deeper: generate with exits, skips and drafts", {})
    with right:
        fig = flm.layer_token_heatmap(
            ans.max_prob,
            ans.pieces,
            exits,
            "Each layer's top probability, per answer token",
            "max prob",
            height=ctx.fig_height - 60,
        )
        show_figure(fig, "tour.fig.real_lm")


CHAPTER = Chapter(
    "real-lm",
    "A real language model thinks in layers",
    "a pretrained language model",
    pretrained_lm_card,
    real_lm,
    order=110,
)
