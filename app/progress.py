"""The page's side of ``engine.core.progress``: long work drawn as ``st.progress`` in an
``st.status`` box, its text saying how far it has got and how long is left.

The time left is tqdm's own estimate (``tqdm.format_meter``, the command line's meter), timed
from the moment each label started, so a page and a terminal say the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import streamlit as st
from tqdm import tqdm

METER = "{desc}: {percentage:.0f}% · {elapsed} so far, about {remaining} left"
STARTING = "{desc}: starting…"


def meter(done: float, total: float, elapsed: float, label: str) -> str:
    """``label: 40% · 00:04 so far, about 00:06 left`` (tqdm's formatter)."""
    fmt = METER if done > 0 else STARTING
    return tqdm.format_meter(done, total or None, elapsed, prefix=label, bar_format=fmt)


class PageBar:
    """A ``Progress`` (done, total, label) drawn on one ``st.progress``."""

    def __init__(self, text: str = ""):
        self.bar = st.progress(0.0, text=text or "starting…")
        self.started: dict[str, float] = {}
        self.values: dict[str, dict[str, float]] = {}
        self.last: tuple[float, float, str] | None = None

    def __call__(self, done: float, total: float, label: str) -> None:
        now = time.monotonic()
        t0 = self.started.setdefault(label, now)
        fraction = min(1.0, max(0.0, done / total)) if total else 0.0
        text = meter(done, total, now - t0, label)
        if self.values.get(label):  # the loss so far, as the command line's postfix shows it
            text += " · " + ", ".join(
                f"{k}={tqdm.format_num(v)}" for k, v in self.values[label].items()
            )
        self.bar.progress(fraction, text=text)
        self.last = (done, total, label)

    def show(self, label: str, values: dict[str, float]) -> None:
        """``engine.core.progress.show``: numbers beside bar ``label`` (an epoch's loss)."""
        self.values[label] = {**self.values.get(label, {}), **values}
        if self.last is not None and self.last[2] == label:
            self(*self.last)

    def report(self, what: str, fraction: float) -> None:
        """The ``report(what, fraction)`` form (``engine.byo.hf``): one clock for the whole bar,
        ``what`` in front."""
        now = time.monotonic()
        t0 = self.started.setdefault("", now)
        fraction = min(1.0, max(0.0, float(fraction)))
        self.bar.progress(fraction, text=meter(fraction, 1.0, now - t0, what))

    def empty(self) -> None:
        """Remove the bar (the work is done and its result is on the page)."""
        self.bar.empty()


@contextlib.contextmanager
def status(label: str, done: str | None = None) -> Iterator[PageBar]:
    """``with status("Building the trace…") as bar: work(progress=bar)``: an open status box
    with the bar while the work runs, collapsed to ``done`` (and the time it took) after, marked
    as failed if the work raises."""
    t0 = time.monotonic()
    with st.status(label, expanded=True) as box:
        bar = PageBar(label)
        try:
            yield bar
        except Exception:
            box.update(label=f"{label} failed", state="error", expanded=False)
            raise
        took = tqdm.format_interval(time.monotonic() - t0)
        box.update(label=f"{done or label} ({took})", state="complete", expanded=False)
