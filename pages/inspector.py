"""Sample inspector: one input through every exit, where the policy stops, and why.

Inputs come from the test split (galleries of the easiest and hardest samples by the oracle's
exit) or from an uploaded image. A bundled image model is run live (engine.run.inspection) and can
explain its exits with Captum; so can a user's own PyTorch model (``python -m engine.byo torch``),
on the rows of the data it was registered with, whatever their shape (drawn when image-like). A
trace without a model (an uploaded external trace, or a model whose inputs are not at hand) shows
the trace's recorded outputs only.
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import streamlit as st

from app import figures, loaders, navigation, widgets
from engine.core import costs
from engine.core.policies import Policy, exit_index
from engine.core.trace import Trace, TraceError
from engine.data import photo
from engine.data.images import DATASETS, INSTALL_HINT, DatasetUnavailable, to_model_input
from engine.registry import RegistryError
from engine.run import inspection
from engine.run.exits import input_exits

PINNED = "aie.insp.pinned"
UPLOAD = "aie.insp.upload"
ATTR = "aie.insp.attributions"
W_SAMPLE = "w.sample"
W_SOURCE = "w.input_source"
GALLERY = 8

navigation.require_router()  # first: a deep link may have run this page alone
st.title("Sample inspector")
st.caption(
    "Follow one input through the network: each exit's belief, where the current policy "
    "stops, what that saves, and which pixels drove the decision."
)


# --- what can be run -----------------------------------------------------------------------------


def live_setup(source: str):
    """(model, card, inputs or None, why-not) for a bundled image model or a user's model that
    brought its data (``loaders.ModelInputs``); model None if trace-only."""
    if loaders.is_upload(source):
        return None, None, None, "This is an uploaded trace from an external model"
    model_id, _ = loaders.split_source(source)
    card = loaders.model_card(model_id)
    if card is None:
        return None, None, None, f"No model card for {model_id!r}"
    own = None
    if card.get("dataset") not in DATASETS:
        try:
            own = loaders.model_inputs(model_id)
        except (RegistryError, FileNotFoundError, RuntimeError) as e:
            return None, card, None, f"The model's data could not be read ({e})"
        if own is None:
            return (
                None,
                card,
                None,
                f"{model_id} takes {card.get('dataset', 'non-image')} inputs, not images",
            )
    try:
        model = loaders.load_model(model_id)
    except (RegistryError, FileNotFoundError, RuntimeError) as e:
        return None, card, None, f"The model could not be loaded ({e})"
    if not (hasattr(model, "stages") and hasattr(model, "heads")):
        return None, card, None, f"{model_id} does not expose stages/heads"
    if own is not None:
        return model, card, own, None
    try:
        images = loaders.test_images(card["dataset"])
    except DatasetUnavailable:
        st.warning(
            f"The {card['dataset']} test images are not installed "
            f"(`{INSTALL_HINT[card['dataset']]}`): upload an image instead."
        )
        images = None
    if images is not None and images.note:
        st.info(images.note)
    return model, card, images, None


def row_of(trace: Trace, sid) -> int | None:
    hits = np.flatnonzero(trace.sample_id == sid)
    return int(hits[0]) if hits.size else None


def parse_sid(trace: Trace, text: str):
    if np.issubdtype(trace.sample_id.dtype, np.integer):
        return int(text)
    return str(text)


# --- one input -----------------------------------------------------------------------------------


def item_probs(item: dict, trace: Trace, model) -> tuple[np.ndarray, np.ndarray]:
    """[K, C] probabilities and [K] cumulative cost for an input."""
    if model is None or item.get("x") is None:  # no live run: the trace's recorded row
        return trace.probs[item["row"]], trace.cost[item["row"]]
    probs = input_exits(model, item["x"])
    if costs.is_time(trace.meta.cost_unit):  # measured time per exit: the same for every input
        return probs, trace.cost[0]
    return probs, loaders.exit_cumulative_flops(item["model_id"])


def _attr_key(item: dict) -> str:
    x = item.get("x")
    h = hashlib.sha1(x.tobytes()).hexdigest()[:12] if x is not None else str(item.get("row"))
    return f"{item.get('model_id')}:{h}"


def _compute_attr(item: dict, exit_taken: int, last: int) -> None:
    model = loaders.load_model(item["model_id"])
    res = {}
    for k in sorted({exit_taken, last}):
        res[k] = inspection.attribute(model, item["x"], k, baseline=item.get("baseline"))
    st.session_state.setdefault(ATTR, {})[_attr_key(item) + f":{exit_taken}"] = res


def show_item(item: dict, trace: Trace, model, policy: Policy, prefix: str) -> None:
    names = trace.meta.exit_names
    classes = trace.meta.class_names
    k_last = trace.num_exits - 1
    st.markdown(f"#### {item['title']}")
    if item.get("original") is not None:
        c1, c2, c3 = st.columns(3)
        c1.image(item["original"], caption="before: as uploaded", width=200)
        c2.image(item["ink"], caption="background removed, cropped to the ink", width=160)
        c3.image(
            np.kron(item["image"], np.ones((6, 6), dtype=np.uint8)),
            caption="after: what the model sees (28×28)",
            width=168,
        )
    elif item.get("picture") is not None:
        st.image(inspection.enlarged(item["picture"]), width=168)
    elif item.get("x") is not None:
        st.info(
            f"This model's input has shape {tuple(item['x'].shape)}, not an image's, so it is "
            "not drawn; the outputs below are from a live run on it."
        )
    for col, value in item.get("extra", {}).items():
        st.markdown(f"**{col}**: {value}")

    probs, cum_cost = item_probs(item, trace, model)
    if model is None or item.get("x") is None:
        exit_taken = int(exit_index(trace.subset(np.array([item["row"]])), policy)[0])
    else:
        exit_taken = int(exit_index(probs, policy))
    pred = probs.argmax(axis=1)
    label = item.get("label")
    full = float(cum_cost[-1])
    spent = float(cum_cost[exit_taken])
    unit = trace.meta.cost_unit
    m = st.columns(3)
    m[0].metric("Policy exits at", names[exit_taken], help=policy.describe())
    verdict = None
    if label is not None and label >= 0:
        verdict = "correct" if pred[exit_taken] == label else f"wrong (label {classes[label]})"
    m[1].metric(
        "Prediction",
        classes[pred[exit_taken]],
        delta=verdict,
        delta_color="normal" if verdict == "correct" else "inverse",
    )
    m[2].metric(
        f"{unit} spent",
        f"{figures.fmt_flops(spent)}{unit}",
        **widgets.cost_delta(spent, full),
    )
    widgets.chart(
        figures.anytime_figure(probs, classes, names, exit_taken, cum_cost, label),
        f"{prefix}.anytime",
        "anytime_prediction",
    )
    table = pl.DataFrame(
        {
            "exit": list(names),
            "prediction": [classes[p] for p in pred],
            "confidence": probs.max(axis=1).astype(np.float64),
            **(
                {"p(label)": probs[:, label].astype(np.float64)}
                if label is not None and label >= 0
                else {}
            ),
            f"cumulative {unit}": cum_cost.astype(np.float64),
            "of full model": (cum_cost / full if full > 0 else cum_cost * 0).astype(np.float64),
            "policy": ["exits here" if k == exit_taken else "" for k in range(len(names))],
        }
    )
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "confidence": st.column_config.NumberColumn(format="%.4f"),
            "p(label)": st.column_config.NumberColumn(format="%.4f"),
            "of full model": st.column_config.NumberColumn(format="percent"),
        },
        key=f"{prefix}.table",
    )

    if model is None or item.get("x") is None:
        return
    st.button(
        "Compute attributions (Integrated Gradients + Saliency)",
        key=f"{prefix}.attr",
        on_click=_compute_attr,
        args=(item, exit_taken, k_last),
        help="Costs about 2×64 backward passes, so it runs on request.",
    )
    res = st.session_state.get(ATTR, {}).get(_attr_key(item) + f":{exit_taken}")
    if res:
        maps = {}
        for k in sorted(res):
            a = res[k]
            where = "exit taken" if k == exit_taken else "last exit"
            if k == exit_taken == k_last:
                where = "exit taken = last exit"
            maps[f"IG · {names[k]} ({where})"] = a.integrated_gradients
        for k in sorted(res):
            maps[f"Saliency · {names[k]}"] = res[k].saliency
        widgets.chart(
            figures.attribution_figure(maps, cols=len(res)),
            f"{prefix}.attrfig",
            "attributions",
        )
        st.caption(
            " · ".join(
                f"{names[k]}: explains class {classes[res[k].target]}, IG convergence delta "
                f"{res[k].ig_delta:.2e}"
                for k in sorted(res)
            )
        )
        if not inspection.image_like(tuple(item["x"].shape)):
            st.caption(
                "The input is not an image: each map is one row of its "
                f"{item['x'].size} features, in the order of the flattened input."
            )


# --- choosing an input ---------------------------------------------------------------------------


def _pick(sid) -> None:
    st.session_state[W_SAMPLE] = str(sid)
    st.session_state[W_SOURCE] = "Test split"


def gallery(trace: Trace, images, card) -> None:
    easiest, hardest = loaders.difficulty_order(loaders.source_key(source), trace)
    for title, rows in (
        ("Easiest (the earliest correct exit is early)", easiest),
        ("Hardest (no exit gets them right, or only the last)", hardest),
    ):
        if images is not None:  # only samples whose image is at hand (a gallery may be partial)
            rows = [r for r in rows if images.position(trace.sample_id[r]) is not None]
        st.markdown(f"**{title}**")
        cols = st.columns(GALLERY)
        for col, r in zip(cols, rows[:GALLERY], strict=False):
            sid = trace.sample_id[r]
            pic = images.picture(images.position(sid)) if images is not None else None
            if pic is not None:
                col.image(pic, width=56)
            lab = trace.meta.class_names[trace.label[r]]
            col.button(
                f"{sid}",
                key=f"g.{title[:4]}.{sid}",
                on_click=_pick,
                args=(sid,),
                help=f"label {lab}",
                width="stretch",
            )


def test_item(trace: Trace, images, model_id: str | None) -> dict | None:
    wanted = widgets.query_int(widgets.QP_SAMPLE)
    if wanted is not None:
        st.session_state[W_SAMPLE] = wanted
    if W_SAMPLE not in st.session_state:
        st.session_state[W_SAMPLE] = str(trace.sample_id[0])
    text = st.text_input("Sample id", key=W_SAMPLE, help="An id from the test split's trace.")
    try:
        sid = parse_sid(trace, text)
    except ValueError:
        st.error(f"{text!r} is not a sample id of this trace (ids are integers).")
        return None
    row = row_of(trace, sid)
    if row is None:
        st.error(f"Sample {sid!r} is not in this trace.")
        return None
    widgets.write_query(widgets.QP_SAMPLE, str(sid))
    return sample_item(trace, row, images, model_id)


def sample_item(trace: Trace, row: int, images, model_id: str | None) -> dict:
    sid = trace.sample_id[row]
    label = int(trace.label[row])
    item = {
        "title": f"Test sample {sid}"
        + (f" · label {trace.meta.class_names[label]}" if label >= 0 else ""),
        "row": row,
        "sid": sid,
        "label": label,
        "model_id": model_id,
        "extra": {k: v[row] for k, v in trace.extra.items()},
    }
    if images is not None:
        pos = images.position(sid)
        if pos is not None:
            item["x"] = images.model_input(pos)
            item["picture"] = images.picture(pos)
            item["baseline"] = images.baseline
            if int(images.labels[pos]) != label:
                st.warning("The trace's label differs from the data set's for this sample.")
        else:
            st.warning(
                f"No image for sample {sid} here (outside the installed images or the bundled "
                "gallery): showing the trace's recorded outputs."
            )
    return item


def upload_item(card: dict) -> dict | None:
    up = st.file_uploader(
        "Image (PNG, JPEG, or anything else Pillow reads; up to 10 MB)",
        key="w.image_upload",
        max_upload_size=10,
    )
    if up is None:
        return None
    try:
        prep = photo.prepare_image(up.getvalue(), card["dataset"], up.name)
    except photo.ImageInputError as e:
        st.error(f"This file cannot be used: {e}")
        return None
    except Exception as e:  # a decoder bug must not take the page down
        st.error(f"This file cannot be used: {up.name} could not be decoded ({type(e).__name__})")
        return None
    note = "light background: inverted to white on black" if prep.inverted else "dark background"
    top, bottom, left, right = prep.box
    st.caption(
        f"{up.name}: {prep.format}, {prep.original.shape[1]}×{prep.original.shape[0]}; {note}; "
        f"cropped to {right - left}×{bottom - top} at ({left}, {top})"
    )
    return {
        "title": f"Upload · {up.name}",
        "row": None,
        "label": None,
        "image": prep.model_input,
        "x": to_model_input(prep.model_input)[0].numpy(),
        "baseline": inspection.black_image(),
        "original": prep.original,
        "ink": prep.ink,
        "model_id": card["model_id"],
    }


# --- page ----------------------------------------------------------------------------------------

source = widgets.model_picker()
if source is None:
    st.info(
        "No traces yet: train a bundled model (see README) or upload a trace on the tuning page."
    )
    st.stop()
try:
    trace = loaders.get_trace(source)
except (FileNotFoundError, TraceError) as e:
    st.error(f"Could not load {source!r}: {e}")
    st.stop()

with st.sidebar:
    policy = widgets.policy_controls(trace, compact=True)
    # the cost spent per exit in FLOPs or in the measured time of deciding there
    trace = loaders.source_on_axis(source, widgets.cost_axis(loaders.source_profile(source)))[0]

model, card, images, why_not = live_setup(source)
model_id = card["model_id"] if card is not None and model is not None else None
if model is None:
    st.info(
        f"{why_not}: showing the trace's recorded outputs only (no live run, no uploads, "
        "no attributions)."
    )

pinned = st.session_state.get(PINNED)
if pinned is not None and pinned.get("source") != source:
    pinned = None
    st.session_state.pop(PINNED, None)
pin_q = widgets.query_int(widgets.QP_PIN)
if pin_q is not None:
    try:
        r = row_of(trace, parse_sid(trace, pin_q))
    except ValueError:
        r = None
    if r is not None:
        pinned = sample_item(trace, r, images, model_id) | {"source": source}
        st.session_state[PINNED] = pinned

uploads = model is not None and card.get("dataset") in DATASETS  # photos fit the 28×28 models
if model is not None and not uploads:
    st.caption(
        "Inputs are the rows of the data file this model was registered with (sample id = "
        "row). Models and their code are only ever loaded from the command line "
        "(python -m engine.byo), never from the browser."
    )
choices = ["Test split"] + (["Upload an image"] if uploads else [])
if st.session_state.get(W_SOURCE) not in choices:
    st.session_state[W_SOURCE] = choices[0]
mode = st.radio("Input", choices, key=W_SOURCE, horizontal=True)
if mode == "Test split":
    with st.expander("Galleries: easiest and hardest test samples", expanded=pinned is None):
        gallery(trace, images, card)
    item = test_item(trace, images, model_id)
else:
    item = upload_item(card)
    if item is None:
        st.caption("Upload an image to run it through the model.")

if item is not None:
    item["source"] = source
    b1, b2, _ = st.columns([1, 1, 3])
    if b1.button("Pin this input", key="b.pin", help="Keep it on the left to compare"):
        st.session_state[PINNED] = item
        pinned = item
        if item.get("sid") is not None:
            widgets.write_query(widgets.QP_PIN, str(item["sid"]))
    if pinned is not None and b2.button("Unpin", key="b.unpin"):
        st.session_state.pop(PINNED, None)
        widgets.write_query(widgets.QP_PIN, None)
        pinned = None

if pinned is not None and item is not None:
    left, right = st.columns(2)
    with left:
        st.caption("Pinned")
        show_item(pinned, trace, model, policy, "pinned")
    with right:
        st.caption("Current")
        show_item(item, trace, model, policy, "current")
elif item is not None:
    show_item(item, trace, model, policy, "current")
elif pinned is not None:
    show_item(pinned, trace, model, policy, "pinned")
