"""How long work says how far it has got: the engine calls ``progress(done, total, label)``.

The engine only reports; the caller decides how it shows: ``Bars`` draws one tqdm bar per label
on stderr (rate and time left) for the command line, the app's adapter (``app/progress.py``)
draws ``st.progress``, ``silent`` shows nothing. One label is one bar: ``done`` rises from 0 to
``total`` under it, and a new label starts a new bar (e.g. one per epoch).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

Progress = Callable[[float, float, str], None]  # (done, total, label)
T = TypeVar("T")


def silent(done: float, total: float, label: str) -> None:
    """Shows nothing (tests, library calls that report elsewhere)."""


class Bars:
    """The command line's view: one tqdm bar per label on stderr, none when stderr is not a
    terminal (tqdm's ``disable=None``) or when ``quiet``."""

    def __init__(self, quiet: bool = False, file=None):
        self.disable = True if quiet else None
        self.file = file
        self.bars: dict[str, tqdm] = {}

    def __call__(self, done: float, total: float, label: str) -> None:
        bar = self.bars.get(label)
        if bar is None:
            bar = self.bars[label] = tqdm(
                total=total,
                desc=label,
                file=self.file or sys.stderr,
                disable=self.disable,
                dynamic_ncols=True,
            )
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[label]


def terminal(quiet: bool = False) -> Progress:
    """What a command-line entry point reports to (``--quiet``: nothing)."""
    return silent if quiet else Bars()


def track(
    items: Iterable[T], label: str, progress: Progress | None, total: int | None = None
) -> Iterator[T]:
    """``items``, reporting (0, n) before the first and (i, n) after the i-th."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    n = len(items) if total is None else total
    if progress is None or n <= 0:
        yield from items
        return
    progress(0, n, label)
    for i, item in enumerate(items, 1):
        yield item
        progress(min(i, n), n, label)
