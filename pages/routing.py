"""Mixture of experts: live routing of one input, and data-set routing statistics."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import figures_moe as figs
from app import loaders, navigation, progress, widgets
from app.query import choice_param, float_param
from engine.core import costs
from engine.data import images as image_data
from engine.data import photo
from engine.families.moe import analysis as moe
from engine.registry import RegistryError, list_cards

NONE_LABEL = "no limit"


navigation.require_router()  # first: a deep link may have run this page alone
st.title("Mixture of experts")
st.caption(
    "A small Vision Transformer on Fashion-MNIST: each image is cut into 7×7 patches (16 "
    "tokens), and every MLP block is a layer of 8 **experts**. A **router** decides, per token "
    "and layer, which experts run — only those are computed (tokens are grouped per expert). "
    "**Top-k** (Shazeer 2017; Switch, Fedus 2021, for k=1): a softmax router picks the k most "
    "probable experts; each expert takes at most *capacity factor × tokens × k / experts* "
    "tokens of an image and **drops** the rest. **Dynamic-k** (D2DMoE, Szatkowski 2024): a "
    "router predicts each expert's output norm and the token runs every expert predicted to "
    "contribute at least **τ × the largest** — τ = 0 runs all 8 (the dense model), τ = 1 one."
)

try:
    cards = {c.model_id: c for c in list_cards(family="moe")}
except RegistryError as e:
    st.error(f"Model registry error: {e}")
    st.stop()
if not cards:
    st.error("No mixture-of-experts model is bundled. Train one: `python -m engine.train moe`.")
    st.stop()

ids = sorted(cards, key=lambda m: (cards[m].raw.get("variant") != "dynamic", m))
model_id = st.radio(
    "Model",
    ids,
    index=ids.index(choice_param("model", ids[0], ids)),
    format_func=lambda m: cards[m].title,
    horizontal=True,
    key="moe.model",
)
card = cards[model_id]
try:
    model = loaders.load_model(model_id)
except (RegistryError, RuntimeError, OSError) as e:
    st.error(f"Could not load {model_id}: {e}")
    st.stop()
cfg = model.config
dataset = card.dataset
class_names = list(card.raw.get("class_names", [str(c) for c in range(cfg.num_classes)]))
dynamic = cfg.router == "norm"

# --- routing controls --------------------------------------------------------------------
if dynamic:
    tau = st.select_slider(
        "τ — run the experts whose predicted contribution ≥ τ × the token's largest",
        options=list(moe.TAU_GRID),
        value=float_param("tau", 0.5, options=list(moe.TAU_GRID)),
        key="moe.tau",
    )
    routing = moe.routing_setting(tau=float(tau))
else:
    c1, c2 = st.columns(2)
    k = c1.radio("k (experts per token)", [1, 2], index=1, horizontal=True, key="moe.k")
    cf_label = c2.radio(
        "Capacity factor (per image)",
        [str(c) if c is not None else NONE_LABEL for c in moe.CAPACITY_GRID],
        index=2,
        horizontal=True,
        key="moe.cf",
    )
    routing = moe.routing_setting(int(k), None if cf_label == NONE_LABEL else float(cf_label))
    st.caption(
        "k=1 and k=2 are two routing modes of the same weights (trained with k alternating "
        "between 1 and 2, capacity factor 2); capacity is per image (16 tokens)."
    )

# --- one input ---------------------------------------------------------------------------
st.subheader("Routing of one input")
source = st.radio("Input", ["Test image", "Upload"], horizontal=True, key="moe.source")
image = label = None
if source == "Upload":
    up = st.file_uploader(
        "An image (PNG, JPEG, or anything else Pillow reads; up to 10 MB), prepared as "
        "Fashion-MNIST was: background removed, cropped to the object, 28×28 grey, light on dark",
        key="moe.upload",
        max_upload_size=10,
    )
    if up is not None:
        try:
            prep = photo.prepare_image(up.getvalue(), dataset, up.name)
        except photo.ImageInputError as e:
            st.error(f"This file cannot be used: {e}")
        except Exception as e:  # a decoder bug must not take the page down
            st.error(
                f"This file cannot be used: {up.name} could not be decoded ({type(e).__name__})"
            )
        else:
            image = prep.model_input
            st.image(
                [prep.original, image],
                caption=["before: as uploaded", "after: what the model sees (28×28)"],
                width=140,
            )
    else:
        st.info("Upload an image to see how it is routed.")
else:
    try:
        images, where = loaders.moe_gallery(dataset)
    except image_data.DatasetUnavailable as e:
        st.error(str(e))
        images = None
    if images is not None:
        i = st.number_input(
            f"Image index ({where})", 0, len(images) - 1, 0, step=1, key="moe.index"
        )
        image, label = images.images[int(i)], int(images.labels[int(i)])

if image is not None:
    rec = loaders.moe_route_one(
        model_id, image.tobytes(), routing.k, routing.capacity_factor, routing.tau
    )
    dense = loaders.moe_dense_flops(model_id)
    pred = int(rec.pred[0])
    m = st.columns(4)
    m[0].metric(
        "Prediction",
        class_names[pred],
        delta=None
        if label is None
        else ("correct" if pred == label else f"true: {class_names[label]}"),
        delta_color="normal" if label is None or pred == label else "inverse",
    )
    m[1].metric("Experts per token", f"{rec.experts_per_token.mean():.2f}")
    m[2].metric(
        "FLOPs (counted)",
        f"{rec.flops[0] / 1e6:.2f} M",
        **widgets.cost_delta(rec.flops[0], dense, "dense"),
    )
    m[3].metric("Dropped token choices", int(rec.dropped.sum()))
    layer = st.radio(
        "Layer",
        list(range(cfg.depth)),
        format_func=lambda i: f"layer {i + 1}",
        horizontal=True,
        key="moe.layer",
    )
    score_name = "predicted norm / max" if dynamic else "router probability"
    left, right = st.columns([3, 2])
    left.plotly_chart(
        figs.routing_heatmap(
            rec.scores[0, layer].astype(float),
            rec.chosen[0, layer],
            cfg.grid,
            score_name,
            rec.dropped[0, layer],
            title=f"Layer {layer + 1}: tokens × experts",
            subtitle=f"colour: {score_name}; dot: the expert ran",
        ),
        key="moe.heatmap",
    )
    right.plotly_chart(
        figs.patch_overlay(
            image,
            rec.chosen[0, layer],
            rec.scores[0, layer].astype(float),
            cfg.patch,
            title=f"Top expert per patch, layer {layer + 1}",
        ),
        key="moe.overlay",
    )

# --- data-set views ----------------------------------------------------------------------
st.subheader("Over the test set")
saved = loaders.moe_bundled_sweep(model_id)
n_sweep = (
    int(saved.get("points", [{}])[0].get("samples", moe.SWEEP_SAMPLES))
    if saved
    else moe.SWEEP_SAMPLES
)
try:
    _, _, sweep_source = loaders.moe_sweep_images(dataset, n_sweep)
    can_run = True
except image_data.DatasetUnavailable as e:
    sweep_source, can_run = str(e), False

live_key = f"moe.live.{model_id}"
if saved is None and can_run:
    st.session_state[live_key] = True
if (
    can_run
    and not st.session_state.get(live_key)
    and st.button(
        f"Re-run the sweep live ({n_sweep:,} images from the {sweep_source})", key="moe.rerun"
    )
):
    st.session_state[live_key] = True
if st.session_state.get(live_key) and can_run:
    bar = progress.PageBar("routing sweep")
    points = loaders.moe_live_sweep(model_id, dataset, n_sweep, _progress=bar)
    bar.empty()
    origin = f"live sweep on {n_sweep:,} images of the {sweep_source} (cached)"
elif saved is not None:
    points = saved["points"]
    origin = (
        f"bundled sweep: {n_sweep:,} images of the {dataset} test split (seeded subset), "
        f"recorded at training time"
    )
else:
    st.error(f"No bundled sweep for {model_id}, and no data to run one: {sweep_source}")
    st.stop()

labels = [p["setting"] for p in points]
current = labels.index(routing.label()) if routing.label() in labels else None
if current is None:
    st.warning(f"The sweep has no point for {routing.label()}.")
    st.stop()
point = points[current]
dense = loaders.moe_dense_flops(model_id)
st.caption(f"{origin}. Setting shown: **{point['setting'].replace('tau=', 'τ=')}**.")
profile = loaders.time_profile(model_id)
unit = widgets.cost_axis(profile)
time_ms = None
if unit != costs.FLOPS:  # the measured time of a sparse run at each point's tau
    ms = costs.timing(profile, unit).median_ms
    by_label = {
        moe.routing_setting(tau=float(t)).label(): v
        for t, v in zip(profile.points, ms, strict=True)
    }
    time_ms = [by_label.get(p["setting"], float("nan")) for p in points]
m = st.columns(4)
m[0].metric("Test accuracy", f"{point['accuracy']:.2%}" if point["accuracy"] is not None else "—")
if time_ms is not None:
    m[1].metric(f"{unit} per sample", costs.fmt_cost(time_ms[current], unit), help="measured")
else:
    m[1].metric(
        "FLOPs per sample",
        f"{point['flops_mean'] / 1e6:.2f} M",
        **widgets.cost_delta(point["flops_mean"], dense, "dense"),
    )
m[2].metric("Experts per token", f"{point['experts_per_token_mean']:.2f}")
m[3].metric("Tokens dropped (any layer)", f"{max(point['dropped_fraction']):.1%}")

tabs = st.tabs(["Accuracy vs compute", "Expert load", "Per-class usage", "Experts per token"])
with tabs[0]:
    others = None
    if dynamic:
        topk = [
            c
            for c in cards
            if cards[c].raw.get("variant") == "topk" and cards[c].dataset == dataset
        ]
        other = loaders.moe_bundled_sweep(topk[0]) if topk else None
        others = other["points"] if other else None
    st.plotly_chart(
        figs.accuracy_compute(
            points,
            dense,
            current,
            "dynamic-k (τ sweep)" if dynamic else "top-k settings",
            others,
            time_ms=time_ms,
            time_unit=unit,
        ),
        key="moe.tradeoff",
    )
    st.caption(
        "FLOPs are counted by torch on the modules as they ran (attention, router and only the "
        "selected experts), relative to the dense-equivalent model (every MLP as one block)."
    )
with tabs[1]:
    tokens = point["samples"] * point["tokens_per_sample"]
    st.plotly_chart(figs.expert_load(np.array(point["load"]), tokens), key="moe.load")
    st.caption("Share of all tokens each expert processed; dashed: a perfectly uniform load.")
with tabs[2]:
    if point.get("usage") is not None:
        st.plotly_chart(figs.class_usage(np.array(point["usage"]), class_names), key="moe.usage")
        st.caption("Per class, the share of its token-expert assignments (all layers) per expert.")
    else:
        st.info("No labels for this sweep.")
with tabs[3]:
    st.plotly_chart(figs.experts_histogram(point["experts_per_token_hist"]), key="moe.hist")
    if not dynamic:
        st.caption(
            "Top-k runs exactly k experts per token unless capacity drops some (0 not shown)."
        )
