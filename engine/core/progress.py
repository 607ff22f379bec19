"""How long work says how far it has got: the engine calls ``progress(done, total, label)``.

The engine only reports; the caller decides how it shows: ``Bars`` draws one tqdm bar per label
on stderr (rate and time left) for the command line, the app's adapter (``app/progress.py``)
draws ``st.progress``, ``silent`` shows nothing. One label is one bar: ``done`` rises from 0 to
``total`` under it, and a new label starts a new bar (e.g. one per epoch).

Numbers about the work (the epoch's running loss, its validation score) go beside the bar
through ``show`` / ``Meter``: tqdm's postfix on a terminal, where the closed bar keeps them, and
one line per bar when stderr is not a terminal, so a log still has every epoch's loss. A sink
that cannot show them (the app's bar, ``silent``, a test's lambda) ignores them.
"""

from __future__ import annotations

import sys
from collections import deque
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
        self.quiet = quiet
        self.disable = True if quiet else None
        self.file = file
        self.bars: dict[str, tqdm] = {}
        self.shown: dict[str, dict[str, float]] = {}  # label -> the numbers beside its bar

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
            drawn = not bar.disable  # (close disables it)
            bar.close()  # tqdm leaves a closed bar on the terminal, its postfix with it
            del self.bars[label]
            shown = self.shown.pop(label, None)
            if shown and not drawn:  # not a terminal: the numbers as a line of the log
                self.line(label, shown)

    def show(self, label: str, values: dict[str, float]) -> None:
        """``values`` beside bar ``label``; after the bar closed (a score computed once the
        epoch is over), as a line of their own."""
        bar = self.bars.get(label)
        if bar is None:
            self.line(label, values)
            return
        self.shown[label] = {**self.shown.get(label, {}), **values}
        bar.set_postfix(self.shown[label], refresh=False)  # drawn with the bar's next update

    def line(self, label: str, values: dict[str, float]) -> None:
        if not self.quiet:
            text = ", ".join(f"{k}={tqdm.format_num(v)}" for k, v in values.items())
            tqdm.write(f"{label}: {text}", file=self.file or sys.stderr)


def terminal(quiet: bool = False) -> Progress:
    """What a command-line entry point reports to (``--quiet``: nothing)."""
    return silent if quiet else Bars()


def show(progress: Progress | None, label: str, **values: float) -> None:
    """Numbers about the work under bar ``label`` (``loss=0.31``), where the sink can show
    them (its ``show`` method); every other sink ignores them."""
    sink = getattr(progress, "show", None)
    if sink is not None:
        sink(label, {k: float(v) for k, v in values.items()})


class Meter:
    """Running means of a loop's numbers, shown beside its bar after every ``add``: the epoch's
    loss so far, or with ``window`` the mean of the last ``window`` steps (one bar of steps,
    where the mean since the start would hide the progress).

    ``meter.add(len(batch), loss=loss.item())`` weighs each step by its batch size."""

    def __init__(self, progress: Progress | None, label: str, window: int | None = None):
        self.progress, self.label, self.window = progress, label, window
        self.parts: dict[str, deque[tuple[float, float]]] = {}
        self.sums: dict[str, list[float]] = {}  # key -> [sum of value * weight, sum of weight]

    def add(self, weight: float = 1.0, **values: float) -> None:
        for k, v in values.items():
            part, acc = self.parts.setdefault(k, deque()), self.sums.setdefault(k, [0.0, 0.0])
            part.append((float(v) * weight, weight))
            acc[0], acc[1] = acc[0] + float(v) * weight, acc[1] + weight
            if self.window is None:
                part.clear()  # nothing leaves a mean since the start
            elif len(part) > self.window:
                vw, w = part.popleft()
                acc[0], acc[1] = acc[0] - vw, acc[1] - w
        show(self.progress, self.label, **self.means)

    @property
    def means(self) -> dict[str, float]:
        return {k: vw / w if w > 0 else float("nan") for k, (vw, w) in self.sums.items()}


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
