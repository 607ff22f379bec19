"""``python -m engine.byo {hf,torch,trace} ...``: one command per way in (see each ``--help``).

Each way in is one module with ``COMMAND``, ``HELP``, ``add_arguments(parser)`` and
``main(args) -> int``; a problem with the user's files is one sentence on stderr and exit code 2,
never a traceback, and nothing already saved is replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys

from engine.byo import ByoError, foreign, hf, protocol
from engine.registry import RegistryError

WAYS_IN = (hf, protocol, foreign)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.byo",
        description="Add your own model or trace to the app's model picker (kept in the user "
        "model folder across restarts). Nothing is downloaded; pickled weights are refused.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for way in WAYS_IN:
        way.add_arguments(sub.add_parser(way.COMMAND, help=way.HELP, description=way.HELP))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    way = next(w for w in WAYS_IN if w.COMMAND == args.command)
    try:
        return way.main(args)
    except (ByoError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
