"""Cached access to the bundled models, traces and test images the tour runs on.

Models are found by their family's kind and properties (``engine.families.cards_of_kind``),
never by id or family name: a chapter asks for "an exit model on MNIST with a trace". What one
family's chapter alone needs (its records, its live run) lives in that chapter's module."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import streamlit as st

from app.loaders import load_model
from engine.core.family import Family
from engine.core.trace import Trace, TraceError
from engine.families import cards_of_kind
from engine.registry import ModelCard, RegistryError
from engine.trace_store import load_trace


def first_card(
    *kinds: str,
    dataset: str | None = None,
    where: Callable[[ModelCard, Family], bool] | None = None,
) -> ModelCard | None:
    """The first bundled model (weights present) of a family of one of ``kinds``, optionally on
    one data set and passing ``where(card, family)``, in ``cards_of_kind`` order; None if none."""
    try:
        found = cards_of_kind(*kinds, dataset=dataset)
    except RegistryError:
        return None
    for card, fam in found:
        if card.weights_path.exists() and (where is None or where(card, fam)):
            return card
    return None


def traced_card(*kinds: str, dataset: str | None = None) -> ModelCard | None:
    """The first such model whose bundled test trace loads (the trace chapters read it)."""
    return first_card(*kinds, dataset=dataset, where=lambda c, _: get_trace(c.model_id) is not None)


def exit_card() -> ModelCard | None:
    """The early-exit chapters' model: a multi-exit model on MNIST (the canvas draws MNIST-style
    digits) with its test trace."""
    return traced_card("exit", dataset="mnist")


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

    return make_runner(load_model(model_id))


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
