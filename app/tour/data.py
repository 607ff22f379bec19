"""Cached access to the bundled models, traces and test images the tour runs on."""

from __future__ import annotations

import numpy as np
import streamlit as st

from engine.core.family import LiveRun
from engine.core.trace import Trace, TraceError
from engine.families import get as get_family
from engine.families import load_model
from engine.registry import ModelCard, RegistryError, get_card, list_cards
from engine.trace_store import load_trace

MULTI_EXIT_ID = "mnist_multi_exit_cnn"


def find_card(families: tuple[str, ...], prefer: str | None = None) -> ModelCard | None:
    """The preferred bundled model, else the first of the given families; None if none is."""
    try:
        cards = list_cards()
    except RegistryError:
        return None
    for card in cards:
        if prefer and card.model_id == prefer and card.weights_path.exists():
            return card
    for card in cards:
        if card.family in families and card.weights_path.exists():
            return card
    return None


def multi_exit_card() -> ModelCard | None:
    """The multi-exit CNN the early-exit chapters use (it needs its bundled test trace too)."""
    card = find_card(("multi_exit_cnn",), prefer=MULTI_EXIT_ID)
    if card is None or get_trace(card.model_id) is None:
        return None
    return card


@st.cache_resource(show_spinner=False)
def get_model(model_id: str):
    """Shared, read-only: never mutate (eval mode, no_grad at every call)."""
    return load_model(model_id)


@st.cache_data(show_spinner=False)
def get_trace(model_id: str, split: str = "test") -> Trace | None:
    try:
        return load_trace(model_id, split, build_if_missing=False)
    except (FileNotFoundError, TraceError, RegistryError):
        return None


@st.cache_data(show_spinner=False)
def test_set(dataset: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images uint8 [M, 28, 28], their test-split indices): the full set when installed,
    else the bundled gallery (engine.data.gallery); None when neither exists."""
    from engine.data.gallery import test_images

    try:
        t = test_images(dataset)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return t.data.images, t.indices


def rows_with_images(card: ModelCard, trace: Trace) -> np.ndarray:
    """Trace rows whose test image the app has (all of them when the data set is installed)."""
    ts = test_set(card.dataset)
    if ts is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.isin(trace.sample_id.astype(np.int64), ts[1]))


def sample_images(card: ModelCard, trace: Trace, rows: np.ndarray) -> np.ndarray | None:
    """uint8 [len(rows), 28, 28] images of trace rows (sample ids index the test split)."""
    ts = test_set(card.dataset)
    if ts is None:
        return None
    imgs, idx = ts
    ids = trace.sample_id[np.asarray(rows)].astype(np.int64)
    order = np.argsort(idx)
    pos = np.searchsorted(idx, ids, sorter=order)
    pos = np.clip(pos, 0, len(idx) - 1)
    hit = order[pos]
    if not (idx[hit] == ids).all():
        return None
    return imgs[hit]


@st.cache_resource(show_spinner=False)
def get_runner(model_id: str):
    """The engine's early-exit runtime around the cached model (FLOP table counted once)."""
    from app.tour.live import make_runner

    return make_runner(get_model(model_id))


# --- statistics the chapters show (cached per model and setting; the math is engine's) -------


def _policy(kind: str, value):
    from engine.core.policies import Policy

    if kind == "patience":
        return Policy("patience", patience=int(value))
    if kind == "fixed":
        return Policy("fixed", exit=int(value))
    return Policy(kind, threshold=float(value))


@st.cache_data(show_spinner=False, max_entries=256)
def exits_at(model_id: str, threshold: float) -> np.ndarray:
    from engine.core.policies import exit_index

    return exit_index(get_trace(model_id), _policy("max_prob", threshold))


@st.cache_data(show_spinner=False, max_entries=256)
def policy_stats(model_id: str, kind: str, value):
    from engine.core.tradeoff import evaluate_policy

    return evaluate_policy(get_trace(model_id), _policy(kind, value))


