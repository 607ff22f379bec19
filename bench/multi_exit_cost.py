"""FLOPs vs wall-clock of reaching each exit of the bundled multi-exit CNN and cascade.

    python bench/multi_exit_cost.py

Prints, per exit, the cumulative FLOPs and the cumulative measured time (stages and heads up to
that exit, median of repeats, 1 thread), both as ratios to the last exit, at batch 256 and 1.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.data import gallery, images
from engine.families import load_model
from engine.run.exits import exit_costs

REPEATS = {256: 7, 1: 200}


@torch.no_grad()
def cumulative_times(model, x: torch.Tensor, repeats: int) -> np.ndarray:
    runs = []
    for _ in range(repeats):
        h, spent, row = x, 0.0, []
        for stage, head in zip(model.stages, model.heads, strict=True):
            t0 = time.perf_counter()
            h = stage(h)
            head(h)
            spent += time.perf_counter() - t0
            row.append(spent)
        runs.append(row)
    return np.median(np.array(runs), axis=0) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for model_id, dataset in (("mnist_multi_exit_cnn", "mnist"), ("mnist_cascade", "mnist")):
        model = load_model(model_id)
        x = images.to_model_input(gallery.test_images(dataset).data.images[:256])
        flops = exit_costs(model).cumulative
        print(f"\n{model_id}: cumulative MFLOPs/sample {np.round(flops / 1e6, 3).tolist()}")
        print(f"  FLOPs / last exit        {np.round(flops / flops[-1], 3).tolist()}")
        for batch, reps in REPEATS.items():
            t = cumulative_times(model, x[:batch], reps)
            print(
                f"  time / last exit, b={batch:<3} {np.round(t / t[-1], 3).tolist()}"
                f"  (last exit {t[-1] / batch * 1e3:.0f} µs/sample)"
            )


if __name__ == "__main__":
    main()
