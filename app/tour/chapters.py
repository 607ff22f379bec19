"""The tour's chapters, in order: one per family of dynamic networks, each with a plain
explanation, the defining paper and its headline result (shared/FIELD.md), one live control on
a bundled model, one figure, and a "go deeper" link into the full page with the same setting.

A chapter whose model is not bundled says so in one line and shows nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import streamlit as st

from app import figures_tour as ft
from app.palette import CORRECT, exit_color
from app.tour import data
from engine.registry import ModelCard

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_T = 0.9
T_KEY = "tour.threshold"  # the threshold the student chose, kept across chapters


@dataclass(frozen=True)
class Ctx:
    present: bool
    fig_height: int


@dataclass(frozen=True)
class Chapter:
    key: str
    title: str
    needs: str  # "the X model", for the "not bundled yet" line
    find: Callable[[], ModelCard | None]
    body: Callable[[Ctx, ModelCard], None]

    def show(self, ctx: Ctx) -> None:
        st.header(self.title, anchor=False)
        card = self.find()
        if card is None:
            st.info(f"This chapter needs {self.needs}, which is not bundled yet.")
            return
        self.body(ctx, card)


# --- shared pieces -------------------------------------------------------------------------


def text_and_figure(ctx: Ctx, explain: str, paper: str):
    """Left: the explanation and the paper; right: the figure. Returns (left, right)."""
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown(explain)
        st.caption(paper)
    return left, right


def deeper(page: str, label: str, params: dict) -> None:
    """A link that opens the full page with the same model and setting (query parameters)."""
    if not (ROOT / page).exists():
        st.caption(f"({label}: that page is not in the app yet.)")
        return
    params = {k: str(v) for k, v in params.items()}
    try:
        st.page_link(page, label=label, icon=":material/open_in_new:", query_params=params)
    except Exception:  # the page is not registered (the tour run on its own, outside the router)
        st.markdown(f"[{label}](/{Path(page).stem}?{urlencode(params)})")


def threshold_slider(label: str = "Confidence threshold") -> float:
    """The one control of the early-exit chapters; remembered across chapters."""

    def keep():
        st.session_state[T_KEY] = st.session_state["tour.w.t"]

    return st.slider(
        label,
        min_value=0.5,
        max_value=1.0,
        value=float(st.session_state.get(T_KEY, DEFAULT_T)),
        step=0.005,
        format="%.3f",
        key="tour.w.t",
        on_change=keep,
        help="An input stops at the first exit whose top class probability reaches this.",
    )


def current_threshold() -> float:
    return float(st.session_state.get(T_KEY, DEFAULT_T))


def show_figure(fig, key: str) -> None:
    """Every tour figure: the palette's colours and the figure's own fonts (no theme)."""
    st.plotly_chart(fig, key=key, theme=None, config={"displayModeBar": False})


def pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%"


# --- early exit ------------------------------------------------------------------------------

EARLY_EXIT_TEXT = (
    "A deep network is a stack of layers, and every input normally goes through all of them. "
    "**Early exit** adds small classifiers (*exits*) after some of the layers. An input stops "
    "at the first exit that is confident enough — its top class probability reaches a "
    "*threshold* — and skips the rest. Clean, easy digits stop early; odd ones go deeper. The "
    "price: a confident exit can still be wrong, so a lower threshold saves compute and loses "
    "some accuracy. The **oracle** knows the answer and stops every input at the first exit "
    "that gets it right: no real policy can do better."
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


# --- draw a digit ----------------------------------------------------------------------------


def draw_a_digit(ctx: Ctx, card: ModelCard) -> None:
    from app.tour.draw import draw_chapter

    draw_chapter(ctx, card)


# --- guess first -----------------------------------------------------------------------------

QUIZ_Q = "tour.quiz.q"
QUIZ_ANSWERS = "tour.quiz.answers"
QUIZ_SAMPLE = "tour.quiz.sample"  # trace row of the current question (read by the tests)


def _next_question() -> None:
    st.session_state[QUIZ_Q] = st.session_state.get(QUIZ_Q, 0) + 1


def guess_first(ctx: Ctx, card: ModelCard) -> None:
    from app.tour.quiz import question_sample, record, score

    trace = data.get_trace(card.model_id)
    t = current_threshold()
    exits = data.exits_at(card.model_id, t)
    q = st.session_state.get(QUIZ_Q, 0)
    answers = st.session_state.setdefault(QUIZ_ANSWERS, {})
    row = question_sample(exits, q)
    st.session_state[QUIZ_SAMPLE] = row
    truth = int(exits[row])
    names = list(trace.meta.exit_names)
    imgs = data.sample_images(card, trace, np.array([row]))

    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown(
            f"Look at the digit. The network stops at the first of its {len(names)} exits whose "
            f"confidence reaches **{t:.3f}**. **Where will this one stop?** Guess first, then "
            "see the answer."
        )
        guess = st.radio(
            "Your guess",
            names,
            index=None,
            horizontal=True,
            key=f"tour.w.quiz.{q}",
        )
        if guess is not None:
            right_now = record(answers, q, names.index(guess), truth)
            first_guess = names[answers[q][0]]
            verdict = "Right!" if right_now else f"Not quite (you said {first_guess})."
            label = trace.meta.class_names[trace.label[row]]
            said = trace.meta.class_names[trace.pred[row, truth]]
            st.markdown(
                f"**{verdict}** It stops at **{names[truth]}** and answers **{said}** "
                f"(the true label is {label})."
            )
        got, asked = score(answers)
        st.metric("Your score this session", f"{got} / {asked}")
        st.button("Next image →", key="tour.quiz.next", on_click=_next_question)
    with right:
        img_col, fig_col = st.columns([1, 2])
        with img_col:
            if imgs is not None:
                st.plotly_chart(
                    ft.digit_image(imgs[0], height=240),
                    key="tour.fig.quiz_img",
                    config={"displayModeBar": False, "staticPlot": True},
                )
            else:
                st.caption(f"Test image #{trace.sample_id[row]} (data set not installed).")
        with fig_col:
            if guess is not None:
                fig = ft.exit_ladder(
                    trace.probs[row],
                    trace.cost[row],
                    truth,
                    t,
                    names,
                    trace.meta.class_names,
                    height=ctx.fig_height,
                    present=ctx.present,
                )
                show_figure(fig, "tour.fig.quiz")


# --- overthinking ----------------------------------------------------------------------------

OVER_PAGE = "tour.over.page"
OVER_PER_PAGE = 3


def _more_overthinking() -> None:
    st.session_state[OVER_PAGE] = st.session_state.get(OVER_PAGE, 0) + 1


def overthinking(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    rows = data.overthinking_rows(card.model_id)
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
        page = st.session_state.get(OVER_PAGE, 0)
        start = (page * OVER_PER_PAGE) % len(rows)
        pick = np.take(rows, range(start, start + min(OVER_PER_PAGE, len(rows))), mode="wrap")
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


# --- patience --------------------------------------------------------------------------------


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


# --- the registry of chapters ----------------------------------------------------------------


def _pending(ctx: Ctx, card: ModelCard) -> None:  # replaced as each family lands
    st.info(f"The {card.title} chapter is being written.")


def _none() -> None:
    return None


CHAPTERS: list[Chapter] = [
    Chapter("early-exit", "Early exit: stop when confident", "the multi-exit CNN",
            data.multi_exit_card, early_exit),
    Chapter("draw", "Draw a digit", "the multi-exit CNN", data.multi_exit_card, draw_a_digit),
    Chapter("guess", "Guess first: easy or hard?", "the multi-exit CNN",
            data.multi_exit_card, guess_first),
    Chapter("overthinking", "Overthinking", "the multi-exit CNN",
            data.multi_exit_card, overthinking),
    Chapter("patience", "Patience: stop when the answers agree", "the multi-exit CNN",
            data.multi_exit_card, patience),
    Chapter("cascade", "Cascades: small model first", "a cascade model",
            _none, _pending),
    Chapter("skipping", "Layer skipping: gates", "the layer-skipping (SkipNet) model",
            _none, _pending),
    Chapter("halting", "Adaptive computation time: halting", "the ACT model",
            _none, _pending),
    Chapter("experts", "Mixture of experts: top-k and dynamic-k", "a mixture-of-experts model",
            _none, _pending),
    Chapter("language", "Early exit per token in a language model",
            "the early-exit language model", _none, _pending),
]  # fmt: skip
