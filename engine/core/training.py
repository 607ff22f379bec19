"""What every trainer shares: seeding, the image trainers' minibatch loop, and writing weights +
model card atomically."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from engine.core.progress import Meter, Progress, track
from engine.core.stats import seeded_subset
from engine.paths import MODELS_DIR
from engine.registry import sha256_file


def add_output_args(
    p: argparse.ArgumentParser, model_id: str | None, model_id_help: str | None = None
) -> None:
    """The options that say where a trainer writes its card, weights and bundled records (the
    halting, skipping and pondering trainers'), and whether it prints."""
    p.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--traces-dir", type=Path, default=None, help="default: assets/traces")
    p.add_argument("--no-traces", action="store_true", help="do not write the records (and trace)")
    p.add_argument("--model-id", default=model_id, help=model_id_help)
    p.add_argument("--quiet", action="store_true")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_split(dataset: str, split: str, limit: int | None, seed: int):
    """(x float [N,1,28,28], y int64 [N], class_names, rows of the split); a seeded random
    subset of ``limit`` rows (in split order) if given."""
    from engine.data import images

    data = images.load(dataset, split)
    idx = seeded_subset(len(data), limit, seed)
    x = images.to_model_input(data.images[idx])
    y = torch.as_tensor(data.labels[idx], dtype=torch.int64)
    return x, y, data.class_names, idx


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int, max_steps: int | None = None):
    """The mini-batch schedule of the image trainers: (total steps, and per epoch the list of
    that epoch's shuffled index batches). A seeded generator of its own draws one permutation per
    epoch; ``max_steps`` cuts the schedule short (quick runs), later epochs then come out empty.
    """
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)

    def epochs_iter():
        gen = torch.Generator().manual_seed(seed)
        left = total
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            k = min(per_epoch, left)
            left -= k
            yield [perm[i * batch_size : (i + 1) * batch_size] for i in range(k)]

    return total, epochs_iter()


def train_epochs(
    opt: torch.optim.Optimizer,
    batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    n: int,
    batch_size: int,
    epochs: int,
    seed: int,
    progress: Progress,
    *,
    label: str = "",
    schedule: Callable[[torch.optim.Optimizer, int], object] | None = None,
    max_steps: int | None = None,
    clip: float | None = None,
) -> None:
    """The image trainers' minibatch loop: ``epoch_batches``' seeded schedule over ``range(n)``,
    one optimiser step per batch (gradient norm clipped to ``clip`` if given) and one step of
    ``schedule(opt, total steps)`` (default ``cosine_lr``); a bar of steps per epoch with the
    epoch's loss so far. ``batch_loss(indices)`` gives (loss, other tensors shown beside it)."""
    total, per_epoch = epoch_batches(n, batch_size, epochs, seed, max_steps)
    sched = (schedule or cosine_lr)(opt, total)
    params = [p for group in opt.param_groups for p in group["params"]]
    for epoch, batches in enumerate(per_epoch):
        bar = f"{label}epoch {epoch + 1}/{epochs}"
        meter = Meter(progress, bar)
        for b in track(batches, bar, progress):
            loss, shown = batch_loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            meter.add(len(b), loss=loss.item(), **{k: v.item() for k, v in shown.items()})


def cosine_lr(opt: torch.optim.Optimizer, total: int, warmup: int = 0):
    """Per-step learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def command_line(family: str, argv: list[str]) -> str:
    """The exact command that reproduces a run, for the model card."""
    return "python -m engine.train " + shlex.join([family, *argv])


def save_model(model: torch.nn.Module, card: dict, out_dir: Path = MODELS_DIR) -> Path:
    """Write ``<model_id>.safetensors`` and ``<model_id>.json`` (with the weights' SHA-256).

    ``card`` must hold model_id, family, module and config; metrics, data set, seed, epochs,
    training_command and train_seconds are expected by the app and the card test.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_id = card["model_id"]
    weights = out_dir / f"{model_id}.safetensors"
    tmp = weights.with_suffix(".safetensors.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    card = {
        **card,
        "weights_sha256": sha256_file(weights),
        "weights_bytes": weights.stat().st_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    path = out_dir / f"{model_id}.json"
    tmp_card = path.with_suffix(".json.tmp")
    tmp_card.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp_card, path)
    return path


def print_saved(path: Path, timing: str, metrics: dict) -> None:
    """What a trainer prints when it has written its card: the path, how long it took, then
    one metric a line."""
    print(f"wrote {path}  ({timing})")
    for k, v in metrics.items():
        print(f"  {k}: {v}")
