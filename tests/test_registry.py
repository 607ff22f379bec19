"""The model registry: bundled cards beside the user's own, and a save that loses nothing."""

from __future__ import annotations

import json

import pytest
import torch

from engine import registry, trace_store
from engine.paths import MODELS_DIR, user_models_dir


@pytest.fixture
def data(monkeypatch, tmp_path):
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def card(model_id="my_model", **kw):
    return {
        "model_id": model_id,
        "family": "multi_exit_cnn",
        "module": "engine.families.multi_exit_cnn.model",
        "config": {},
        **kw,
    }


def test_a_saved_user_model_is_listed_beside_the_bundled_ones_and_found_by_id(data):
    bundled = registry.list_cards()
    assert bundled and not any(c.user for c in bundled)
    saved = registry.save_user_model(card(), {"w": torch.arange(6.0)})
    assert saved.user and saved.path.parent == user_models_dir()
    ids = [c.model_id for c in registry.list_cards()]
    assert ids[: len(bundled)] == [c.model_id for c in bundled] and ids[-1] == "my_model"
    got = registry.get_card("my_model")
    assert got.user and torch.equal(registry.verified_weights(got)["w"], torch.arange(6.0))
    assert [c.model_id for c in registry.list_cards(models_dir=MODELS_DIR)] == [
        c.model_id for c in bundled
    ]


def test_nothing_saved_is_overwritten_without_overwrite(data):
    registry.save_user_model(card(note="first"), {"w": torch.zeros(2)})
    with pytest.raises(registry.RegistryError, match="--overwrite"):
        registry.save_user_model(card(note="second"), {"w": torch.ones(2)})
    got = registry.get_card("my_model")
    assert got.raw["note"] == "first"
    assert torch.equal(registry.verified_weights(got)["w"], torch.zeros(2))
    registry.save_user_model(card(note="second"), {"w": torch.ones(2)}, overwrite=True)
    assert registry.get_card("my_model").raw["note"] == "second"
    assert not [p for p in user_models_dir().iterdir() if p.name.startswith(".")]


def test_bundled_ids_and_unsafe_names_are_refused(data):
    bundled = registry.list_cards()[0].model_id
    with pytest.raises(registry.RegistryError, match="bundled"):
        registry.save_user_model(card(bundled))
    for bad in ("../evil", "Upper", "", "a b"):
        with pytest.raises(registry.RegistryError, match="model id"):
            registry.save_user_model(card(bad))


def test_a_broken_user_card_does_not_hide_the_bundled_models(data):
    (user_models_dir() / "broken.json").write_text("{not json")
    assert len(registry.list_cards()) == len(registry.list_cards(models_dir=MODELS_DIR))


def test_user_traces_live_with_the_user_models(data):
    registry.save_user_model(card())
    path = trace_store.user_trace_file("my_model")
    assert path.parent == data / "traces"
    path.write_bytes(b"")
    assert ("my_model", "test") in trace_store.available_traces()
    assert json.loads(registry.get_card("my_model").path.read_text())["user"] is True
