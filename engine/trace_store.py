"""Where traces live: bundled in assets/traces/, or built on first use and cached.

``load_trace(model_id)`` is what the app calls. Bundled files are read-only; traces built here
go to the cache directory (``AIE_CACHE_DIR``, default ``.cache/``) and are reused afterwards,
except those of the user's own models, which go beside them (``paths.user_traces_dir()``) and
survive a cleared cache.
"""

from __future__ import annotations

from pathlib import Path

from engine import families
from engine.core.progress import Progress
from engine.core.trace import Trace, read_parquet
from engine.paths import TRACES_DIR, cache_dir, user_traces_dir
from engine.registry import get_card


def trace_file(model_id: str, split: str = "test") -> Path:
    return TRACES_DIR / f"{model_id}__{split}.parquet"


def cached_trace_file(model_id: str, split: str = "test") -> Path:
    return cache_dir() / "traces" / f"{model_id}__{split}.parquet"


def user_trace_file(model_id: str, split: str = "test") -> Path:
    return user_traces_dir() / f"{model_id}__{split}.parquet"


def available_traces() -> list[tuple[str, str]]:
    """(model_id, split) of every trace on disk, bundled, the user's or cached."""
    found = set()
    for d in (TRACES_DIR, user_traces_dir(), cache_dir() / "traces"):
        for p in d.glob("*__*.parquet"):
            model_id, split = p.stem.rsplit("__", 1)
            found.add((model_id, split))
    return sorted(found)


def load_trace(
    model_id: str,
    split: str = "test",
    build_if_missing: bool = True,
    progress: Progress | None = None,
) -> Trace:
    """The bundled trace, else the cached one, else build it with the model's family (the
    families whose results are traces implement ``trace(card, split)``), reporting to
    ``progress``."""
    paths = (
        trace_file(model_id, split),
        user_trace_file(model_id, split),
        cached_trace_file(model_id, split),
    )
    for path in paths:
        if path.exists():
            return read_parquet(path, model_id)
    if not build_if_missing:
        raise FileNotFoundError(f"no trace for {model_id} ({split})")
    card = get_card(model_id)
    fam = families.get(card.family)
    if not fam.traces:
        raise FileNotFoundError(f"no trace for {model_id} and its family cannot build one")
    trace = fam.trace(card, split, progress=progress)
    out = user_trace_file(model_id, split) if card.user else cached_trace_file(model_id, split)
    trace.write_parquet(out)
    return trace
