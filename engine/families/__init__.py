"""Every family of dynamic network, found by its folder: ``engine/families/<name>/family.py``.

This is the list the app, the compare page, the results CLI, the trainer dispatch and the
registry read; nothing else names a family in code.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from torch import nn

from engine.core.family import Family, FamilyError
from engine.registry import ModelCard, get_card, list_cards


@cache
def all_families() -> tuple[Family, ...]:
    found = []
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.ispkg:
            continue
        try:
            module = importlib.import_module(f"{__name__}.{m.name}.family")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{m.name}.family":
                continue  # a folder without family.py is not a family (yet)
            raise
        fam = module.FAMILY
        if fam.name != m.name:
            raise FamilyError(f"engine/families/{m.name}: FAMILY.name is {fam.name!r}")
        found.append(fam)
    return tuple(found)


def get(name: str) -> Family:
    for fam in all_families():
        if fam.name == name:
            return fam
    known = ", ".join(f.name for f in all_families())
    raise FamilyError(f"unknown model family {name!r} (known: {known})")


def family_names(trainable: bool = False) -> list[str]:
    return [f.name for f in all_families() if not trainable or f.trainer]


def build(card: ModelCard) -> nn.Module:
    """An untrained network of the card's family and config."""
    return get(card.family).build(card.config)


def load_model(model_id: str, models_dir=None) -> nn.Module:
    """The card's network ready to run, as its family loads it (by default: built from the
    config with the SHA-checked weights), eval mode."""
    card = get_card(model_id, models_dir)
    return get(card.family).load(card)


def cards_of_kind(*kinds: str, dataset: str | None = None) -> list[tuple[ModelCard, Family]]:
    """Bundled models whose family is of one of ``kinds`` (optionally on one data set), by
    family and then the family's own order (e.g. ACT by ponder cost)."""

    out = []
    for card in list_cards():
        try:
            fam = get(card.family)
        except FamilyError:
            continue
        if fam.kind in kinds and (dataset is None or card.dataset == dataset):
            out.append((card, fam))
    out.sort(key=lambda cf: (cf[1].name, cf[1].sort_key(cf[0]), cf[0].model_id))
    return out
