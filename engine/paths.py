"""Every place the engine reads or writes, in one module.

Bundled files live under ``assets/`` (read-only at run time); what is built here goes to the
cache directory (``AIE_CACHE_DIR``, default ``.cache/`` in the checkout); what a user saves
(policies, their own models) goes to the data directory (``AIE_DATA_DIR``). The two variables
are read at call time, so tests can point them at temporary directories.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
MODELS_DIR = ASSETS / "models"  # <model_id>.safetensors + <model_id>.json (the card)
# read-outs trained for a model (tuned lenses), cards alike; not models, so not in the registry
LENSES_DIR = MODELS_DIR / "lenses"
TRACES_DIR = ASSETS / "traces"  # <model_id>__<split>.parquet: multi-exit traces
RECORDS_DIR = TRACES_DIR / "records"  # per-family records and results, Parquet
GALLERY_DIR = ASSETS / "gallery"  # a few test images per data set, for installs without data


def cache_dir() -> Path:
    """Derived data (converted data sets, traces built here); safe to delete."""
    d = Path(os.environ.get("AIE_CACHE_DIR", ROOT / ".cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def data_dir() -> Path:
    """What the user saved: policies, and anything that must survive a restart."""
    d = Path(
        os.environ.get(
            "AIE_DATA_DIR", Path.home() / ".local" / "share" / "adaptive-inference-explorer"
        )
    )
    d.mkdir(parents=True, exist_ok=True)
    return d


def user_models_dir() -> Path:
    """Models a user brought (``python -m engine.byo``): cards and weights, listed beside the
    bundled ones and kept across restarts."""
    d = data_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def user_traces_dir() -> Path:
    """Traces and results of the user's models (derived, but expensive: kept with the models)."""
    d = data_dir() / "traces"
    d.mkdir(parents=True, exist_ok=True)
    return d


def user_lenses_dir() -> Path:
    """Tuned lenses trained for the user's causal LMs (cards alike, ``<model_id>_tuned_lens``),
    beside their models but outside the registry's scan: read-outs of a model, not models."""
    d = user_models_dir() / "lenses"
    d.mkdir(parents=True, exist_ok=True)
    return d
