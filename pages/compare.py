"""Compare dynamic-computation methods: do they agree on which inputs are hard?"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_compare as figs
from app import loaders, navigation, widgets
from engine import compare, compare_sources
from engine.core import costs

NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "parity12": "12-bit parity"}


navigation.require_router()  # first: a deep link may have run this page alone
st.title("Compare methods")
st.caption(
    "Early exit, cascades, layer skipping and dynamic-k mixture-of-experts each spend more compute "
    "on some inputs than on others. Tuned to the **same mean budget** (each as a fraction of its own "
    "full model), do they spend it on the same inputs? Rank correlations are tie-aware (Spearman, "
    "Kendall's τ-b): early exit can only spend a few distinct amounts."
)

c1, c2 = st.columns([1, 2])
dataset = c1.selectbox(
    "Data set",
    compare_sources.datasets(),
    format_func=lambda d: NAMES.get(d, d),
    key="cmp_dataset",
)
methods, oracle_sweep, missing = loaders.compare_sweeps(dataset)
for note in missing:
    st.warning(f"Not available: {note}")
if methods is None:
    st.error(
        "Fewer than two methods are bundled for this data set, so there is nothing to compare."
    )
    st.stop()
sample_id, label = methods[0].sample_id, methods[0].label
class_names = compare_sources.class_names(dataset)
profiles = [loaders.time_profile(m.meta.get("model_id", "")) for m in methods]
unit = widgets.cost_axis(profiles, c1)
timed = unit != costs.FLOPS
if timed:  # every method in ms per sample, matched to one absolute time budget
    methods = [
        loaders.results_on_axis(widgets.axis_key(m.name, unit, p), unit, m, p)
        for m, p in zip(methods, profiles, strict=True)
    ]
    lo = max(m.mean_cost.min() for m in methods)
    hi = max(m.mean_cost.max() for m in methods)
    budget = c2.slider(
        f"Mean time budget ({unit} per input, the same for every method)",
        0.0,
        float(f"{hi:.3g}"),
        float(f"{(lo + hi) / 2:.3g}"),
        float(f"{hi / 200:.2g}"),
        format="%.4f",
        key=f"cmp_budget_ms.{unit}",
        help="Every method is re-matched to the setting whose measured mean time is closest.",
    )
else:
    lo = max(m.mean_fraction.min() for m in methods)
    budget = c2.slider(
        "Mean compute budget (fraction of each full model)",
        0.0,
        1.0,
        float(np.clip(0.6, lo, 1.0)),
        0.01,
        key="cmp_budget",
        help="Every method is re-matched to the setting whose mean compute is closest to this.",
    )

matched = [compare.match_budget(s, budget, absolute=timed) for s in methods]
compute = {m.name: m.compute for m in matched}
if oracle_sweep is not None:
    compute["oracle exit"] = oracle_sweep.cost_fraction[0]
names, rho, tau = compare.rank_correlations(compute)

st.subheader(
    f"Matched at a mean budget of {costs.fmt_cost(budget, unit) if timed else f'{budget:.2f}'} on {len(sample_id):,} shared test inputs"
)
if oracle_sweep is not None:
    st.caption(
        "**oracle exit**: each input's earliest correct exit of the multi-exit CNN, as a fraction "
        "of its full cost. Inputs that no exit gets right are charged at the last exit (they "
        "needed the whole network and still failed): here the oracle ranks difficulty, and they "
        "are the hardest."
    )
st.dataframe(
    {
        "method": [m.name for m in matched],
        "setting": [f"{s.setting} = {m.param:.3g}" for s, m in zip(methods, matched, strict=True)],
        "mean compute": [round(m.mean_fraction, 3) for m in matched],
        **({f"mean {unit}": [float(f"{m.mean_cost:.4g}") for m in matched]} if timed else {}),
        "accuracy": [round(m.accuracy, 4) for m in matched],
    },
    hide_index=True,
)
far = [
    m.name
    for m in matched
    if abs((m.mean_cost if timed else m.mean_fraction) - budget) > 0.05 * (budget if timed else 1)
]
if far:
    st.info(f"Cannot reach this budget exactly: {', '.join(far)} (closest setting shown).")
st.plotly_chart(figs.budget_curves(methods, matched, unit if timed else None), key="cmp_curves")

h1, h2 = st.columns(2)
h1.plotly_chart(
    figs.correlation_heatmap(names, rho, "Spearman ρ of per-input compute"), key="cmp_rho"
)
h2.plotly_chart(
    figs.correlation_heatmap(names, tau, "Kendall τ-b of per-input compute"), key="cmp_tau"
)

pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
st.markdown(
    "**Top-10% overlap** (chance level 0.10): of the inputs one method finds hardest (or easiest), how many the other does too."
)
st.dataframe(
    {
        "pair": [f"{a} · {b}" for a, b in pairs],
        "hardest 10%": [
            round(compare.top_k_overlap(compute[a], compute[b], 0.1, True), 3) for a, b in pairs
        ],
        "easiest 10%": [
            round(compare.top_k_overlap(compute[a], compute[b], 0.1, False), 3) for a, b in pairs
        ],
    },
    hide_index=True,
)

st.subheader("Two methods, input by input")
s1, s2 = st.columns(2)
x_name = s1.selectbox("x axis", names, index=0, key="cmp_x")
y_name = s2.selectbox("y axis", names, index=1, key="cmp_y")
st.plotly_chart(
    figs.compute_scatter(
        compute[x_name], compute[y_name], x_name, y_name, sample_id, label, class_names
    ),
    key="cmp_scatter",
)

pics = loaders.compare_pictures(dataset)
bits = next((m.extra["bits"] for m in methods if "bits" in m.extra), None)
st.markdown(
    f"**Easy for {x_name}, hard for {y_name}** — and the reverse (largest rank differences)."
)
rank_x = compute[x_name].argsort().argsort() / len(sample_id)
rank_y = compute[y_name].argsort().argsort() / len(sample_id)
gap = rank_y - rank_x
for title, order in (
    (f"cheap for {x_name}, costly for {y_name}", np.argsort(-gap)),
    (f"cheap for {y_name}, costly for {x_name}", np.argsort(gap)),
):
    st.caption(title)
    if bits is not None:  # inputs that are strings (parity): show the strings
        st.code("\n".join(f"{bits[i]}  #{sample_id[i]} {class_names[label[i]]}  "
                           f"{compute[x_name][i]:.2f} / {compute[y_name][i]:.2f}"
                           for i in order[:8]), language=None)  # fmt: skip
        continue
    shown = [i for i in order[:200] if pics and int(sample_id[i]) in pics[0]][:8]
    if not shown:
        st.caption("No images of these inputs are bundled (install the data set to see them).")
        continue
    cols = st.columns(len(shown))
    for col, i in zip(cols, shown, strict=True):
        col.image(pics[0][int(sample_id[i])], width=72, clamp=True)
        col.caption(
            f"#{sample_id[i]} {class_names[label[i]]}\n{compute[x_name][i]:.2f} / {compute[y_name][i]:.2f}"
        )
if pics and pics[1]:
    st.caption(pics[1])

st.subheader("Compute per class")
means = np.array(
    [
        [
            m.compute[label == c].mean() if (label == c).any() else np.nan
            for c in range(len(class_names))
        ]
        for m in matched
    ]
)
st.plotly_chart(
    figs.per_class_compute([m.name for m in matched], class_names, means), key="cmp_class"
)

st.subheader("How much of a ReLU network is zero anyway?")
sp = loaders.compare_sparsity(dataset)
if sp is None:
    st.info(
        "Activation-sparsity records are not bundled: run `python -m engine.compare_sources build`."
    )
else:
    sp_ids, layers, zeros = sp
    st.plotly_chart(figs.sparsity_histograms(layers, zeros), key="cmp_sparsity")
    common, ia, ib = np.intersect1d(sp_ids, sample_id, return_indices=True)
    per_input = zeros[ia].mean(axis=1)
    corr = {
        n: compare.rank_correlations({"s": per_input, n: compute[n][ib]})[1][0, 1] for n in names
    }
    st.markdown(
        f"Mean exactly-zero fraction over all ReLUs: **{zeros.mean():.1%}** "
        f"({compare_sources.sparsity_model(dataset)}, {len(sp_ids):,} test inputs). "
        "Spearman ρ between an input's zero fraction and each method's compute on it: "
        + ", ".join(f"{n} {v:+.2f}" for n, v in corr.items())
    )

table = compare.per_sample_table(matched, sample_id, label)
d1, d2 = st.columns(2)
d1.download_button(
    "Per-sample table (CSV)", table.write_csv(), f"compare_{dataset}.csv", "text/csv"
)
import io  # noqa: E402

buf = io.BytesIO()
table.write_parquet(buf)
d2.download_button("Per-sample table (Parquet)", buf.getvalue(), f"compare_{dataset}.parquet")
