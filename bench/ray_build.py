"""Trace building: one process vs Ray with 1 and 2 local workers (samples/s, one run).

    PYTHONPATH=. python bench/ray_build.py [--model fashion_multi_exit_cnn] [--split test|train]

One local Ray instance (2 CPUs, no dashboard) serves both Ray runs; starting it is timed apart.
A Ray run's time includes starting its actors and loading the model in each (what a user
waits for), writing the shards and the gather. Every run uses 1 torch thread per process, and
each Ray trace is checked against the single-process one (every column but the latency).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

from engine import families
from engine.registry import get_card
from engine.run import ray_build
from engine.run.trace_build import trace_of_inputs


def without_latency(t) -> bytes:
    return replace(t, latency_ms=np.zeros_like(t.latency_ms)).to_parquet_bytes()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fashion_multi_exit_cnn")
    p.add_argument("--split", default="test", choices=("train", "test"))
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()}")
    torch.set_num_threads(1)
    card = get_card(args.model)
    inputs = families.get(card.family).trace_inputs(card, args.split)
    n = len(inputs.x)

    t0 = time.perf_counter()
    one = trace_of_inputs(families.load_model(args.model), **vars(inputs))
    single_s = time.perf_counter() - t0
    print(f"{args.model} on {card.dataset} {args.split}: {n} samples")
    print(f"  one process            {single_s:6.1f} s  {n / single_s:8.0f} samples/s")

    t0 = time.perf_counter()
    rates = {}
    with ray_build.connect(None, num_cpus=2) as ray:  # a local instance, as `--ray` starts
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"  (starting Ray: {time.perf_counter() - t0:.1f} s, not counted below)")
        for workers in (1, 2):
            t0 = time.perf_counter()
            done = ray_build.run_on_ray(args.model, inputs, workers=workers)
            s = time.perf_counter() - t0
            rates[workers] = n / s
            same = without_latency(done.trace) == without_latency(one)
            print(
                f"  Ray, {workers} worker(s)       {s:6.1f} s  {n / s:8.0f} samples/s  "
                f"({done.blocks} blocks; identical to one process but latency: {same})"
            )
    print(
        f"  ratios: 2 workers / 1 worker {rates[2] / rates[1]:.2f}x; "
        f"2 workers / one process {rates[2] * single_s / n:.2f}x"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
