"""Guess first: the student guesses where a test digit stops, and keeps score."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_tour as ft
from app.tour import data
from app.tour.common import (
    Chapter,
    Ctx,
    current_threshold,
    show_figure,
)
from engine.registry import ModelCard

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
    pool = data.rows_with_images(card, trace)  # the whole test split, or the bundled gallery
    pool = pool if len(pool) else np.arange(trace.num_samples)
    row = int(pool[question_sample(exits[pool], q)])
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


CHAPTER = Chapter(
    "guess",
    "Guess first: easy or hard?",
    "the multi-exit CNN",
    data.exit_card,
    guess_first,
    order=30,
)
