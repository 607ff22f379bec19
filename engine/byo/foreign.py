"""Way in: per-token exit traces from another tool (CALM-style arrays, per-token LM traces)."""

from __future__ import annotations

import argparse

COMMAND = "trace"
HELP = "per-token exit traces from another tool (CALM-style arrays, per-token LM traces)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError
