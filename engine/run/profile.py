"""Measured time per exit / setting of a model on this machine, for the time cost axis.

FLOPs mislead on CPUs: a wide first stage can be a small share of the FLOPs and most of the
time. ``profile`` asks the model's family for the real work of each exit or setting on one batch
of its own inputs (``Family.timed``), runs each after a warm-up ``repeats`` times at batch 1 and
at a batch size the user picks (default: the family's, 256 samples or 8 sequences of a
decoder), and keeps the median (and interquartile range) of the time per sample, with the
machine's description, as a small JSON beside the model's traces::

    python -m engine.profile MODEL [--batch B] [--repeats 7] [--warmup 2]
    python -m engine.profile --all          # every bundled model, into assets/traces/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from engine import families
from engine.core.costs import BatchTiming, Profile
from engine.core.family import FamilyError
from engine.core.progress import terminal
from engine.paths import TRACES_DIR, user_traces_dir
from engine.registry import ModelCard, get_card, list_cards

DEFAULT_REPEATS = 7
DEFAULT_WARMUP = 2


def profile_file(card: ModelCard) -> Path:
    """Bundled models: assets/traces/<id>__time.json; the user's: beside their traces."""
    return (user_traces_dir() if card.user else TRACES_DIR) / f"{card.model_id}__time.json"


def user_profile_file(model_id: str) -> Path:
    """Where a re-profile from the app goes (the user's data folder, never the bundled assets);
    it is read before the shipped one."""
    return user_traces_dir() / f"{model_id}__time.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the timings were measured on: they hold for this machine only."""
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort,
        "device": "cpu",
        "load_average_1min": round(load[0], 2),
    }


def time_rounds(run, m: int, repeats: int, warmup: int, done=None) -> np.ndarray:
    """[m, repeats] wall-clock ms of ``run(0)`` .. ``run(m - 1)``, after ``warmup`` untimed
    calls of each, timed in rounds (every point once per round), so a slow spell of the
    machine falls on every point alike instead of on the few timed during it. ``done(r)``
    hears after each round."""
    for i in range(m):
        for _ in range(warmup):
            run(i)
    out = np.empty((m, repeats))
    for r in range(repeats):
        for i in range(m):
            t0 = time.perf_counter()
            run(i)
            out[i, r] = (time.perf_counter() - t0) * 1e3
        if done:
            done(r + 1)
    return out


def measure(timed, repeats: int, warmup: int, done=None) -> BatchTiming:
    """Median and IQR per sample of every point of one ``Timed``; its parts' medians per
    sample and unit, each the median of paired differences (its baseline, then its run, in
    every round). ``done(k, n)`` hears as the rounds go."""
    parts = list(timed.parts.values())
    total = repeats * (2 if parts else 1)  # rounds: the points', then the parts'

    def report(offset: int):
        return (lambda r: done(offset + r, total)) if done else None

    runs = time_rounds(timed.run, len(timed.points), repeats, warmup, report(0))
    runs = runs / timed.batch
    q25, med, q75 = np.percentile(runs, [25, 50, 75], axis=1)
    calls = [f for part in parts for f in (part.baseline, part.run)]
    paired = calls and time_rounds(
        lambda k: calls[k](), len(calls), repeats, warmup, report(repeats)
    )
    extra = {
        name: max(0.0, float(np.median(paired[2 * j + 1] - paired[2 * j])))
        / (timed.batch * part.units)
        for j, (name, part) in enumerate(timed.parts.items())
    }
    return BatchTiming(timed.batch, med, q75 - q25, runs, extra)


def profile(
    card: ModelCard,
    batch: int | None = None,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    progress=None,
) -> Profile:
    """Time every exit / setting of ``card``'s model at batch 1 and ``batch`` (default: the
    family's ``profile_batch``); a family that cannot be timed gives a profile with its one-line
    ``reason``. ``progress(fraction, text)`` is called as it goes."""
    fam = families.get(card.family)
    batch = fam.profile_batch if batch is None else batch
    if repeats < 1 or batch < 1:
        raise ValueError("repeats and batch must be at least 1")
    base = dict(model_id=card.model_id, family=card.family, machine=machine())
    if fam.untimed:
        return Profile(**base, axis="none", points=np.zeros(0), timings={}, reason=fam.untimed)
    try:
        model = fam.load(card)
        sizes = sorted({1, int(batch)})
        timings, points = {}, None
        for j, b in enumerate(sizes):
            text = f"{card.model_id}: batch {b}"
            if progress:
                progress(j / len(sizes), text)
            step = (
                (lambda k, n, j=j, text=text: progress((j + k / n) / len(sizes), text))
                if progress
                else None
            )
            with torch.inference_mode():
                timed = fam.timed(card, model, b)
                timings[b] = measure(timed, repeats, warmup, step)
            points = timed.points
    # missing data, backbone or weights (RuntimeError subclasses): a reason, not a crash
    except (FamilyError, RuntimeError, ImportError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Profile(**base, axis="none", points=np.zeros(0), timings={}, reason=reason)
    if progress:
        progress(1.0, f"{card.model_id}: done")
    return Profile(
        **base,
        axis=timed.axis,
        points=np.asarray(points, dtype=np.float64),
        timings=timings,
        repeats=repeats,
        warmup=warmup,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def write_profile(p: Profile, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(p.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def read_profile(path: Path) -> Profile:
    return Profile.from_json(json.loads(Path(path).read_text()))


def load_profile(model_id: str) -> Profile | None:
    """The stored profile of a model, or None when it was never profiled."""
    try:
        card = get_card(model_id)
    except Exception:  # noqa: BLE001 - an uploaded trace has no card: no profile either
        return None
    for path in (user_profile_file(model_id), profile_file(card)):
        if path.is_file():
            return read_profile(path)
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m engine.profile", description=__doc__.split("\n")[0]
    )
    ap.add_argument("model", nargs="?", help="model id (see python -m engine.build --list)")
    ap.add_argument("--all", action="store_true", help="every bundled model")
    ap.add_argument(
        "--batch", type=int, default=None, help="batch size besides 1 (default: the family's)"
    )
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.all:
        cards = [c for c in list_cards() if not c.user]
    elif args.model:
        cards = [get_card(args.model)]
    else:
        ap.error("name a model or pass --all")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    bars = terminal(args.quiet)
    for card in cards:
        label = f"profiling {card.model_id}"
        p = profile(
            card,
            args.batch,
            args.repeats,
            args.warmup,
            lambda f, _text, label=label: bars(round(100 * f, 1), 100, label),
        )
        path = write_profile(p, profile_file(card))
        if p.reason:
            print(f"{card.model_id}: not timed ({p.reason}) -> {path}")
            continue
        for b in p.batches:
            ms = ", ".join(f"{v:.4g}" for v in p.timings[b].median_ms)
            print(f"{card.model_id} [{p.axis}] batch {b}: {ms} ms/sample -> {path.name}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
