"""The router's side of page state: which page a session has open, and a guard for deep links.

Every page is run by ``streamlit_app.py`` (``st.navigation``). The router reports each full run
with :func:`opened`; a run on another page than the last one starts a new *visit*, and the
URL's settings are applied once per visit (see ``app/widgets.py``), so a link reopens exactly
while the URL echoed back during a burst of slider moves never overrides the widgets.
"""

from __future__ import annotations

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

PAGE = "aie.page"  # url path of the page the last full run showed
VISIT = "aie.visit"  # increments each time a session opens a page


def opened(url_path: str) -> None:
    """Router hook, called on every full run before the page runs."""
    ss = st.session_state
    if ss.get(PAGE) != url_path:
        ss[PAGE] = url_path
        ss[VISIT] = ss.get(VISIT, 0) + 1


def visit() -> int:
    """The current visit (0 when a page runs without the router, as in AppTest)."""
    return st.session_state.get(VISIT, 0)


def require_router() -> None:
    """Rerun through the router when Streamlit ran this page on its own.

    With a ``pages/`` folder beside the entry script, Streamlit 1.67 starts in its legacy
    folder mode: until some session has run the entry script (``st.navigation`` switches the
    mode off for the whole server), a deep link such as ``/tuning`` runs ``pages/tuning.py``
    alone and every session's sidebar lists file names. Each page calls this first: it ends the
    legacy mode (what ``st.navigation`` does) and reruns, so the router runs this and every
    later session. There is no config option for it; the folder layout is fixed.
    """
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()
