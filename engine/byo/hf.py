"""Way in: a Hugging Face checkpoint on disk (config.json + safetensors, or a GGUF file)."""

from __future__ import annotations

import argparse

COMMAND = "hf"
HELP = "a Hugging Face checkpoint on disk (config.json + safetensors, or a GGUF file)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError
