"""The saved-policy store: round trips, atomic replacement, clear errors."""

from __future__ import annotations

import json

import pytest

from engine.core.policies import Policy
from engine.paths import data_dir
from engine.policy_store import PolicyStore, PolicyStoreError, SavedPolicy


def test_save_list_get_delete_round_trip(tmp_path):
    store = PolicyStore(tmp_path)
    p = Policy("per_exit", thresholds=(0.9, 0.8, 1.0))
    store.save("fast", "mnist", p, {"accuracy": 0.97})
    store.save("safe", "fashion", Policy("max_prob", threshold=0.99))
    again = PolicyStore(tmp_path)  # a new process reads the same file
    assert again.names() == ["fast", "safe"]
    assert again.names("mnist") == ["fast"]
    got = again.get("fast")
    assert got.policy == p and got.metrics == {"accuracy": 0.97} and got.saved
    again.delete("fast")
    assert PolicyStore(tmp_path).names() == ["safe"]
    with pytest.raises(KeyError):
        again.get("fast")
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind


def test_overwrite_and_names(tmp_path):
    store = PolicyStore(tmp_path)
    store.save("a", "m", Policy("patience", patience=2))
    with pytest.raises(PolicyStoreError, match="already exists"):
        store.save("a", "m", Policy("patience", patience=1), overwrite=False)
    store.save("a", "m", Policy("patience", patience=1))
    assert store.get("a").policy.patience == 1
    for bad in ("", "   ", "x" * 200, "../etc/passwd", "a/b"):
        with pytest.raises(PolicyStoreError):
            store.save(bad, "m", Policy("patience", patience=1))


def test_json_export_import(tmp_path):
    sp = SavedPolicy("shared one", "mnist", Policy("entropy", threshold=0.25), {"speedup": 2.0})
    back = SavedPolicy.from_json(sp.to_json())
    assert back == sp
    for bad, msg in (
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"name": "x"}).encode(), "policy"),
        (json.dumps({"name": "x", "policy": {"kind": "nope"}}).encode(), "unknown policy kind"),
        (json.dumps({"name": "x", "policy": {"kind": "max_prob"}}).encode(), "needs"),
    ):
        with pytest.raises(PolicyStoreError, match=msg):
            SavedPolicy.from_json(bad)


def test_corrupt_store_is_reported_and_bad_entries_skipped(tmp_path):
    store = PolicyStore(tmp_path)
    store.path.write_text("{ half a file")
    with pytest.raises(PolicyStoreError, match="not a readable policy store"):
        store.list()
    store.path.write_text(
        json.dumps(
            {
                "policies": {
                    "ok": SavedPolicy("ok", "m", Policy("fixed", exit=1)).to_dict(),
                    "bad": {"name": "bad", "policy": {"kind": "?"}},
                }
            }
        )
    )
    assert store.names() == ["ok"]


def test_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "d"))
    assert data_dir() == tmp_path / "d" and (tmp_path / "d").is_dir()
    assert PolicyStore().path == tmp_path / "d" / "policies.json"
