"""Fixtures shared by the app tests: a synthetic multi-exit trace and small helpers."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from engine.core.trace import Trace, TraceMeta

SYNTH_ID = "synthetic_app_test"


def make_trace(
    n: int = 1500, k: int = 4, c: int = 10, seed: int = 0, model_id: str = SYNTH_ID
) -> Trace:
    """A plausible early-exit trace: later exits are more often right and more confident."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, c, n).astype(np.int64)
    difficulty = rng.uniform(0, 1, n)
    logits = rng.normal(0, 1, (n, k, c))
    for e in range(k):
        skill = (e + 1) / k * 6.0 - 4.0 * difficulty
        logits[np.arange(n), e, label] += skill + rng.normal(0, 0.7, n)
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs = (probs / probs.sum(axis=2, keepdims=True)).astype(np.float32)
    per_exit = np.array([1.0, 2.0, 3.0, 4.0][:k] + [4.0 + i for i in range(max(0, k - 4))])
    cost = np.tile(np.cumsum(per_exit) * 1e6, (n, 1))
    meta = TraceMeta(
        model_id=model_id,
        exit_names=tuple(f"stage {e + 1}" for e in range(k)),
        class_names=tuple(f"class {j}" for j in range(c)),
        dataset="synthetic",
        split="test",
    )
    return Trace(meta, np.arange(n, dtype=np.int64), label, probs, cost)


def png_bytes(size: int = 28, seed: int = 0, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size), dtype=np.uint8)
    s = size // 4
    arr[s : size - s, size // 2 - s // 2 : size // 2 + s // 2 + 1] = 255  # a "1"
    arr = np.clip(arr.astype(int) + rng.integers(0, 20, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "L").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- a live image model for the inspector when no bundled one exists ------------------------------


def bundled_image_model(
    preferred: tuple[str, ...] = ("digits", "mnist", "fashion_mnist"),
) -> str | None:
    """A bundled image model with a test trace on disk (the real thing), if there is one."""
    from engine.data.images import DATASETS, available
    from engine.registry import RegistryError, list_cards
    from engine.trace_store import trace_file

    try:
        cards = list_cards()
    except RegistryError:
        return None
    cards = sorted(cards, key=lambda c: c.family != "multi_exit_cnn")  # the canonical family first
    for dataset in preferred:
        for card in cards:
            if (
                card.dataset == dataset
                and card.dataset in DATASETS
                and trace_file(card.model_id).exists()
                and card.weights_path.exists()
                and available(dataset)
            ):
                return card.model_id
    return None


def install_fake_image_model(monkeypatch, tmp_path, model_id: str = "fake_digits_cnn") -> str:
    """An untrained multi-exit CNN on digits, registered via a temporary models directory.

    Writes its card and weights under tmp_path/models and a synthetic trace with the digits
    test labels to the trace cache (AIE_CACHE_DIR must point at a temp dir); the registry's
    lookups are redirected there for this test only.
    """
    import torch

    import engine.registry as registry
    from engine import families
    from engine.core.training import save_model
    from engine.data.images import load
    from engine.families.multi_exit_cnn import model as multi_exit_cnn

    models = tmp_path / "models"
    torch.manual_seed(0)
    config = {"num_classes": 10, "widths": [8, 8, 16, 16], "strides": [2, 2, 2, 1]}
    model = multi_exit_cnn.build(config)
    card = {
        "model_id": model_id,
        "title": "Fake digits CNN",
        "family": "multi_exit_cnn",
        "module": "engine.families.multi_exit_cnn.model",
        "config": config,
        "dataset": "digits",
        "split": "test",
        "class_names": [str(i) for i in range(10)],
    }
    save_model(model, card, models)
    get_card, load_model = registry.get_card, families.load_model
    monkeypatch.setattr(registry, "get_card", lambda mid, models_dir=models: get_card(mid, models))
    monkeypatch.setattr(
        registry, "load_model", lambda mid, models_dir=models: load_model(mid, models)
    )
    ds = load("digits", "test")
    t = make_trace(n=len(ds), k=4, c=10, model_id=model_id)
    from dataclasses import replace

    from engine.trace_store import cached_trace_file

    t = replace(t, label=ds.labels.astype(np.int64))
    t.write_parquet(cached_trace_file(model_id))
    return model_id