@st.cache_data(show_spinner=False)
def oracle_stats(model_id: str):
    from engine.core.policies import oracle_correct
    from engine.core.tradeoff import evaluate

    trace = get_trace(model_id)
    return evaluate(trace, oracle_correct(trace))


@st.cache_data(show_spinner=False)
def curve_points(model_id: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(cost as a share of the full network [M], accuracy [M]) of every setting of ``kind``."""
    from engine.core.tradeoff import curve

    trace = get_trace(model_id)
    c = curve(trace, kind)
    full = float(trace.cost[:, -1].mean())
    return c.mean_cost / full, c.accuracy


@st.cache_data(show_spinner=False)
def overthinking_rows(model_id: str) -> np.ndarray:
    """Rows an earlier exit gets right and the last exit gets wrong (labelled samples only)."""
    trace = get_trace(model_id)
    c = trace.correct
    return np.flatnonzero(~c[:, -1] & c[:, :-1].any(axis=1))


# --- the other families' bundled records -----------------------------------------------------


def card_if(model_id: str, family: str) -> ModelCard | None:
    card = find_card((family,), prefer=model_id)
    return card if card is not None and card.family == family else None


@st.cache_data(show_spinner=False)
def skip_records(model_id: str):
    from engine.families.skipnet import records as skipping

    try:
        return skipping.load_records(model_id)
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None


@st.cache_data(show_spinner=False)
def halt_records(model_id: str):
    from engine.families.act import records as halting

    try:
        return halting.load_records(model_id)
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None


@st.cache_data(show_spinner=False)
def moe_sweep(model_id: str) -> dict | None:
    from engine.families.moe import analysis as moe_analysis

    try:
        return moe_analysis.load_sweep(moe_analysis.sweep_file(model_id))
    except (OSError, ValueError, KeyError):
        return None


def cascade_card() -> ModelCard | None:
    card = card_if("mnist_cascade", "cascade")
    return card if card is not None and get_trace(card.model_id) is not None else None


def skip_card() -> ModelCard | None:
    card = card_if("mnist_skipnet", "skipnet")
    return card if card is not None and skip_records(card.model_id) is not None else None


@st.cache_resource(show_spinner=False)
def act_live(model_id: str, img28: bytes) -> LiveRun:
    """One drawn image pondered by the image ACT model (real halting at its trained eps)."""
    img = np.frombuffer(img28, dtype=np.uint8).reshape(28, 28).copy()
    card = get_card(model_id)
    family = get_family(card.family)
    return family.run_one(get_model(model_id), card, img, family.default_setting(card))


def act_image_card() -> ModelCard | None:
    """The ACT model that reads MNIST-style digits (the canvas's preprocessing), if bundled."""
    card = card_if("mnist_act", "act_cnn")
    return card if card is not None and card.dataset == "mnist" else None


def act_card() -> ModelCard | None:
    card = card_if("parity_act", "act")
    return card if card is not None and halt_records(card.model_id) is not None else None


def moe_card() -> ModelCard | None:
    card = card_if("fashion_d2dmoe_vit", "moe")
    return card if card is not None and moe_sweep(card.model_id) is not None else None


def lm_card() -> ModelCard | None:
    card = card_if("bbc_char_early_exit_lm", "early_exit_lm")
    sweep = [] if card is None else card.raw.get("metrics", {}).get("sweep", [])
    return card if any(p.get("mode") == "exit" for p in sweep) else None


@st.cache_resource(show_spinner=False)
def skip_live(model_id: str, img28: bytes, threshold: float) -> LiveRun:
    """One drawn image through the skip model (gates decide per block); img28: raw bytes."""
    img = np.frombuffer(img28, dtype=np.uint8).reshape(28, 28).copy()
    card = get_card(model_id)
    return get_family(card.family).run_one(get_model(model_id), card, img, threshold)
