"""The tour's frame: chapter stepping, the URL state, and the presenter view.

URL (query parameters), so that a link reopens the same slide:

* ``chapter=<key>`` — the chapter shown (``app.tour.chapters.CHAPTERS`` keys); default the first.
* ``present=1`` — presenter view: sidebar, header and secondary controls hidden, larger text,
  and each chapter's main figure sized to fit a 1280x720 (and 1920x1080) screen unscrolled.
"""

from __future__ import annotations

import streamlit as st

from app.tour.chapters import CHAPTERS
from app.tour.common import Chapter, Ctx

QP_CHAPTER = "chapter"
QP_PRESENT = "present"
W_PRESENT = "tour.w.present"
W_CHAPTER = "tour.w.chapter"

# Presenter view: the main figure is at most this tall, placed at the top of the right-hand
# column, so it ends above the fold at 720 px (the browser test checks it).
PRESENT_FIG_HEIGHT = 440
NORMAL_FIG_HEIGHT = 460

PRESENTER_CSS = """
<style>
section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"],
[data-testid="stExpandSidebarButton"], header[data-testid="stHeader"],
[data-testid="stToolbar"], [data-testid="stDecoration"] { display: none !important; }
[data-testid="stMainBlockContainer"], .block-container {
  padding-top: 0.8rem !important; padding-bottom: 0.5rem !important; max-width: 100% !important;
  padding-left: 2rem !important; padding-right: 2rem !important;
}
[data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li {
  font-size: 1.2rem !important; line-height: 1.4 !important;
}
[data-testid="stCaptionContainer"] p { font-size: 1.05rem !important; }
h2 { font-size: 2.1rem !important; padding-top: 0.2rem !important; }
[data-testid="stMetricValue"] { font-size: 2.2rem !important; }
[data-testid="stAlert"] p { font-size: 1.3rem !important; }
</style>
"""


def chapter_keys() -> list[str]:
    return [c.key for c in CHAPTERS]


def current_key() -> str:
    key = st.query_params.get(QP_CHAPTER)
    return key if key in chapter_keys() else CHAPTERS[0].key


def is_present() -> bool:
    return st.query_params.get(QP_PRESENT, "0").lower() in ("1", "true", "yes")


def go_to(key: str) -> None:
    st.query_params[QP_CHAPTER] = key


def _step(delta: int) -> None:
    keys = chapter_keys()
    i = keys.index(current_key())
    go_to(keys[max(0, min(len(keys) - 1, i + delta))])


def _sync_present() -> None:
    if st.session_state.get(W_PRESENT):
        st.query_params[QP_PRESENT] = "1"
    elif QP_PRESENT in st.query_params:
        del st.query_params[QP_PRESENT]


def _sync_chapter() -> None:
    go_to(st.session_state[W_CHAPTER])


def _nav_bar(chapter: Chapter, present: bool) -> None:
    keys = chapter_keys()
    i = keys.index(chapter.key)
    prev_col, where, next_col, toggle_col = st.columns(
        [1.2, 5, 1.2, 1.6], vertical_alignment="center"
    )
    prev_col.button(
        "← Previous",
        key="tour.prev",
        on_click=_step,
        args=(-1,),
        disabled=i == 0,
        width="stretch",
    )
    where.markdown(f"**{i + 1} / {len(keys)}** · {chapter.title}")
    next_col.button(
        "Next →",
        key="tour.next",
        on_click=_step,
        args=(1,),
        disabled=i == len(keys) - 1,
        width="stretch",
        type="primary",
    )
    # the toggle follows the URL (a link with present=1 opens in presenter view)
    st.session_state[W_PRESENT] = present
    toggle_col.toggle("Presenter view", key=W_PRESENT, on_change=_sync_present)


def _sidebar(chapter: Chapter) -> None:
    with st.sidebar:
        st.session_state[W_CHAPTER] = chapter.key
        st.radio(
            "Chapters",
            chapter_keys(),
            format_func=lambda k: next(c.title for c in CHAPTERS if c.key == k),
            key=W_CHAPTER,
            on_change=_sync_chapter,
        )
        st.caption("Tip: add `?present=1` to the address for the presenter view.")


def main() -> None:
    present = is_present()
    chapter = next(c for c in CHAPTERS if c.key == current_key())
    if present:
        st.html(PRESENTER_CSS)
    else:
        st.title("A guided tour of dynamic networks")
        st.caption(
            "Some inputs are easy and some are hard. A dynamic network spends less compute on "
            "the easy ones. Step through the chapters; every figure runs on a bundled model."
        )
        _sidebar(chapter)
    _nav_bar(chapter, present)
    ctx = Ctx(present=present, fig_height=PRESENT_FIG_HEIGHT if present else NORMAL_FIG_HEIGHT)
    chapter.show(ctx)
