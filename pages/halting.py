"""Adaptive computation time (Graves 2016): halting scores, steps taken and the eps trade-off."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_dynamic as figs
from app import palette
from app.query import float_param
from engine import halting

MODEL_ID = "parity_act"


@st.cache_data(show_spinner=False)
def records(model_id: str) -> halting.HaltRecords:
    return halting.load_records(model_id)


@st.cache_data(show_spinner=False)
def sweep(model_id: str) -> halting.EpsSweep:
    return halting.eps_sweep(records(model_id))


@st.cache_data(show_spinner=False)
def at_eps(model_id: str, eps: float) -> halting.AtEps:
    return halting.at_eps(records(model_id), eps)


st.title("Halting: adaptive computation time")
st.caption(
    "Graves' ACT (2016) on parity: a recurrent cell is applied again and again to the same bit "
    "string; after each ponder step n a halting unit outputs h^n. The network stops at the "
    "first step N where the cumulative halting reaches 1 − ε (or at the maximum), the last "
    "step gets the *remainder* R = 1 − Σ_{n<N} h^n, and the answer is the mix Σ p^n y^n. "
    "Training adds τ·(N + R), the ponder cost. Harder strings (more non-zero entries) may need "
    "more steps; this page shows whether they get them."
)

try:
    rec = records(MODEL_ID)
except FileNotFoundError as e:
    st.error(
        f"The halting records are missing ({e}). Train the model with "
        "`python -m engine.train act` to create them."
    )
    st.stop()

trained_eps = rec.eps
eps = st.slider(
    "ε (halt when the cumulative halting score ≥ 1 − ε)",
    min_value=0.0,
    max_value=0.5,
    value=round(float_param("eps", float(trained_eps), lo=0.0, hi=0.5), 2),
    step=0.01,
    key="act_eps",
    help=f"The model was trained with ε = {trained_eps:g} and ponder-cost weight "
    f"τ = {rec.meta.get('tau', 'see the model card')}.",
)
r = at_eps(MODEL_ID, eps)
rho = halting.spearman(r.steps, rec.length)
c1, c2, c3, c4 = st.columns(4)
c1.metric("Accuracy", f"{r.accuracy:.2%}")
c2.metric("Mean ponder steps", f"{r.steps.mean():.2f}", help=f"maximum {rec.max_steps}")
c3.metric("Mean ponder cost N + R", f"{r.ponder_cost.mean():.3f}")
c4.metric(
    "Spearman(steps, length)",
    "n/a" if np.isnan(rho) else f"{rho:.3f}",
    help="rank correlation between steps taken and the string's number of non-zero entries",
)

st.subheader("One input")
i = int(
    st.number_input(
        f"Test string (0 – {len(rec.label) - 1})",
        min_value=0,
        max_value=len(rec.label) - 1,
        value=0,
        step=1,
        key="act_sample",
    )
)
cum, steps_i, rem_i = halting.cumulative_halting(rec, i, eps)
left, right = st.columns([1, 2])
with left:
    st.code(rec.bits[i], language=None)
    names = rec.meta.get("class_names", ["even", "odd"])
    ok = r.pred[i] == rec.label[i]
    st.markdown(
        f"length (non-zero entries): **{rec.length[i]}**  \n"
        f"number of +1: **{rec.bits[i].count('+')}** → target **{names[rec.label[i]]}**  \n"
        f"answer **{names[r.pred[i]]}** ({'correct' if ok else 'wrong'}), "
        f"P(odd) = {r.probs[i, 1]:.3f}  \n"
        f"steps N = **{steps_i}**, remainder R = **{rem_i:.3f}**, ponder cost = "
        f"**{steps_i + rem_i:.3f}**"
    )
with right:
    st.plotly_chart(figs.halting_curve(rec.h[i], cum, steps_i, eps), width="stretch")

st.subheader("The whole test set")
a, b = st.columns(2)
a.plotly_chart(figs.steps_histogram(r.steps, rec.max_steps), width="stretch")
lengths, mean, std, acc, _ = halting.steps_by_difficulty(rec, r.steps, r.correct)
b.plotly_chart(figs.steps_vs_difficulty(lengths, mean, std, acc), width="stretch")

st.subheader("Accuracy vs compute over ε")
sw = sweep(MODEL_ID)
st.plotly_chart(
    figs.tradeoff_figure(
        [
            figs.CurveSpec(
                "ACT, ε swept",
                sw.mean_steps,
                sw.accuracy,
                palette.exit_color(0),
                labels=[f"ε = {e:g}" for e in sw.eps],
            )
        ],
        current=(float(r.steps.mean()), r.accuracy),
        x_title="mean ponder steps per input",
        title="Accuracy vs mean ponder steps (one point per ε)",
    ),
    width="stretch",
)
st.caption(
    f"One ponder step costs {rec.meta.get('flops_per_step', float('nan')):,.0f} FLOPs "
    "(counted by torch). The halting scores do not depend on ε, so every ε is evaluated from "
    "one stored unroll of the test set."
)
