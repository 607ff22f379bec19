"""Exit or continue in int8 (QuEE): the learned three-way choice beside the band rule,
float32-only and int8-only early exit, simulated over the bundled records and measured for real.

Everything shown comes from ``engine.core.quee`` over ``python -m engine.quee_build`` records,
through the cached loaders; the measured points are the card's real runs.
"""

from __future__ import annotations

import zipfile

import streamlit as st

from app import figures_quee as figs
from app import loaders, navigation
from app.query import choice_param, float_param

COST_MODELS = {
    "measured": "measured on this CPU (int8 time / float32 time per stage)",
    "nominal": "nominal: an int8 stage costs ¼ of its float32 FLOPs",
}

navigation.require_router()  # first: a deep link may have run this page alone
st.title("Exit or continue in int8 (QuEE)")
st.markdown(
    "At every exit a sample may **exit**, **continue in float32**, or **continue in int8** "
    "(cheaper arithmetic, a little less accurate). QuEE's crux is predicting how much "
    "accuracy further computation would buy: per exit, two small regressors read the exit's "
    "outputs and predict the gain of going on in float32 and in int8, and the choice takes "
    "the best *gain − λ·cost*, λ set so the mean cost meets the budget."
)

models = loaders.quee_models()
if not models:
    st.info("No QuEE records bundled. Build them with `python -m engine.quee_build MODEL`.")
    st.stop()

left, right = st.columns(2)
model_id = left.selectbox(
    "Model",
    models,
    index=models.index(choice_param("model", models[0], models)),
    format_func=loaders.source_label,
    key="quee_model",
)
cost_model = right.radio(
    "Cost of an int8 stage",
    list(COST_MODELS),
    index=list(COST_MODELS).index(choice_param("cost", "measured", list(COST_MODELS))),
    format_func=COST_MODELS.get,
    key="quee_cost",
)
st.query_params["model"] = model_id
st.query_params["cost"] = cost_model


def unreadable(e: Exception) -> None:
    st.error(
        f"The QuEE records of {model_id} could not be read ({e}); rebuild them with "
        f"`python -m engine.quee_build {model_id}`."
    )
    st.stop()


try:
    card = loaders.quee_card(model_id)
    curves = loaders.quee_curves(model_id, cost_model, float(card["band"]))
except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    unreadable(e)

cost = card["int8_cost"]
ratio = sum(cost["stage_ms_int8"]) / sum(cost["stage_ms_float"])
per_stage = ", ".join(f"{r:.2f}×" for r in cost["measured_ratio"])
batch = cost.get("batch", 256)
if cost["int8_cheaper_here"]:
    st.caption(
        f"Measured on this CPU (ONNX Runtime, 1 thread, batch {batch}): the int8 chain takes "
        f"{ratio:.2f}× the float32 time; per stage {per_stage}. The first stage gains least, "
        "and the learned choice never runs it in int8 (it decides at the exits). These are "
        f"batch-{batch} ratios: at batch 1 int8 is about as fast as float32, so the measured "
        "cost model holds for batched runs only."
    )
else:
    st.warning(
        f"On this CPU static int8 is **not cheaper**: the int8 stages take **{ratio:.2f}×** "
        f"the float32 time (per stage {per_stage}; ONNX Runtime, 1 thread, batch {batch}). "
        "With the measured costs the choice therefore rarely picks int8; the nominal cost "
        "model shows what it does where int8 pays."
    )

budget = st.slider(
    "Budget: mean cost, as a fraction of the float32 full model",
    min_value=0.3,
    max_value=1.0,
    value=float_param("budget", 0.5, lo=0.3, hi=1.0),
    step=0.01,
    key="quee_budget",
)
st.query_params["budget"] = f"{budget:.2f}"
try:
    lam, out = loaders.quee_at(model_id, cost_model, budget)
except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    unreadable(e)

k = out.actions.shape[1]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Accuracy (learned choice)", f"{out.accuracy:.4f}")
c2.metric("Mean cost", f"{out.mean_cost:.3f}")
c3.metric("Finished in int8", f"{(out.int8_from < k).mean():.1%}")
c4.metric("λ", f"{lam:.4g}")
st.caption(
    "λ is solved on the train records, so on these test records the mean cost can miss the "
    "budget by a little; on the train records it never exceeds it (tests/test_quee.py)."
)

real = card.get("real", {}).get("runs", []) if cost_model == "measured" else []
lo = min(float(curves["float"].accuracy.max()), float(curves["learned"].accuracy.min())) - 0.03
st.plotly_chart(
    figs.tradeoff(curves, real, (out.mean_cost, out.accuracy), lo=lo),
    width="stretch",
    key="quee_tradeoff",
)
st.caption(
    "Lines: simulated on the first "
    f"{card['data']['test'].removeprefix('test split, first ')} of the test split (λ of the "
    "learned choice solved on the train records; band rule at band "
    f"{card['band']:g}, thresholds swept). Diamonds: the same rules run for real by the "
    "runtime (batch 256), x = measured wall-clock / the float32 full model's."
)

card_ = loaders.model_card(model_id) or {}
names = card_.get("exit_names") or [f"exit {e}" for e in range(k)]
st.plotly_chart(figs.fractions(out.fractions(), names), width="stretch", key="quee_fractions")

if real:
    st.subheader("Measured for real")
    st.dataframe(
        [
            {
                "budget": r["budget"],
                "rule": figs.RULES[r["rule"]][0],
                "accuracy": r["accuracy"],
                "simulated cost": r["simulated_cost"],
                "wall-clock (ms)": r["ms"],
                "÷ float32 full": r["ms_over_full_float"],
                "decisions = simulated": f"{r['decisions_agree']:.1%}",
            }
            for r in real
        ],
        hide_index=True,
    )
    st.caption(
        f"float32 full model: {card['real']['full_float_ms']} ms for the same images "
        f"(median of {card['real']['repeats']}); built by `{card['command']}`."
    )
