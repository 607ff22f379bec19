"""Saved exit policies: a small JSON file under the data directory, written atomically.

A saved policy is a name, the model (trace) it was tuned on, the policy itself
(``Policy.to_dict()``) and the numbers it reached when saved. The store is one JSON object
``{"format_version": 1, "policies": {name: entry}}`` in ``policies.json`` under
``AIE_DATA_DIR`` (default ``~/.local/share/adaptive-inference-explorer``). Every write goes to a
temporary file in the same directory and is renamed over the old one, so a crash or a second
writer never leaves half a file; concurrent writers are serialised with an advisory lock.

Export / import use the same entry format, one policy per JSON document::

    {"name": "fast", "model_id": "mnist_multi_exit_cnn",
     "policy": {"kind": "max_prob", "threshold": 0.9}, "metrics": {...}, "saved": "..."}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.policies import Policy, PolicyError
from engine.paths import data_dir

FORMAT_VERSION = 1
FILENAME = "policies.json"
MAX_NAME = 80
_NAME_RE = re.compile(r"^[\w .,:+()\-]+$")


class PolicyStoreError(ValueError):
    """A name, a file or an imported document is not a valid saved policy."""


@dataclass(frozen=True)
class SavedPolicy:
    name: str
    model_id: str
    policy: Policy
    metrics: dict = field(default_factory=dict)
    saved: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model_id": self.model_id,
            "policy": self.policy.to_dict(),
            "metrics": self.metrics,
            "saved": self.saved,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> SavedPolicy:
        if not isinstance(d, dict):
            raise PolicyStoreError("a saved policy is a JSON object")
        for key in ("name", "policy"):
            if key not in d:
                raise PolicyStoreError(f"missing field {key!r}")
        try:
            policy = Policy.from_dict(d["policy"])
        except PolicyError as e:
            raise PolicyStoreError(f"policy: {e}") from None
        metrics = d.get("metrics", {})
        return cls(
            name=check_name(d["name"]),
            model_id=str(d.get("model_id", "")),
            policy=policy,
            metrics=metrics if isinstance(metrics, dict) else {},
            saved=str(d.get("saved", "")),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SavedPolicy:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PolicyStoreError(f"not valid JSON ({e})") from None
        return cls.from_dict(d)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise PolicyStoreError("the name must not be empty")
    name = name.strip()
    if len(name) > MAX_NAME:
        raise PolicyStoreError(f"the name must be at most {MAX_NAME} characters")
    if not _NAME_RE.match(name):
        raise PolicyStoreError("the name may hold letters, digits, spaces and . , : + ( ) - _ only")
    return name


class PolicyStore:
    """Saved policies in ``<root>/policies.json``; every method reads the file afresh."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / FILENAME

    # --- reading ----------------------------------------------------------------------------
    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise PolicyStoreError(f"{self.path} is not a readable policy store ({e})") from None
        pols = doc.get("policies", {}) if isinstance(doc, dict) else None
        if not isinstance(pols, dict):
            raise PolicyStoreError(f"{self.path} is not a policy store")
        return pols

    def list(self, model_id: str | None = None) -> list[SavedPolicy]:
        """Saved policies (optionally only those tuned on ``model_id``), by name."""
        out = []
        for d in self._read().values():
            try:
                sp = SavedPolicy.from_dict(d)
            except PolicyStoreError:
                continue  # one bad entry (hand-edited file) must not hide the others
            if model_id is None or sp.model_id == model_id:
                out.append(sp)
        return sorted(out, key=lambda s: s.name.lower())

    def names(self, model_id: str | None = None) -> list[str]:
        return [s.name for s in self.list(model_id)]

    def get(self, name: str) -> SavedPolicy:
        d = self._read().get(name)
        if d is None:
            raise KeyError(name)
        return SavedPolicy.from_dict(d)

    # --- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        lock = self.root / (FILENAME + ".lock")
        with open(lock, "a+") as f:
            try:
                import fcntl

                fcntl.flock(f, fcntl.LOCK_EX)
            except (ImportError, OSError):  # pragma: no cover - non-POSIX
                pass
            yield

    def _write(self, pols: dict[str, dict]) -> None:
        doc = {"format_version": FORMAT_VERSION, "policies": pols}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".policies.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def save(
        self,
        name: str,
        model_id: str,
        policy: Policy,
        metrics: dict | None = None,
        overwrite: bool = True,
    ) -> SavedPolicy:
        sp = SavedPolicy(
            check_name(name),
            model_id,
            policy,
            dict(metrics or {}),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        return self.put(sp, overwrite)

    def put(self, sp: SavedPolicy, overwrite: bool = True) -> SavedPolicy:
        with self._locked():
            pols = self._read()
            if not overwrite and sp.name in pols:
                raise PolicyStoreError(f"a policy named {sp.name!r} already exists")
            pols[sp.name] = sp.to_dict()
            self._write(pols)
        return sp

    def delete(self, name: str) -> None:
        with self._locked():
            pols = self._read()
            if pols.pop(name, None) is not None:
                self._write(pols)
