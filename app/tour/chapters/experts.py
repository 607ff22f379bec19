"""Mixture of experts: dynamic-k routing over tau, and top-k where a model is bundled."""

from __future__ import annotations

import numpy as np
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
from engine.registry import ModelCard


def moe_sweep(model_id: str) -> dict | None:
    """The model's shipped sweep (the routing page's cached copy), None when it does not load."""
    try:
        return loaders.moe_bundled_sweep(model_id)
    except (OSError, ValueError, KeyError):
        return None


def _sweeps(card: ModelCard, setting: str) -> bool:
    """Whether the model's shipped sweep has points over ``setting`` ("tau": dynamic-k, "k")."""
    sweep = moe_sweep(card.model_id)
    return sweep is not None and any(p.get(setting) is not None for p in sweep["points"])


def moe_card() -> ModelCard | None:
    """The first bundled routing model whose sweep is dynamic-k (over τ)."""
    return data.first_card("route", where=lambda c, _: _sweeps(c, "tau"))


def topk_card(dataset: str) -> ModelCard | None:
    """A top-k routing model on the same data set, for the comparison curve, if bundled."""
    return data.first_card("route", dataset=dataset, where=lambda c, _: _sweeps(c, "k"))


def experts(ctx: Ctx, card: ModelCard) -> None:
    sweep = moe_sweep(card.model_id)
    dense = float(sweep["dense_flops"])
    dyn = [p for p in sweep["points"] if p.get("tau") is not None]
    n_exp = len(dyn[0]["experts_per_token_hist"]) if dyn else 0
    left, right = text_and_figure(
        ctx,
        "A **mixture of experts** splits a layer into several smaller networks (*experts*) and "
        "a *router* that sends each piece of the input (a *token*; here a patch of the image) "
        "to only some of them. **Top-k** routing always uses k experts per token. "
        "**Dynamic-k** routing predicts how much each expert would contribute and runs only "
        "those above a fraction τ of the largest: easy tokens use few experts, hard ones many.",
        "Sparsely-gated MoE (Shazeer et al., 2017); Switch Transformer (Fedus et al., 2021, "
        "k = 1); D2DMoE (Szatkowski et al., 2024): up to 60% lower inference cost without "
        "significant quality loss.",
    )
    taus = [float(p["tau"]) for p in dyn]
    with right:
        tau = st.select_slider(
            "τ (run the experts above this fraction of the largest)",
            options=taus,
            value=taus[len(taus) // 2],
            key="tour.w.tau",
        )
    point = dyn[taus.index(tau)]
    with left:
        st.markdown(
            f"At τ = **{tau:g}**: **{pct(point['accuracy'], 1)}** correct, "
            f"**{point['experts_per_token_mean']:.1f} of {n_exp}** experts per token on average, "
            f"**{pct(point['flops_mean'] / dense)}** of the dense model's compute."
        )
        deeper("pages/routing.py", "Go deeper: route one image yourself", {"model": card.model_id})
    curves = {
        "dynamic-k (τ)": (
            np.array([p["flops_mean"] / dense for p in dyn]),
            np.array([p["accuracy"] for p in dyn]),
        )
    }
    other = topk_card(card.dataset)
    topk = None if other is None else moe_sweep(other.model_id)
    if topk is not None:
        pts = [p for p in topk["points"] if p.get("k") is not None]
        dense_k = float(topk["dense_flops"])
        curves["top-k (k, capacity)"] = (
            np.array([p["flops_mean"] / dense_k for p in pts]),
            np.array([p["accuracy"] for p in pts]),
        )
    with right:
        fig = ft.tradeoff_chart(
            curves,
            {f"τ = {tau:g}": (point["flops_mean"] / dense, point["accuracy"], exit_color(3))},
            height=ctx.fig_height - 60,
            present=ctx.present,
            markers=True,
        )
        fig.update_xaxes(title="compute (share of the dense model)")
        show_figure(fig, "tour.fig.experts")


CHAPTER = Chapter(
    "experts",
    "Mixture of experts: top-k and dynamic-k",
    "a mixture-of-experts model",
    moe_card,
    experts,
    order=90,
)
