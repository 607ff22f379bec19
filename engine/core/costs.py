"""Cost accounting: FLOPs counted by torch on the modules as executed, never by hand.

FLOPs and wall-clock diverge on CPUs and at small batch; the product reports both, so this
module only counts, and timing is measured where the work runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable, *args, **kwargs) -> tuple[int, object]:
    """Run ``fn(*args, **kwargs)`` under FlopCounterMode; return (total FLOPs, fn's result).

    FlopCounterMode counts a multiply-add as 2 FLOPs and covers matmul/conv/attention ops;
    elementwise ops (ReLU, softmax, adds) are not counted, as in most of the literature.
    """
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


def flops_per_sample(fn: Callable, x: torch.Tensor) -> tuple[float, object]:
    """FLOPs of ``fn(x)`` divided by the batch size."""
    total, out = count_flops(fn, x)
    return total / max(1, x.shape[0]), out


@contextmanager
def stopwatch():
    """``with stopwatch() as t: ...`` then ``t()`` gives the elapsed milliseconds."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: ((end[0] if end else time.perf_counter()) - start) * 1e3
    end.append(time.perf_counter())


def default_device() -> torch.device:
    """CUDA when present, else CPU: the engine runs on whatever the machine has."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
