"""Layer skipping (SkipNet-style gates): per-input skip decisions and the accuracy-compute curve."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_dynamic as figs
from app import loaders, navigation, palette, widgets
from app.query import float_param
from engine.core import costs
from engine.families.skipnet import records as skipping

MODEL_ID = "mnist_skipnet"
EARLY_EXIT_BASELINE = "mnist_multi_exit_cnn"


navigation.require_router()  # first: a deep link may have run this page alone
st.title("Layer skipping")
st.caption(
    "A residual network on MNIST with a small **gate** in front of each of its 6 residual blocks "
    "(SkipNet, Wang et al. 2018). For each input the gate scores its block; the block runs when "
    "the score is at or above the **threshold**, and is skipped — not computed at all — "
    "otherwise, so a skipped block's output is its input. Gates were trained with a "
    "straight-through Gumbel-sigmoid and a compute penalty (ConvNet-AIG's relaxation). "
    "Raising the threshold skips more."
)

try:
    rec = loaders.skip_records(MODEL_ID)
except FileNotFoundError as e:
    st.error(
        f"The skip records are missing ({e}). Train the model with "
        "`python -m engine.train skipnet` to create them."
    )
    st.stop()

sw = loaders.skip_sweep(MODEL_ID)
blocks = rec.meta.get("block_names", [f"block {b + 1}" for b in range(rec.num_blocks)])
classes = rec.meta.get("class_names", [str(c) for c in range(int(rec.label.max()) + 1)])
full_flops = float(rec.meta.get("full_flops", rec.flops[0].mean()))

threshold = st.select_slider(
    "Gate threshold (a block runs when its gate score ≥ threshold)",
    options=[float(t) for t in rec.thresholds],
    value=float_param(
        "t",
        float(rec.thresholds[rec.index_of(skipping.DEFAULT_THRESHOLD)]),
        options=[float(t) for t in rec.thresholds],
    ),
    key="skip_threshold",
)
ti = rec.index_of(threshold)
s = skipping.summary(rec, ti)
profile = loaders.time_profile(MODEL_ID)
unit = widgets.cost_axis(profile)
timed = unit != costs.FLOPS
# the learned-gate curve's cost per threshold: FLOPs, or the measured time of a real run there
curve_cost = sw.mean_flops
if timed:
    curve_cost = loaders.results_on_axis(
        widgets.axis_key(MODEL_ID, unit, profile), unit, loaders.results(MODEL_ID), profile
    ).mean_cost
c1, c2, c3, c4 = st.columns(4)
c1.metric("Accuracy", f"{s['accuracy']:.2%}")
if timed:
    c2.metric(f"Mean {unit} per input", costs.fmt_cost(curve_cost[ti], unit), help="measured")
    all_on = curve_cost[int(np.argmin(sw.thresholds))]
    c3.metric("Time vs all blocks", f"{curve_cost[ti] / all_on:.1%}")
else:
    c2.metric("Mean FLOPs per input", f"{s['mean_flops'] / 1e6:.2f} M", help="counted by torch")
    c3.metric("Compute vs all blocks", f"{s['cost_fraction']:.1%}")
c4.metric("Blocks skipped", f"{s['skip_rate']:.1%}")

st.subheader("One input")
i = int(
    st.number_input(
        f"Test input (0 – {len(rec.sample_id) - 1})",
        min_value=0,
        max_value=len(rec.sample_id) - 1,
        value=0,
        step=1,
        key="skip_sample",
    )
)
left, right = st.columns([1, 3])
with left:
    sid = int(rec.sample_id[i])
    img = loaders.test_image(rec.meta.get("dataset", "mnist"), sid)
    if img is not None:
        st.image(img, width=140, caption=f"test image #{sid}")
    else:
        st.info("MNIST is not installed here, so the image is not shown (records still are).")
    ok = rec.pred[ti, i] == rec.label[i]
    st.markdown(
        f"label **{classes[rec.label[i]]}**, predicted **{classes[rec.pred[ti, i]]}** "
        f"({'correct' if ok else 'wrong'})  \n"
        f"blocks run: **{int(rec.executed[ti, i].sum())} of {rec.num_blocks}**  \n"
        f"FLOPs: **{rec.flops[ti, i] / 1e6:.2f} M** ({rec.flops[ti, i] / full_flops:.0%} of all "
        "blocks)"
    )
with right:
    st.plotly_chart(
        figs.block_strip(rec.gate[ti, i], rec.executed[ti, i], threshold, blocks),
        width="stretch",
    )

st.subheader("The whole test set")
a, b = st.columns(2)
a.plotly_chart(figs.skip_rate_bars(sw.skip_rate_block[ti], blocks), width="stretch")
b.plotly_chart(
    figs.skip_rate_heatmap(skipping.skip_rate_per_class(rec, ti), classes, blocks),
    width="stretch",
)

st.subheader("Skipping vs early exit")
st.markdown(
    "All curves but the last use **the same weights**. *Learned gates*: the threshold sweep "
    "above (per input). *Fixed skip set*: skip the k blocks with the lowest mean gate score for "
    "every input (training-free, static). *Lowest-k per input*: skip each input's own k "
    "lowest-scored blocks. *Early exit, same backbone*: every block runs and the network stops "
    "at the first block whose exit head's max probability passes a threshold. The last curve "
    "is a separately trained multi-exit CNN, for reference."
)
curves = [
    figs.CurveSpec(
        "learned gates (threshold)",
        curve_cost,
        sw.accuracy,
        palette.exit_color(0),
        labels=[f"threshold {t:g}" for t in sw.thresholds],
    )
]
try:
    if timed:
        raise LookupError
    var = loaders.skip_variants(MODEL_ID)
    for method, name, colour, dash in (
        ("fixed", "fixed skip set (static)", palette.exit_color(1), "dash"),
        ("lowest", "lowest-k gate scores per input", palette.exit_color(2), "dot"),
    ):
        v = var.filter(var["method"] == method)
        curves.append(
            figs.CurveSpec(
                name,
                v["mean_flops"].to_numpy(),
                v["accuracy"].to_numpy(),
                colour,
                dash,
                labels=[f"skip {k} blocks" for k in v["k"].to_list()],
            )
        )
except FileNotFoundError:
    st.info("The training-free variant curves are missing; retrain to create them.")
except LookupError:
    st.caption(
        f"In {unit}: the training-free variants and early exit on the same backbone are not "
        "timed (FLOPs only); the learned gates and the multi-exit CNN are measured."
    )
same = None if timed else loaders.early_exit_curve(MODEL_ID)
if same is not None:
    curves.append(
        figs.CurveSpec(
            "early exit, same backbone (max prob.)",
            same[0],
            same[1],
            palette.exit_color(3),
            labels=[f"max-prob ≥ {t:.3f}" for t in same[2]],
        )
    )
other = loaders.early_exit_curve(EARLY_EXIT_BASELINE, unit)
if other is not None:
    curves.append(
        figs.CurveSpec(
            "early exit, multi-exit CNN (other model)",
            other[0],
            other[1],
            palette.exit_color(5),
            "dashdot",
            labels=[f"max-prob ≥ {t:.3f}" for t in other[2]],
        )
    )
else:
    st.caption(
        f"The multi-exit CNN's trace ({EARLY_EXIT_BASELINE}) is not bundled yet, so it is not "
        "drawn."
    )
fig = figs.tradeoff_figure(
    curves,
    current=(curve_cost[ti], s["accuracy"]),
    x_title=f"mean {unit} per input" if timed else "mean FLOPs per input",
)
st.plotly_chart(fig, width="stretch")
with st.expander("Numbers behind the learned-gate curve"):
    st.dataframe(
        {
            "threshold": sw.thresholds,
            "accuracy": np.round(sw.accuracy, 4),
            "mean FLOPs": np.round(sw.mean_flops).astype(np.int64),
            "skip rate": np.round(sw.skip_rate, 4),
        },
        hide_index=True,
    )
