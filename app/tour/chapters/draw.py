"""Draw a digit: canvas -> the 28x28 the model sees (MNIST's preprocessing) -> every exit live.

The canvas (streamlit-drawable-canvas) returns RGBA pixels; ``engine.data.drawing.to_mnist``
crops, scales and centres them as MNIST was made, and ``app.tour.live`` runs the multi-exit
model through the engine's runtime. A test-set digit can be sent down the same path (rendered
into the canvas's RGBA format by ``engine.data.drawing.to_canvas_rgba``); the tests do that. The same drawing goes through a
layer-skipping model and an image halting model on MNIST, when such models are bundled.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from PIL import Image

from app import figures_tour as ft
from app.loaders import load_model
from app.palette import HIGHLIGHT, NEUTRAL, exit_color
from app.tour import data
from app.tour.common import (
    Chapter,
    Ctx,
    current_threshold,
    deeper,
    pct,
    show_figure,
    threshold_slider,
)
from engine.core.family import LiveRun
from engine.data.drawing import DrawingError, to_canvas_rgba, to_mnist
from engine.families import get as get_family
from engine.registry import ModelCard, get_card

CANVAS = 280
SEEN_WIDTH = 190  # the "what the model sees" box beside the canvas
TOOLBAR_PX = 32  # streamlit-drawable-canvas pops its toolbar up 2.65rem above the canvas on hover
CANVAS_N = "tour.draw.n"  # bumped by "Clear" so a fresh, empty canvas is mounted
LOADED = "tour.draw.rgba"  # RGBA pixels in the canvas's format, loaded instead of drawn
RESULT = "tour.draw.result"  # {"pred", "exit", "cost_fraction"} of the last run (tests read it)
DIGITS = "mnist"  # the canvas's preprocessing is MNIST's: the side panels' models read it


def skip_card() -> ModelCard | None:
    """A layer-skipping model on MNIST, for the "Layer skipping" tab."""
    return data.first_card("skip", dataset=DIGITS)


def ponder_card() -> ModelCard | None:
    """A halting model that reads MNIST images, for the "Pondering (ACT)" tab."""
    return data.first_card("halt", dataset=DIGITS, where=lambda c, f: f.live_input(c) == "image")


@st.cache_resource(show_spinner=False)
def skip_live(model_id: str, img28: bytes, threshold: float) -> LiveRun:
    """One drawn image through the skip model (gates decide per block; its family's real run)."""
    card = get_card(model_id)
    img = np.frombuffer(img28, dtype=np.uint8).reshape(28, 28).copy()
    return get_family(card.family).run_one(load_model(model_id), card, img, threshold)


@st.cache_resource(show_spinner=False)
def ponder_live(model_id: str, img28: bytes, eps: float) -> LiveRun:
    """One drawn image pondered by the halting model (its family's real run at ``eps``)."""
    card = get_card(model_id)
    img = np.frombuffer(img28, dtype=np.uint8).reshape(28, 28).copy()
    return get_family(card.family).run_one(load_model(model_id), card, img, eps)


def _clear() -> None:
    st.session_state[CANVAS_N] = st.session_state.get(CANVAS_N, 0) + 1
    st.session_state.pop(LOADED, None)
    st.session_state.pop(RESULT, None)


def _load_test_digit(card: ModelCard) -> None:
    ts = data.test_set(card.dataset)  # the full test split, or the bundled gallery
    if ts is None:
        return
    imgs = ts[0]
    i = int(st.session_state.get("tour.w.draw_sample", 0)) % len(imgs)
    st.session_state[LOADED] = to_canvas_rgba(imgs[i], CANVAS)


def _canvas() -> np.ndarray | None:
    """The drawing's RGBA pixels, or None when the canvas component is not available."""
    try:
        from streamlit_drawable_canvas import st_canvas
    except ImportError:
        st.error("Drawing needs streamlit-drawable-canvas: pip install streamlit-drawable-canvas")
        return None
    result = st_canvas(
        stroke_width=18,
        stroke_color="#FFFFFF",
        background_color="#000000",
        height=CANVAS,
        width=CANVAS,
        drawing_mode="freedraw",
        key=f"tour.canvas.{st.session_state.get(CANVAS_N, 0)}",
        return_image_data=True,
    )
    try:
        return result.image_data
    except (RuntimeError, ValueError, OSError):
        return None


def _big(img28: np.ndarray, size: int = 168) -> np.ndarray:
    """Nearest-neighbour upscale, so the 28x28 pixel grid stays visible."""
    return np.asarray(Image.fromarray(img28).resize((size, size), Image.Resampling.NEAREST))


def draw_chapter(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    st.markdown(
        "**Draw a digit** with the mouse. The network sees it the way it saw its training "
        "data: cropped, shrunk to 20×20 pixels and centred in a 28×28 grid. Then watch each "
        "exit guess. A clean digit stops early; a scrawl goes deep."
    )
    # A row of fixed-width boxes, not st.columns: a relative column shrinks with the window
    # (224 px at 1400 px with the sidebar) while the canvas keeps its CANVAS px and was cut off.
    row = st.container(horizontal=True, gap="medium", key="tour-draw-row")
    c_draw = row.container(width=CANVAS, key="tour-draw-canvas")
    c_seen = row.container(width=SEEN_WIDTH)
    c_fig = row.container(width="stretch")
    with c_draw:
        # the canvas's toolbar pops up TOOLBAR_PX above it on hover, over whatever is there:
        # keep that strip empty so it does not cover the intro sentence
        st.space(TOOLBAR_PX)
        drawn = _canvas()
        st.button("Clear", key="tour.draw.clear", on_click=_clear, icon=":material/delete:")
        if not ctx.present:
            with st.expander("Or send a test digit through the same path"):
                st.number_input("Test image number", 0, 100_000, 0, key="tour.w.draw_sample")
                st.button("Load it", key="tour.draw.load", on_click=_load_test_digit, args=(card,))
    rgba = drawn
    loaded = st.session_state.get(LOADED)
    try:
        img28 = None if rgba is None else to_mnist(rgba)
        if img28 is None and loaded is not None:
            rgba, img28 = loaded, to_mnist(loaded)
    except DrawingError as e:
        st.error(f"Could not read the drawing: {e}")
        return

    with c_seen:
        if img28 is None:
            st.markdown("*Draw a digit on the black square.*")
        else:
            if rgba is loaded:
                st.image(np.asarray(rgba)[..., :3], caption="what was drawn", width=140)
            st.image(_big(img28), caption="what the model sees (28×28)", width=168)
    if img28 is None:
        st.session_state.pop(RESULT, None)
        return

    from app.tour.live import run_multi_exit

    if ctx.present:
        t = current_threshold()
    else:
        with c_seen:
            t = threshold_slider("Threshold")
    run = run_multi_exit(data.get_runner(card.model_id), img28, t)
    names = list(trace.meta.exit_names)
    classes = trace.meta.class_names
    st.session_state[RESULT] = {
        "pred": run.answer,
        "exit": run.exit,
        "cost_fraction": run.cost_fraction,
    }
    with c_seen:
        st.markdown(
            f"Answer **{classes[run.answer]}** at **{names[run.exit]}**, "
            f"using **{pct(run.cost_fraction)}** of the full network's compute."
        )
    skip, ponder = skip_card(), ponder_card()
    names_tabs = ["Early exit"]
    names_tabs += ["Layer skipping"] if skip is not None else []
    names_tabs += ["Pondering (ACT)"] if ponder is not None else []
    extra = 50 if len(names_tabs) > 1 else 0
    with c_fig:
        tabs = st.tabs(names_tabs) if len(names_tabs) > 1 else [st.container()]
    with tabs[0]:
        fig = ft.exit_ladder(
            run.probs,
            run.cost,
            run.exit,
            t,
            names,
            classes,
            height=ctx.fig_height - extra,
            present=ctx.present,
        )
        show_figure(fig, "tour.fig.draw")
    if skip is not None:
        with tabs[1]:
            _skip_panel(ctx, skip, img28, classes)
    if ponder is not None:
        with tabs[-1]:
            _act_panel(ctx, ponder, img28, classes)
    if not ctx.present:
        with c_fig:
            deeper(
                "pages/tuning.py",
                "Go deeper: this threshold on the whole test set",
                {"model": card.model_id, "policy": "max_prob", "t": t},
            )


SKIP_T = 0.5


def _skip_panel(ctx: Ctx, card: ModelCard, img28: np.ndarray, classes) -> None:
    """The same drawing through the skip model: each block's gate score and whether it ran."""
    rec = skip_live(card.model_id, np.ascontiguousarray(img28).tobytes(), SKIP_T)
    gate, ran = rec.steps, rec.ran
    n = len(gate)
    st.session_state[RESULT]["skip_blocks_run"] = int(ran.sum())
    fig = ft.steps_bars(
        gate,
        [f"block {b + 1}" + ("" if ran[b] else " (skipped)") for b in range(n)],
        [exit_color(b) if ran[b] else NEUTRAL for b in range(n)],
        "gate score (run when ≥ threshold)",
        line=SKIP_T,
        line_label=f"gate threshold {SKIP_T}",
        height=ctx.fig_height - 90,
        present=ctx.present,
        y_range=(0, 1.15),
    )
    show_figure(fig, "tour.fig.draw_skip")
    st.markdown(
        f"The skip model answers **{classes[rec.prediction]}** after running "
        f"**{int(ran.sum())} of {n}** blocks."
    )


def _act_panel(ctx: Ctx, card: ModelCard, img28: np.ndarray, classes) -> None:
    """The same drawing through the image ACT model: cumulative halting after each step."""
    eps = float(card.config.get("eps", 0.01))
    run = ponder_live(card.model_id, np.ascontiguousarray(img28).tobytes(), eps)
    steps, m = int(run.detail["halt_at"]), len(run.steps)
    st.session_state[RESULT]["act_steps"] = steps
    cum = np.where(np.arange(m) < steps, run.detail["cumulative"], 0.0)
    fig = ft.steps_bars(
        cum,
        [str(n + 1) for n in range(m)],
        [
            exit_color(0) if n < steps - 1 else HIGHLIGHT if n == steps - 1 else NEUTRAL
            for n in range(m)
        ],
        "cumulative halting",
        line=1 - eps,
        line_label=f"1 − ε = {1 - eps:g}",
        height=ctx.fig_height - 90,
        present=ctx.present,
        y_range=(0, 1.15),
    )
    fig.update_xaxes(title=f"ponder step (steps after {steps} were not run)", type="category")
    show_figure(fig, "tour.fig.draw_act")
    st.markdown(
        f"The ACT model answers **{classes[run.prediction]}** after **{steps} of {m}** "
        "ponder steps: it stops once its halting total reaches 1 − ε."
    )


CHAPTER = Chapter(
    "draw", "Draw a digit", "the multi-exit CNN", data.exit_card, draw_chapter, order=20
)
