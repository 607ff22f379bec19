"""Read a page's setting from the URL, so links (the tour's "go deeper") reopen it exactly.

A malformed or out-of-range value is ignored in favour of the default: a link can never break a
page.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st


def float_param(
    name: str,
    default: float,
    options: Sequence[float] | None = None,
    lo: float | None = None,
    hi: float | None = None,
) -> float:
    """``?name=value`` as a float; snapped to the nearest of ``options`` or clipped to [lo, hi]."""
    raw = st.query_params.get(name)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return default
    if value != value:  # NaN
        return default
    if options:
        return min(options, key=lambda o: abs(o - value))
    if lo is not None:
        value = max(lo, value)
    if hi is not None:
        value = min(hi, value)
    return value


def choice_param(name: str, default: str, options: Sequence[str]) -> str:
    raw = st.query_params.get(name)
    return raw if raw in options else default
