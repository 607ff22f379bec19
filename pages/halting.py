"""Halting: every model of the "halt" kind (ACT, PonderNet, ...) through the Family interface.

Which steps ran, how many steps each input took at the chosen setting, whether harder inputs
get more steps, and the accuracy-compute curves of every halting model on the same data set
side by side. Nothing here names a family: a new halting family appears by itself.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_dynamic as figs
from app import loaders, navigation, palette, widgets
from app.query import choice_param, float_param
from engine.core import costs, stats
from engine.core.results import at, summary_table
from engine.data import photo

PREFERRED = "parity_act"  # the clean difficulty (string length) makes the best first view


def show_run(run, key: str) -> None:
    st.plotly_chart(
        figs.halting_curve(
            run.steps,
            run.detail["cumulative"],
            run.detail["halt_at"],
            1 - run.detail["threshold"],
            run.detail.get("names"),
        ),
        width="stretch",
        key=key,
    )


def live_panel(card, fam, x, value: float, names: list[str], show_input) -> None:
    """Run one input for real (the steps after halting are never computed)."""
    run = fam.run_one(loaders.load_model(card.model_id), card, x, value)
    left, right = st.columns([1, 2])
    with left:
        show_input()
        st.markdown(
            f"answer **{names[run.prediction]}** (confidence {run.confidence:.3f})  \n"
            f"{run.decision}, FLOPs **{run.cost:,.0f}** (counted by torch on what ran)"
        )
    with right:
        show_run(run, "halt_live_fig")
    st.caption(
        "No bars after the halting step: this run halted there and never computed those steps."
    )


def upload_panel(card, fam, value: float, names: list[str]) -> None:
    up = st.file_uploader(
        "Ponder your own image (PNG, JPEG, …; up to 10 MB)", key="act_upload", max_upload_size=10
    )
    if up is None:
        return
    try:
        prep = photo.prepare_image(up.getvalue(), card.dataset, up.name)
    except photo.ImageInputError as e:
        st.error(f"This file cannot be used: {e}")
        return
    except Exception as e:  # a decoder bug must not take the page down
        st.error(f"This file cannot be used: {up.name} could not be decoded ({type(e).__name__})")
        return
    live_panel(
        card,
        fam,
        prep.model_input,
        value,
        names,
        lambda: st.image(
            [prep.original, prep.model_input],
            caption=["before: as uploaded", "after: what the model sees (28×28)"],
            width=140,
        ),
    )


def typed_panel(card, fam, value: float, names: list[str]) -> None:
    n = int(card.config.get("num_bits", 12))
    text = st.text_input(
        f"Ponder your own string: {n} entries of +, - or 0",
        key="act_bits",
        placeholder="+-0" * (n // 3) + "+" * (n % 3),
    )
    if not text.strip():
        return
    try:
        x = fam.parse_live(card, text)
    except ValueError as e:
        st.error(f"This string cannot be used: {e}.")
        return
    ones = int((x == 1).sum())
    live_panel(
        card,
        fam,
        x,
        value,
        names,
        lambda: st.markdown(
            f"length **{int((x != 0).sum())}**, number of +1: **{ones}** → target "
            f"**{names[ones % 2]}**"
        ),
    )


navigation.require_router()  # first: a deep link may have run this page alone
st.title("Halting: adaptive computation time")
models = loaders.halting_models()
if not models:
    st.error(
        "The halting records are missing: none is bundled. Train a model with `python -m engine.train act` "
        "(parity) or `python -m engine.train act_cnn` (images) to create them."
    )
    st.stop()
default = PREFERRED if PREFERRED in models else models[0]
model_id = st.selectbox(
    "Halting model",
    models,
    index=models.index(choice_param("model", default, models)),
    key="act_model",
)
card, fam = loaders.family_of(model_id)
st.caption(
    f"**{fam.title}** — {fam.paper}. {fam.about} This page shows whether harder inputs "
    "get more steps."
)
try:
    res = loaders.results(model_id)
except Exception as e:  # a missing or damaged file must not show a stack trace
    st.error(f"The halting records of {model_id} cannot be read ({e}); retrain the model.")
    st.stop()

settings = [float(s) for s in res.settings]
trained = fam.default_setting(card)
start = float_param(fam.setting, trained, options=settings)
value = st.select_slider(
    fam.setting_help or fam.setting,
    options=settings,
    value=min(settings, key=lambda s: abs(s - start)),
    format_func=lambda s: f"{s:g}",
    key=f"halt_{fam.setting}",
    help=f"{model_id} was trained at {fam.setting} = {trained:g}.",
)
others = loaders.siblings(model_id)
profiles = {m: loaders.time_profile(m) for m in others}
unit = widgets.cost_axis(list(profiles.values()))
timed = unit != costs.FLOPS


def on_axis(mid: str, results):
    """The model's results with their cost in the chosen unit: FLOPs as counted on the steps
    that ran, or the measured ms of a real run per setting."""
    p = profiles[mid]
    return loaders.results_on_axis(widgets.axis_key(mid, unit, p), unit, results, p)


r = at(res, value)
steps = r.detail["steps"]
names = card.raw.get("class_names") or [str(c) for c in range(int(res.label.max()) + 1)]
difficulty = res.extra.get("difficulty")
rho = stats.spearman(steps, difficulty) if difficulty is not None else float("nan")
max_steps = int(res.meta.get("max_steps", steps.max()))
mean_cost = float(on_axis(model_id, res).mean_cost[res.index_of(value)])
cols = st.columns(4 + len(r.detail) - 1)
cols[0].metric("Accuracy", f"{r.accuracy:.2%}")
cols[1].metric(
    f"Mean {unit} per input",
    costs.fmt_cost(mean_cost, unit),
    help="measured on this machine" if timed else "counted by torch on the steps that ran",
)
cols[2].metric("Mean steps", f"{steps.mean():.2f}", help=f"maximum {max_steps}")
for c, (k, v) in zip(
    cols[3:-1], ((k, v) for k, v in r.detail.items() if k != "steps"), strict=False
):
    c.metric(f"Mean {k}", f"{v.mean():.3f}")
cols[-1].metric(
    "Spearman(steps, difficulty)",
    "n/a" if np.isnan(rho) else f"{rho:.3f}",
    help=f"rank correlation between steps taken and {res.meta.get('difficulty', 'difficulty')}",
)

st.subheader("One input")
pick, show = st.columns([1, 3])
order = pick.radio(
    "Browse",
    ["test order", "most steps first", "fewest steps first"],
    key="act_order",
    help="Sort the test set by the steps taken at this setting.",
)
rows = np.arange(res.num_samples)
if order != "test order":
    rows = np.argsort(-steps if order == "most steps first" else steps, kind="stable")
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
run = loaders.record(model_id, i, value)
with show:
    left, right = st.columns([1, 2])
    with left:
        if "bits" in res.extra:
            st.code(res.extra["bits"][i], language=None)
        elif "image_index" in res.extra:
            img = loaders.test_image(card.dataset, res.extra["image_index"][i])
            if img is not None:
                st.image(img, width=140, caption=f"test image {res.extra['image_index'][i]}")
            else:
                st.info("The test images are not installed here; showing the stored record only.")
        what = f"label **{names[res.label[i]]}**"
        if difficulty is not None:
            what += f", {res.meta.get('difficulty', 'difficulty')}: **{difficulty[i]}**"
        ok = "correct" if r.correct[i] else "wrong"
        st.markdown(
            f"{what}  \nanswer **{names[run.prediction]}** ({ok}), confidence "
            f"{run.confidence:.3f}  \n{run.decision}"
        )
    with right:
        show_run(run, "halt_record_fig")
        st.caption(
            "Grey bars: the steps after the halting step. Real halting at this setting stops "
            "there and never computes them; they are the stored scores of the full unroll (all "
            "steps, run once for the test set), shown so you can see where another setting "
            "would stop."
        )

if fam.live_input(card) == "image":
    upload_panel(card, fam, value, names)
elif fam.live_input(card) == "bits":
    typed_panel(card, fam, value, names)

st.subheader("The whole test set")
a, b = st.columns(2)
a.plotly_chart(figs.steps_histogram(steps, max_steps), width="stretch")
if difficulty is not None:
    levels, mean, std, acc, count = stats.by_level(difficulty, steps, r.correct)
    b.plotly_chart(
        figs.steps_vs_difficulty(
            levels, mean, std, acc, x_title=res.meta.get("difficulty") or "difficulty"
        ),
        width="stretch",
    )
    b.caption(
        "Inputs per difficulty level: "
        + ", ".join(f"{lv}: {n}" for lv, n in zip(levels, count, strict=True))
    )
else:
    b.info("These records carry no difficulty rating.")
classes, mean_c, _, acc_c, _ = stats.by_level(res.label, steps, r.correct)
st.plotly_chart(figs.steps_by_class([names[c] for c in classes], mean_c, acc_c), width="stretch")

st.subheader("Accuracy vs compute: every halting model on this data set")
curves, table_rows = [], []
for k, other in enumerate(others):
    o_card, o_fam = loaders.family_of(other)
    o = loaders.results(other)
    o_cost, o_steps = on_axis(other, o).mean_cost, o.detail["steps"].mean(axis=1)
    tag = o.meta.get("trained_with") or ""
    label = f"{o_fam.title} {tag}".strip() + (" (this model)" if other == model_id else "")
    curves.append(
        figs.CurveSpec(
            label,
            o_cost,
            o.accuracy,
            palette.exit_color(k),
            labels=[
                f"{other}, {o.setting} = {s:g}<br>mean {costs.fmt_cost(c, unit)}, "
                f"mean steps {n:.2f}"
                for s, c, n in zip(o.settings, o_cost, o_steps, strict=True)
            ],
        )
    )
    table_rows.append((o, value if other == model_id else o_fam.default_setting(o_card)))
st.plotly_chart(
    figs.tradeoff_figure(
        curves,
        current=(mean_cost, r.accuracy),
        x_title=f"mean {unit} per input",
        title=f"Accuracy vs mean {'time' if timed else 'FLOPs'} (a curve per model, a point "
        "per setting; hover for its mean steps)",
    ),
    width="stretch",
)
if len(others) > 1:
    st.caption(
        "Each model at its trained setting (this one at the slider's). Different ponder costs "
        "or halting rules trade accuracy for compute differently."
    )
    st.dataframe(summary_table(table_rows), hide_index=True)
st.caption(
    "FLOPs are counted by torch on the steps that ran; every setting is evaluated from one "
    "stored unroll of the test set, and the live runs above really stop."
)
