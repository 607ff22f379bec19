"""Models: each is ``<model_id>.safetensors`` plus a JSON model card, bundled in
``assets/models/`` or brought by the user (``paths.user_models_dir()``, written only through
``save_user_model``).

The card says which model family builds the network (``module``, always under
``engine.families``), with what ``config``, on which data, how it was trained, and the SHA-256 of
the weights file, which is checked on every load. Adding a model means adding two files; no code
here changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.paths import MODELS_DIR, user_models_dir

# Checkpoint formats that unpickle (run code) when read: refused by every loader, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def pickled_files(folder: Path) -> list[str]:
    """Names of the pickled checkpoints in ``folder``, sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if is_pickle(p))


MODEL_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # a file stem on every OS


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
    user: bool = False  # brought by the user, not bundled

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


def _read_card(path: Path, user: bool = False) -> ModelCard:
    try:
        raw = json.loads(path.read_text())
        module = raw["module"]
        if not module.startswith("engine.families."):
            raise RegistryError(
                f"{path.name}: module must live under engine.families, got {module}"
            )
        return ModelCard(
            raw["model_id"], raw["family"], module, raw.get("config", {}), raw, path, user
        )
    except (KeyError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path.name}: malformed model card ({e})") from None


def _dirs(models_dir: Path | None) -> list[tuple[Path, bool]]:
    return (
        [(MODELS_DIR, False), (user_models_dir(), True)]
        if models_dir is None
        else [(Path(models_dir), False)]
    )


def list_cards(family: str | None = None, models_dir: Path | None = None) -> list[ModelCard]:
    """Every model card (optionally of one family): the bundled ones, then the user's, each
    sorted by model id; ``models_dir`` reads one folder only. A broken user card is skipped
    (it must not hide the bundled models); a broken bundled card raises."""
    cards = []
    for d, user in _dirs(models_dir):
        for p in sorted(d.glob("*.json")):
            try:
                cards.append(_read_card(p, user))
            except RegistryError:
                if not user:
                    raise
    return [c for c in cards if family is None or c.family == family]


def get_card(model_id: str, models_dir: Path | None = None) -> ModelCard:
    for d, user in _dirs(models_dir):
        path = d / f"{model_id}.json"
        if path.exists():
            return _read_card(path, user)
    known = ", ".join(c.model_id for c in list_cards(models_dir=models_dir)) or "none"
    raise RegistryError(f"no model {model_id!r} (known: {known})")


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, so a crash leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_new_model_id(model_id: str, overwrite: bool = False) -> Path:
    """Where a new user model's card would go; raises what ``save_user_model`` would refuse
    (an unsafe or bundled id, an existing model without ``overwrite``), so a caller can refuse
    before minutes of training."""
    if not MODEL_ID.fullmatch(model_id):
        raise RegistryError(
            f"model id {model_id!r}: use 1-64 lower-case letters, digits, '_', '-' or '.'"
        )
    if (MODELS_DIR / f"{model_id}.json").exists():
        raise RegistryError(f"{model_id!r} is a bundled model; choose another name")
    card_path = user_models_dir() / f"{model_id}.json"
    if card_path.exists() and not overwrite:
        raise RegistryError(
            f"a user model {model_id!r} exists already ({card_path}); pass --overwrite to "
            "replace it"
        )
    return card_path


def save_user_model(
    raw: dict, tensors: dict[str, torch.Tensor] | None = None, overwrite: bool = False
) -> ModelCard:
    """Add a user's model to the user model folder: its card (``raw``, with ``model_id``,
    ``family``, ``module``, ``config``) and, when given, its weights as safetensors (their
    SHA-256 goes into the card). A bundled id is never shadowed; an existing user model is
    replaced only with ``overwrite``, and the card is written last, so a failed save leaves
    the folder as it was."""
    from safetensors.torch import save_file

    model_id = str(raw.get("model_id", ""))
    card_path = check_new_model_id(model_id, overwrite)
    raw = {**raw, "user": True}
    if tensors is not None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        weights = card_path.with_suffix(".safetensors")
        _atomic_write(weights, lambda p: save_file(tensors, str(p)))
        raw["weights_sha256"] = sha256_file(weights)
    _atomic_write(card_path, lambda p: p.write_text(json.dumps(raw, indent=2) + "\n"))
    card = _read_card(card_path, user=True)
    return card


def verified_weights(card: ModelCard) -> dict[str, torch.Tensor]:
    """The card's weights, after checking their SHA-256 against the card (safetensors only)."""
    expected = card.raw.get("weights_sha256")
    if not card.weights_path.exists():
        raise RegistryError(f"{card.weights_path.name} is missing")
    actual = sha256_file(card.weights_path)
    if expected != actual:
        raise RegistryError(
            f"{card.weights_path.name}: SHA-256 {actual[:12]}… does not match the card's "
            f"{str(expected)[:12]}… (weights changed without retraining the card)"
        )
    return load_file(card.weights_path)
