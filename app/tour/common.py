"""What every tour chapter shares: the chapter record, the layout, the go-deeper link and the
threshold the student chose (kept across chapters). Chapters import from here, never from one
another's frame, so there is no import cycle between the frame and the chapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import streamlit as st

from engine.registry import ModelCard

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_T = 0.9
T_KEY = "tour.threshold"  # the threshold the student chose, kept across chapters


@dataclass(frozen=True)
class Ctx:
    present: bool
    fig_height: int


@dataclass(frozen=True)
class Chapter:
    key: str  # the ``?chapter=`` value
    title: str
    needs: str  # "the X model", for the "not bundled yet" line
    find: Callable[[], ModelCard | None]
    body: Callable[[Ctx, ModelCard], None]
    order: int  # position in the tour (app.tour.chapters sorts by it)

    def show(self, ctx: Ctx) -> None:
        st.header(self.title, anchor=False)
        card = self.find()
        if card is None:
            st.info(f"This chapter needs {self.needs}, which is not bundled yet.")
            return
        self.body(ctx, card)


def text_and_figure(ctx: Ctx, explain: str, paper: str):
    """Left: the explanation and the paper; right: the figure. Returns (left, right)."""
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown(explain)
        st.caption(paper)
    return left, right


def deeper(page: str, label: str, params: dict) -> None:
    """A link that opens the full page with the same model and setting (query parameters)."""
    if not (ROOT / page).exists():
        st.caption(f"({label}: that page is not in the app yet.)")
        return
    params = {k: str(v) for k, v in params.items()}
    try:
        st.page_link(page, label=label, icon=":material/open_in_new:", query_params=params)
    except Exception:  # the page is not registered (the tour run on its own, outside the router)
        st.markdown(f"[{label}](/{Path(page).stem}?{urlencode(params)})")


def threshold_slider(label: str = "Confidence threshold") -> float:
    """The one control of the early-exit chapters; remembered across chapters."""

    def keep():
        st.session_state[T_KEY] = st.session_state["tour.w.t"]

    return st.slider(
        label,
        min_value=0.5,
        max_value=1.0,
        value=float(st.session_state.get(T_KEY, DEFAULT_T)),
        step=0.005,
        format="%.3f",
        key="tour.w.t",
        on_change=keep,
        help="An input stops at the first exit whose top class probability reaches this.",
    )


def current_threshold() -> float:
    return float(st.session_state.get(T_KEY, DEFAULT_T))


def show_figure(fig, key: str) -> None:
    """Every tour figure: the palette's colours and the figure's own fonts (no theme)."""
    st.plotly_chart(fig, key=key, theme=None, config={"displayModeBar": False})


def pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%"
