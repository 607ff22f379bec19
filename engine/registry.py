"""Bundled models: each is ``assets/models/<model_id>.safetensors`` plus a JSON model card.

The card says which model family builds the network (``module``, under
``engine.models`` or ``engine.families``), with what ``config``, on which data, how it was trained, and the SHA-256 of
the weights file, which is checked on every load. Adding a model means adding two files; no code
here changes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODELS_DIR = ASSETS / "models"


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelCard:
    model_id: str
    family: str
    module: str
    config: dict
    raw: dict  # the whole card as written (data set, seed, command, metrics, ...)
    path: Path

    @property
    def weights_path(self) -> Path:
        return self.path.with_suffix(".safetensors")

    @property
    def dataset(self) -> str:
        return self.raw.get("dataset", "unknown")

    @property
    def title(self) -> str:
        return self.raw.get("title", self.model_id)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_card(path: Path) -> ModelCard:
    try:
        raw = json.loads(path.read_text())
        module = raw["module"]
        if not module.startswith(("engine.models.", "engine.families.")):
            raise RegistryError(
                f"{path.name}: module must live under engine.models or engine.families, got {module}"
            )
        return ModelCard(raw["model_id"], raw["family"], module, raw.get("config", {}), raw, path)
    except (KeyError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path.name}: malformed model card ({e})") from None


def list_cards(family: str | None = None, models_dir: Path = MODELS_DIR) -> list[ModelCard]:
    """Every bundled model card (optionally of one family), sorted by model id."""
    cards = [_read_card(p) for p in sorted(models_dir.glob("*.json"))]
    return [c for c in cards if family is None or c.family == family]


def get_card(model_id: str, models_dir: Path = MODELS_DIR) -> ModelCard:
    path = models_dir / f"{model_id}.json"
    if not path.exists():
        known = ", ".join(c.model_id for c in list_cards(models_dir=models_dir)) or "none"
        raise RegistryError(f"no bundled model {model_id!r} (known: {known})")
    return _read_card(path)


def build(card: ModelCard) -> torch.nn.Module:
    """An untrained network of the card's family and config."""
    return importlib.import_module(card.module).build(card.config)


def load_model(model_id: str, models_dir: Path = MODELS_DIR) -> torch.nn.Module:
    """Build the network, verify the weights' SHA-256 against the card, load them, eval mode."""
    card = get_card(model_id, models_dir)
    expected = card.raw.get("weights_sha256")
    if not card.weights_path.exists():
        raise RegistryError(f"{card.weights_path.name} is missing")
    actual = sha256_file(card.weights_path)
    if expected != actual:
        raise RegistryError(
            f"{card.weights_path.name}: SHA-256 {actual[:12]}… does not match the card's "
            f"{str(expected)[:12]}… (weights changed without retraining the card)"
        )
    model = build(card)
    model.load_state_dict(load_file(card.weights_path))
    return model.eval()


@cache
def cached_model(model_id: str) -> torch.nn.Module:
    """Process-wide cache for scripts and benchmarks (the app uses st.cache_resource)."""
    return load_model(model_id)
