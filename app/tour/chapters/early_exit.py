"""Early exit: stop at the first confident exit (the multi-exit model's trace)."""

from __future__ import annotations

import streamlit as st

from app import figures_tour as ft
from app.palette import CORRECT, exit_color
from app.tour import data
from app.tour.common import (
    Chapter,
    Ctx,
    deeper,
    pct,
    show_figure,
    text_and_figure,
    threshold_slider,
)
from engine.registry import ModelCard

EARLY_EXIT_TEXT = (
    "A deep network is a stack of layers, and every input normally goes through all of them. "
    "**Early exit** adds small classifiers (*exits*) after some of the layers. An input stops "
    "at the first exit that is confident enough — its top class probability reaches a "
    "*threshold* — and skips the rest. Clean, easy digits stop early; odd ones go deeper. The "
    "price: a confident exit can still be wrong, so a lower threshold saves compute and loses "
    "some accuracy. The **oracle** knows the answer and stops every input at the first exit "
    "that gets it right (inputs that no exit gets right are charged at the first exit): no "
    "real policy can do better. A threshold is not the only way to decide: JEI-DNN trains a "
    "small *gate* per exit together with the exit's classifier, weighing the expected error "
    "against the compute, and the tuning page runs such gates beside the thresholds. A third "
    "option is to go on in cheaper **int8** arithmetic: QuEE learns, per exit, how much accuracy "
    "going on in float32 or in int8 would buy, and picks exit, int8 or float32 within a compute "
    "budget (page *Exit or continue in int8*)."
)
EARLY_EXIT_PAPER = (
    "BranchyNet (Teerapittayanon et al., 2016); Shallow-Deep Networks (Kaya et al., 2019): "
    "more than 50% of the average inference cost saved at preserved accuracy on CIFAR-10/100 "
    "and Tiny ImageNet."
)


def early_exit(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    left, right = text_and_figure(ctx, EARLY_EXIT_TEXT, EARLY_EXIT_PAPER)
    with right:
        t = threshold_slider()
    with left:
        s = data.policy_stats(card.model_id, "max_prob", t)
        last = data.policy_stats(card.model_id, "fixed", trace.num_exits - 1)
        oracle = data.oracle_stats(card.model_id)
        st.markdown(
            f"At threshold **{t:.3f}**: **{pct(s.accuracy, 1)}** correct with "
            f"**{pct(s.cost_fraction)}** of the compute; "
            f"{pct(s.exit_fraction[0])} of the test digits stop at the first exit. "
            f"The whole network: {pct(last.accuracy, 1)}. "
            f"The oracle: {pct(oracle.accuracy, 1)} with {pct(oracle.cost_fraction)}."
        )
        deeper(
            "pages/tuning.py",
            "Go deeper: tune the threshold on the whole test set",
            {"model": card.model_id, "policy": "max_prob", "t": t},
        )
    with right:
        cost_frac, acc = data.curve_points(card.model_id, "max_prob")
        fig = ft.tradeoff_chart(
            {"every threshold": (cost_frac, acc)},
            {
                f"threshold {t:.3f}": (s.cost_fraction, s.accuracy, exit_color(1)),
                "oracle": (oracle.cost_fraction, oracle.accuracy, CORRECT),
                "whole network": (1.0, last.accuracy, "black"),
            },
            height=ctx.fig_height,
            present=ctx.present,
        )
        show_figure(fig, "tour.fig.early_exit")


CHAPTER = Chapter(
    "early-exit",
    "Early exit: stop when confident",
    "the multi-exit CNN",
    data.exit_card,
    early_exit,
    order=10,
)
