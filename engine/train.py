"""``python -m engine.train FAMILY [options]``: trains one model family and writes its card.

Each family's trainer is ``engine/families/<family>/train.py`` with ``main(argv: list[str])``.
"""

from __future__ import annotations

import importlib
import sys

from engine.families import family_names


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    names = family_names(trainable=True)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m engine.train FAMILY [options]\nfamilies: {', '.join(names)}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(f"engine.families.{argv[0]}.train").main(argv[1:])


if __name__ == "__main__":
    main()
