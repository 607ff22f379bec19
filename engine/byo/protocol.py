"""Way in: a PyTorch model in your own Python file (stages + one exit head per stage)."""

from __future__ import annotations

import argparse

COMMAND = "torch"
HELP = "a PyTorch model in your own Python file (stages + one exit head per stage)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError
