"""The tour's chapters, found in this package: every module defines ``CHAPTER``
(``app.tour.common.Chapter``) with an ``order``, so adding a chapter is adding one file.

Each chapter is one family's (or one idea's): a plain explanation, the defining paper and its
headline result, one live control on a bundled model, one figure, and a "go deeper" link into
the full page with the same setting. A chapter whose model is not bundled says so in one line
and shows nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from app.tour.common import Chapter


def _discover() -> list[Chapter]:
    found = []
    for m in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{m.name}")
        chapter = getattr(module, "CHAPTER", None)
        if not isinstance(chapter, Chapter):
            raise TypeError(f"app/tour/chapters/{m.name}.py defines no CHAPTER = Chapter(...)")
        found.append(chapter)
    found.sort(key=lambda c: c.order)
    for attr in ("key", "order"):
        values = [getattr(c, attr) for c in found]
        if len(set(values)) < len(values):
            raise ValueError(f"two chapters share a {attr}: {values}")
    return found


CHAPTERS: list[Chapter] = _discover()
