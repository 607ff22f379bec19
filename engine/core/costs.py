"""Cost accounting: FLOPs counted by torch on the modules as executed, never by hand.

FLOPs and wall-clock diverge on CPUs and at small batch; the product reports both: this module
counts FLOPs and maps costs onto a measured time axis (``Profile``), and timing is measured where
the work runs (``engine.run.profile``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
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


# --- the cost axis: FLOPs or measured time -----------------------------------------------------
#
# FLOPs mislead on CPUs (a wide early stage is cheap in FLOPs, dear in time), so every page with
# a cost axis can show it in FLOPs or in the milliseconds per sample that ``engine.run.profile``
# measured on this machine. The functions below are pure: a trace or results in FLOPs plus a
# profile give the same trace or results with the cost in ms, and every curve, metric and solver
# that reads ``cost`` then works in ms unchanged.

FLOPS = "FLOPs"


@dataclass(frozen=True)
class BatchTiming:
    """Measured time per sample of each profiled point (exit or setting) at one batch size."""

    batch: int
    median_ms: np.ndarray  # [M] median over repeats, per sample (batch time / batch)
    spread_ms: np.ndarray  # [M] interquartile range over repeats, per sample
    runs_ms: np.ndarray  # [M, R] every repeat, per sample
    # named pieces of work, median ms per sample and per unit (a decoder: "read", one confidence
    # read through the head; "fill", one layer's K/V propagated from an exit state)
    parts_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """What ``python -m engine.profile`` measured for one model (``<model_id>__time.json``).

    ``axis`` is "exit" (cumulative time of reaching and deciding at exit k, like a trace's cost),
    "setting" (time per sample of a real run at each setting of the family's knob) or "layers"
    (a decoder: time per generated token, per sequence, of a KV-cached decode step that runs
    ``points[i]`` layers; see ``decode_ms``); ``reason`` is set instead of timings when timing
    the model is not meaningful.
    """

    model_id: str
    family: str
    axis: str  # "exit" | "setting" | "none"
    points: np.ndarray  # [M] exit index or setting value
    timings: dict[int, BatchTiming]  # batch size -> timings
    machine: dict
    repeats: int = 0
    warmup: int = 0
    created: str = ""
    reason: str = ""

    @property
    def batches(self) -> list[int]:
        return sorted(self.timings)

    def to_json(self) -> dict:
        return {
            "model_id": self.model_id,
            "family": self.family,
            "axis": self.axis,
            "points": [float(p) for p in self.points],
            "repeats": self.repeats,
            "warmup": self.warmup,
            "created": self.created,
            "reason": self.reason,
            "machine": self.machine,
            "unit": "ms per generated token, per sequence"
            if self.axis == "layers"
            else "ms per sample",
            "timings": {
                str(b): {
                    "median_ms": t.median_ms.tolist(),
                    "spread_ms": t.spread_ms.tolist(),
                    "runs_ms": t.runs_ms.tolist(),
                    **({"parts_ms": t.parts_ms} if t.parts_ms else {}),
                }
                for b, t in sorted(self.timings.items())
            },
        }

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        timings = {
            int(b): BatchTiming(
                int(b),
                np.asarray(t["median_ms"], dtype=np.float64),
                np.asarray(t["spread_ms"], dtype=np.float64),
                np.asarray(t["runs_ms"], dtype=np.float64),
                {str(k): float(v) for k, v in t.get("parts_ms", {}).items()},
            )
            for b, t in d.get("timings", {}).items()
        }
        return cls(
            str(d["model_id"]),
            str(d.get("family", "")),
            str(d.get("axis", "none")),
            np.asarray(d.get("points", []), dtype=np.float64),
            timings,
            dict(d.get("machine", {})),
            int(d.get("repeats", 0)),
            int(d.get("warmup", 0)),
            str(d.get("created", "")),
            str(d.get("reason", "")),
        )


def time_unit(batch: int) -> str:
    return f"ms (batch {int(batch)})"


def units(profile: Profile | None) -> list[str]:
    """The cost axes a model can be shown on: FLOPs, then ms at each profiled batch size."""
    if profile is None or not profile.timings:
        return [FLOPS]
    return [FLOPS] + [time_unit(b) for b in profile.batches]


def is_time(unit: str) -> bool:
    """Whether a cost unit is a measured time ("ms (batch B)")."""
    return unit.startswith("ms (batch ")


def unit_batch(unit: str) -> int | None:
    """The batch size of a time unit ("ms (batch 256)" -> 256); None for FLOPs."""
    if unit == FLOPS:
        return None
    try:
        return int(unit.removeprefix("ms (batch ").removesuffix(")"))
    except ValueError:
        raise ValueError(f"unknown cost unit {unit!r}") from None


def timing(profile: Profile, unit: str) -> BatchTiming:
    b = unit_batch(unit)
    if b is None or b not in profile.timings:
        raise ValueError(f"{profile.model_id}: no timing at {unit!r} (have {units(profile)})")
    return profile.timings[b]


def trace_on_axis(trace, profile: Profile | None, unit: str):
    """The trace with its cost on ``unit``: FLOPs as it is; ms: every sample's cost of reaching
    exit k is the profile's median cumulative time of exit k at that batch size."""
    if unit == FLOPS:
        return trace
    if profile is None or profile.axis != "exit":
        raise ValueError(f"{trace.meta.model_id}: no per-exit timing profile")
    ms = timing(profile, unit).median_ms
    if len(ms) != trace.num_exits:
        raise ValueError(
            f"{trace.meta.model_id}: the profile times {len(ms)} exits, the trace has "
            f"{trace.num_exits}"
        )
    cost = np.broadcast_to(np.maximum.accumulate(ms), trace.cost.shape).copy()
    return replace(trace, cost=cost, meta=replace(trace.meta, cost_unit=unit))


def results_on_axis(results, profile: Profile | None, unit: str):
    """The results with their cost on ``unit``.

    Per-exit profiles (early exit, cascades): a sample's time is that of the exit it took (the
    results' ``exit`` detail). Per-setting profiles: the setting's measured time per sample,
    shared among its samples in proportion to their FLOPs (so the mean is the measured time);
    the full model's time is the most expensive setting's time per FLOP times its FLOPs.
    """
    if unit == FLOPS:
        return results
    if profile is None or profile.axis not in ("exit", "setting"):
        raise ValueError(f"{results.meta.get('model_id', results.name)}: no timing profile")
    ms = timing(profile, unit).median_ms
    if profile.axis == "exit":
        if "exit" not in results.detail:
            raise ValueError(f"{results.name}: per-exit timing needs the exit taken per sample")
        cum = np.maximum.accumulate(ms)
        cost = cum[results.detail["exit"]]
        full = np.full(results.num_samples, cum[-1])
    else:
        at = np.array([int(np.argmin(np.abs(profile.points - s))) for s in results.settings])
        if np.abs(profile.points[at] - results.settings).max() > 1e-9:
            raise ValueError(f"{results.name}: the profile does not time every setting")
        t = ms[at]  # [S]
        mean = results.cost.mean(axis=1)
        share = np.divide(
            results.cost,
            mean[:, None],
            out=np.ones_like(results.cost),
            where=mean[:, None] > 0,
        )
        cost = t[:, None] * share
        top = int(np.argmax(mean))
        per_flop = t[top] / mean[top] if mean[top] > 0 else 0.0
        full = np.maximum(results.full_cost * per_flop, 1e-12)
    return replace(results, cost=cost, full_cost=full, meta={**results.meta, "cost_unit": unit})


def decode_ms(
    profile: Profile,
    unit: str,
    layers,
    asked=0.0,
    filled=None,
) -> np.ndarray:
    """Milliseconds per generated token of a decoder, from its "layers" profile.

    The profile measured, per layer count d, a decode step that runs the first d layers with
    the exit fixed there (no confidence asked), fills the K/V of the layers above by CALM's
    propagation and reads the token through the final norm and head once. A real rule differs
    by what it asks and fills: ``asked`` confidence reads through the head (CALM's max-prob and
    margin read once per layer they ask at: on a 30-layer SmolLM2 one read costs about as much
    as three layers), and ``filled`` layers above the exit whose K/V are written (default: all
    of them, "propagate"; 0 for a lazy fill or skipped layers that get no K/V), plus the
    generator's own work per token ("token" part, where it was measured). Every argument
    broadcasts: per token arrays give per token times.
    """
    if profile is None or profile.axis != "layers":
        raise ValueError("per-token decode time needs a decoder's per-layer profile")
    t = timing(profile, unit)
    depth = float(profile.points.max())
    layers = np.asarray(layers, dtype=np.float64)
    step = np.interp(layers, profile.points, t.median_ms)
    above = depth - layers
    filled = above if filled is None else np.asarray(filled, dtype=np.float64)
    parts = t.parts_ms
    if "fill" not in parts and np.any(filled != above):
        raise ValueError(f"{profile.model_id}: no K/V fill timed at {unit}")
    read, fill, token = (parts.get(k, 0.0) for k in ("read", "fill", "token"))
    return step + token + np.asarray(asked, dtype=np.float64) * read - (above - filled) * fill


def layer_ms(profile: Profile, unit: str) -> float:
    """A decoder's mean time per layer of a decode step (its profile's first to last depth)."""
    t = timing(profile, unit)
    span = float(profile.points[-1] - profile.points[0])
    return float(t.median_ms[-1] - t.median_ms[0]) / span if span > 0 else 0.0


def read_in_layers(profile: Profile, unit: str) -> float:
    """What one confidence read costs, in layers' time."""
    per_layer = layer_ms(profile, unit)
    read = timing(profile, unit).parts_ms.get("read", 0.0)
    return read / per_layer if per_layer > 0 else float("nan")


def asked_reads(exit_layer, n_layer: int, min_layer: int = 0, reads: bool = True) -> np.ndarray:
    """Confidence reads a CALM rule makes for a token that exits after ``exit_layer`` (0-based;
    ``n_layer - 1``: full depth): one at every layer from ``min_layer`` on that it asks at, and
    it never asks at the last. ``reads`` False: a measure that reads no head (saturation, a
    gate on the state), whose asks cost next to nothing."""
    e = np.minimum(np.asarray(exit_layer, dtype=np.int64), n_layer - 2)
    return np.maximum(0, e - int(min_layer) + 1) * (1.0 if reads else 0.0)


def fmt_cost(value: float, unit: str) -> str:
    """A cost in its unit: "1.23 MFLOPs", "0.412 ms (batch 1)"."""
    if unit == FLOPS:
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= div:
                return f"{value / div:.3g} {suffix}FLOPs"
        return f"{value:.3g} FLOPs"
    return f"{value:.3g} {unit}"
