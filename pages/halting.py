"""Adaptive computation time (Graves 2016): halting scores, steps taken and the eps trade-off."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_dynamic as figs
from app import loaders, navigation, palette
from app.query import choice_param, float_param
from engine import halting

DEFAULT_MODEL = "parity_act"
INTRO = {
    "bits": "Parity, as in the ACT paper: a bit string with a random number of ±1 entries; the "
    "answer is whether the number of +1 is odd. Longer strings (more non-zero entries) are "
    "harder.",
    "image": "Images: one weight-shared residual conv block is applied again and again to the "
    "same image. Each step sees a wider neighbourhood, so an unusual digit may need more "
    "steps. Difficulty is rated by a second model on the same test images: the first exit "
    "of the early-exit CNN that gets the image right.",
}


@st.cache_data(show_spinner=False)
def records(model_id: str) -> halting.HaltRecords:
    return halting.load_records(model_id)


@st.cache_data(show_spinner=False)
def sweep(model_id: str) -> halting.EpsSweep:
    return halting.eps_sweep(records(model_id))


@st.cache_data(show_spinner=False)
def at_eps(model_id: str, eps: float) -> halting.AtEps:
    return halting.at_eps(records(model_id), eps)


@st.cache_resource(show_spinner=False)
def model(model_id: str):
    from engine.registry import load_model

    return load_model(model_id)


@st.cache_data(show_spinner=False)
def siblings(model_id: str) -> list[str]:
    return halting.siblings(model_id)


@st.cache_data(show_spinner=False)
def tau_table(models: tuple[str, ...]):
    return halting.tau_table([records(m) for m in models])


def one_input_text(rec: halting.HaltRecords, r: halting.AtEps, i: int, names: list[str]) -> str:
    ok = r.pred[i] == rec.label[i]
    what = (
        f"length (non-zero entries): **{rec.difficulty[i]}**  \n"
        f"number of +1: **{rec.bits[i].count('+')}** → target **{names[rec.label[i]]}**  \n"
        if rec.bits is not None
        else f"label **{names[rec.label[i]]}**, difficulty (early-exit oracle exit): "
        f"**{rec.difficulty[i]}**  \n"
    )
    return (
        f"{what}answer **{names[r.pred[i]]}** ({'correct' if ok else 'wrong'}), "
        f"confidence {r.probs[i].max():.3f}"
    )


def live_panel(model_id: str, x: np.ndarray, eps: float, names: list[str], show_input) -> None:
    """Ponder one input live (real halting: the steps after N are never computed)."""
    from engine.models import act

    out = act.run_act(model(model_id), x, eps=eps)
    steps, rem = int(out["steps"][0]), float(out["remainder"][0])
    left, right = st.columns([1, 2])
    with left:
        show_input()
        st.markdown(
            f"answer **{names[int(out['pred'][0])]}** (confidence {out['probs'][0].max():.3f})  \n"
            f"steps N = **{steps}**, remainder R = **{rem:.3f}**, "
            f"FLOPs **{out['flops'][0]:,.0f}** (counted by torch on the steps that ran)"
        )
    h = np.nan_to_num(out["h"][0], nan=0.0)
    right.plotly_chart(
        figs.halting_curve(h, out["cum_halt"][0], steps, eps), width="stretch", key="act_live_fig"
    )
    st.caption("Bars after N are 0: those steps were not computed for this input.")


def upload_panel(model_id: str, dataset: str, eps: float, names: list[str]) -> None:
    from engine import inspection
    from engine.data.images import to_model_input

    up = st.file_uploader(
        "Ponder your own image (PNG, JPEG, …; up to 10 MB)",
        key="act_upload",
        max_upload_size=10,
    )
    if up is None:
        return
    try:
        prep = inspection.prepare_image(up.getvalue(), dataset, up.name)
    except inspection.ImageInputError as e:
        st.error(f"This file cannot be used: {e}")
        return
    except Exception as e:  # a decoder bug must not take the page down
        st.error(f"This file cannot be used: {up.name} could not be decoded ({type(e).__name__})")
        return
    live_panel(
        model_id,
        to_model_input(prep.model_input).numpy(),
        eps,
        names,
        lambda: st.image(prep.model_input, caption="what the model sees (28×28)", width=140),
    )


def bits_panel(model_id: str, num_bits: int, eps: float, names: list[str]) -> None:
    from engine.models import act

    text = st.text_input(
        f"Ponder your own string: {num_bits} entries of +, - or 0",
        key="act_bits",
        placeholder="+-0" * (num_bits // 3) + "+" * (num_bits % 3),
    )
    if not text.strip():
        return
    try:
        x = act.parse_bits(text, num_bits)
    except ValueError as e:
        st.error(f"This string cannot be used: {e}.")
        return
    ones = int((x == 1).sum())
    live_panel(
        model_id,
        x,
        eps,
        names,
        lambda: st.markdown(
            f"length **{int((x != 0).sum())}**, number of +1: **{ones}** → target "
            f"**{names[ones % 2]}**"
        ),
    )


navigation.require_router()  # first: a deep link may have run this page alone
st.title("Halting: adaptive computation time")
st.caption(
    "Graves' ACT (2016): a network is applied again and again to the same input; after each "
    "ponder step n a halting unit outputs h^n. It stops at the first step N where the "
    "cumulative halting reaches 1 − ε (or at the maximum), the last step gets the *remainder* "
    "R = 1 − Σ_{n<N} h^n, and the answer is the mix Σ p^n y^n. Training adds τ·(N + R), the "
    "ponder cost. This page shows whether harder inputs get more steps."
)

models = halting.available_models()
if not models:
    st.error(
        "The halting records are missing: none is bundled. Train a model with `python -m engine.train act_cnn` "
        "(images) or `python -m engine.train act` (parity) to create them."
    )
    st.stop()
model_id = st.selectbox(
    "ACT model",
    models,
    index=models.index(
        choice_param("model", DEFAULT_MODEL if DEFAULT_MODEL in models else models[0], models)
    ),
    key="act_model",
)
try:
    rec = records(model_id)
except Exception as e:  # a missing or damaged file must not show a stack trace
    st.error(f"The halting records of {model_id} cannot be read ({e}); retrain the model.")
    st.stop()
kind = rec.meta.get("input", "bits")
st.caption(INTRO.get(kind, ""))

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
r = at_eps(model_id, eps)
names = rec.meta.get("class_names") or [str(c) for c in range(rec.step_probs.shape[2])]
rho = halting.spearman(r.steps, rec.difficulty) if rec.has_difficulty else float("nan")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Accuracy", f"{r.accuracy:.2%}")
c2.metric("Mean ponder steps", f"{r.steps.mean():.2f}", help=f"maximum {rec.max_steps}")
c3.metric("Mean ponder cost N + R", f"{r.ponder_cost.mean():.3f}")
c4.metric(
    "Spearman(steps, difficulty)",
    "n/a" if np.isnan(rho) else f"{rho:.3f}",
    help=f"rank correlation between steps taken and {rec.meta.get('difficulty', 'difficulty')}",
)

st.subheader("One input")
pick, show = st.columns([1, 3])
order = pick.radio(
    "Browse",
    ["test order", "most steps first", "fewest steps first"],
    key="act_order",
    help="Sort the test set by the steps taken at this ε.",
)
rows = np.arange(len(rec.label))
if order != "test order":
    rows = np.argsort(-r.steps if order == "most steps first" else r.steps, kind="stable")
pos = int(
    pick.number_input(
        f"Position (0 – {len(rows) - 1})",
        min_value=0,
        max_value=len(rows) - 1,
        value=0,
        step=1,
        key="act_sample",
    )
)
i = int(rows[pos])
cum, steps_i, rem_i = halting.cumulative_halting(rec, i, eps)
with show:
    left, right = st.columns([1, 2])
    with left:
        if rec.bits is not None:
            st.code(rec.bits[i], language=None)
        else:
            img = loaders.test_image(rec.meta.get("dataset", "mnist"), rec.image_index[i])
            if img is not None:
                st.image(img, width=140, caption=f"test image {rec.image_index[i]}")
            else:
                st.info("The test images are not installed here; showing the stored record only.")
        st.markdown(
            one_input_text(rec, r, i, names)
            + f"  \nsteps N = **{steps_i}**, remainder R = **{rem_i:.3f}**, ponder cost = "
            f"**{steps_i + rem_i:.3f}**"
        )
    right.plotly_chart(figs.halting_curve(rec.h[i], cum, steps_i, eps), width="stretch")

if kind == "image":
    upload_panel(model_id, rec.meta.get("dataset", "mnist"), eps, names)
elif rec.bits is not None:
    bits_panel(model_id, len(rec.bits[0]), eps, names)

st.subheader("The whole test set")
a, b = st.columns(2)
a.plotly_chart(figs.steps_histogram(r.steps, rec.max_steps), width="stretch")
if rec.has_difficulty:
    levels, mean, std, acc, count = halting.steps_by_difficulty(rec.difficulty, r.steps, r.correct)
    b.plotly_chart(
        figs.steps_vs_difficulty(
            levels, mean, std, acc, x_title=rec.meta.get("difficulty_label", "difficulty")
        ),
        width="stretch",
    )
    own = halting.spearman(r.steps, 1.0 - rec.step_probs[:, 0].max(1))
    b.caption(
        "Inputs per difficulty level: "
        + ", ".join(f"{lv}: {n}" for lv, n in zip(levels, count, strict=True))
        + f". For comparison, steps against the model's *own* uncertainty after its first "
        f"step (1 − its top probability): Spearman {own:.2f}."
    )
else:
    b.info("These records carry no difficulty rating.")
classes, mean_c, acc_c = halting.steps_by_class(rec, r.steps, r.correct)
st.plotly_chart(figs.steps_by_class([names[c] for c in classes], mean_c, acc_c), width="stretch")

st.subheader("Accuracy vs compute over ε, and over the ponder cost τ")
family = siblings(model_id)
curves = []
for k, other in enumerate(family):
    o_sw, o_tau = sweep(other), records(other).meta.get("tau")
    tau_txt = "τ = ?" if o_tau is None else f"τ = {o_tau:g}"
    curves.append(
        figs.CurveSpec(
            tau_txt + (" (this model)" if other == model_id else ""),
            o_sw.mean_steps,
            o_sw.accuracy,
            palette.exit_color(k),
            labels=[f"{tau_txt}, ε = {e:g}" for e in o_sw.eps],
        )
    )
st.plotly_chart(
    figs.tradeoff_figure(
        curves,
        current=(float(r.steps.mean()), r.accuracy),
        x_title="mean ponder steps per input",
        title="Accuracy vs mean ponder steps (a curve per τ, a point per ε)",
    ),
    width="stretch",
)
if len(family) > 1:
    st.caption(
        "The same network trained with different ponder-cost weights τ (`--ponder-cost`), each "
        "at its trained ε. A larger τ pushes the halting units to stop sooner during training."
    )
    st.dataframe(tau_table(tuple(family)), hide_index=True)
encode = float(rec.meta.get("encode_flops", 0.0))
st.caption(
    f"One ponder step costs {rec.meta.get('flops_per_step', float('nan')):,.0f} FLOPs"
    + (f", and the part that runs once {encode:,.0f}" if encode else "")
    + " (counted by torch). The halting scores do not depend on ε, so every ε is evaluated "
    "from one stored unroll of the test set."
)
