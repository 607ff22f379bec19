"""``python -m engine.train FAMILY [options]``: trains one model family and writes its card.

Each family's trainer is ``engine/training/<family>.py`` with ``main(argv: list[str])``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import engine.training


def families() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(engine.training.__path__) if m.name != "common"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in families():
        print(f"usage: python -m engine.train FAMILY [options]\nfamilies: {', '.join(families())}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(f"engine.training.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
