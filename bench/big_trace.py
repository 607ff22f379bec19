"""The tuning page on a million-sample trace: load time, slider rerun time, peak memory.

Makes the synthetic trace with bench/make_big_trace.py (in a subprocess, so its memory is not
counted here; reused when the file exists), then drives pages/tuning.py with Streamlit's AppTest
as a user would: types the file's path into "Load a trace file from this machine", presses
Load, and moves the max-prob threshold slider ``--moves`` times. Printed: the load (read +
every curve the page draws), the fragment's own server-side time per slider move
(``aie.tuning_fragment_ms``, median / p90; target < 150 ms), the AppTest round trip, and
this process's peak resident memory (``getrusage``; target < 2 GB), with the load average
before and after.

The same is measured first on a small trace (``--baseline``, 10,000 samples), so the ratio
of the two holds on a busy machine.

    python bench/big_trace.py [--samples 1000000] [--exits 12] [--moves 15] [--baseline 10000]
                              [--profile] [--parts]

``--parts`` times the engine, loader and figure calls the page makes on the big trace (each
wrapped by a timer for the run: the page imports them afresh on every rerun) and prints the
median milliseconds per slider move of each, to show where the rerun's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_MS = 150.0
TARGET_MB = 2048.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def ensure(samples: int, exits: int) -> Path:
    """The synthetic trace's file, made in a subprocess (its memory not counted here)."""
    path = ROOT / ".cache" / f"big_trace_{samples}x{exits}.parquet"
    if not path.exists():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_big_trace.py"), "--samples",
             str(samples), "--exits", str(exits), "--out", str(path)],
            check=True,
        )  # fmt: skip
        print(f"made {path.name} in {time.perf_counter() - t0:.1f} s")
    return path


# The calls a slider move makes, timed by ``--parts`` (module, function name).
PARTS = (
    ("app.loaders", "get_trace"),
    ("app.loaders", "source_on_axis"),
    ("app.loaders", "curve_summary"),
    ("app.loaders", "outcome_table"),
    ("app.loaders", "oracle_stats"),
    ("app.loaders", "never_right"),
    ("app.loaders", "per_exit_reliability"),
    ("app.widgets", "policy_controls"),
    ("engine.core.policies", "exit_index"),
    ("engine.core.tradeoff", "evaluate"),
    ("engine.core.tradeoff", "per_class_exit_rates"),
    ("engine.core.calibration", "policy_outputs"),
    ("engine.core.calibration", "of_policy"),
    ("engine.core.calibration", "exit_gaps"),
    ("engine.core.calibration", "exited_reliability"),
    ("app.figures", "tradeoff_figure"),
    ("app.figures", "exit_histogram"),
    ("app.figures", "per_class_figure"),
    ("app.figures", "reliability_figure"),
    ("app.figures", "exited_reliability_figure"),
    ("app.widgets", "chart"),
    ("streamlit", "dataframe"),
)


class Parts:
    """Wall-clock time of each of ``PARTS`` per rerun, while installed (``with Parts():``).

    A wrapped call made inside another wrapped one is counted in both; the page's own code
    between them is what the total leaves over."""

    def __init__(self):
        self.runs: list[dict[str, float]] = []
        self.now: dict[str, float] = {}
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[name] = self.now.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

        return timed

    def __enter__(self):
        import importlib

        for mod_name, attr in PARTS:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, attr)
            self._saved.append((mod, attr, fn))
            setattr(mod, attr, self._wrap(f"{mod_name.rsplit('.', 1)[-1]}.{attr}", fn))
        return self

    def next_run(self) -> None:
        self.runs.append(self.now)
        self.now = {}

    def __exit__(self, *exc):
        for mod, attr, fn in self._saved:
            setattr(mod, attr, fn)

    def report(self, frag: list[float]) -> None:
        names = sorted({n for r in self.runs for n in r})
        med = {n: statistics.median(r.get(n, 0.0) for r in self.runs) for n in names}
        print("per slider move, median ms (nested calls counted in both):")
        for n in sorted(names, key=med.get, reverse=True):
            print(f"  {n:36s} {med[n]:7.1f}")
        print(f"  {'fragment (whole)':36s} {statistics.median(frag):7.1f}")


def measure(
    path: Path, moves: int, prof: cProfile.Profile | None = None, parts: Parts | None = None
) -> dict | None:
    """Load ``path`` through the page's path input, then move the slider ``moves`` times."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / "tuning.py"), default_timeout=600)
    at.run()
    t0 = time.perf_counter()
    at.text_input(key="w.trace_path").set_value(str(path))
    at.button(key="b.trace_path").click().run()
    load_s = time.perf_counter() - t0
    if at.exception or at.error:
        print("the page failed:", [e.value for e in at.exception] + [e.value for e in at.error])
        return None
    frag, total, cpu = [], [], []
    if parts:
        parts.now = {}  # the moves only, not the load
    if prof:  # AppTest runs the script in a thread of its own: profile the threads it starts
        threading.setprofile(lambda *_: prof.enable())
    for i in range(moves):
        start = time.perf_counter()
        at.slider(key="w.t.max_prob").set_value(round(0.5 + 0.49 * i / max(1, moves - 1), 3))
        at.run()
        total.append((time.perf_counter() - start) * 1e3)
        frag.append(at.session_state["aie.tuning_fragment_ms"])
        cpu.append(at.session_state["aie.tuning_fragment_cpu_ms"])
        if parts:
            parts.next_run()
    threading.setprofile(None)
    if parts:
        parts.report(frag)
    if at.exception:
        print("the page raised:", at.exception[0].value)
        return None

    def p90(x: list[float]) -> float:
        return sorted(x)[int(0.9 * (len(x) - 1))]

    return {
        "load_s": load_s,
        "median": statistics.median(frag),
        "p90": p90(frag),
        "max": max(frag),
        "cpu": statistics.median(cpu),
        "cpu_p90": p90(cpu),
        "total": statistics.median(total),
    }


def report(name: str, r: dict) -> None:
    print(
        f"{name}: first load (read + every curve drawn) {r['load_s']:.1f} s; fragment, server "
        f"side: median {r['median']:.1f} ms, p90 {r['p90']:.1f} ms, max {r['max']:.1f} ms; its "
        f"CPU time median {r['cpu']:.1f} ms (p90 {r['cpu_p90']:.1f}); AppTest round trip "
        f"{r['total']:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--exits", type=int, default=12)
    ap.add_argument("--moves", type=int, default=15)
    ap.add_argument("--baseline", type=int, default=10_000, help="samples of the small trace")
    ap.add_argument("--profile", action="store_true", help="cProfile the big trace's moves")
    ap.add_argument("--parts", action="store_true", help="time each call of a move (big trace)")
    args = ap.parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    small = ensure(args.baseline, args.exits) if args.baseline else None
    big = ensure(args.samples, args.exits)
    os.environ.setdefault("AIE_DATA_DIR", tempfile.mkdtemp(prefix="aie-bench-"))
    os.environ["AIE_LOCAL_PATHS"] = "1"
    print(f"peak memory before the app: {peak_mb():.0f} MB")
    base = None
    if small is not None:  # the same page on a small trace, in the same run: the ratio holds
        base = measure(small, args.moves)
        if base is None:
            return 1
        report(f"{args.baseline} x {args.exits} (baseline)", base)
    prof = cProfile.Profile() if args.profile else None
    if args.parts:
        with Parts() as parts:
            r = measure(big, args.moves, prof, parts)
    else:
        r = measure(big, args.moves, prof)
    if r is None:
        return 1
    report(f"{args.samples} x {args.exits}", r)
    peak = peak_mb()
    print(
        f"target: fragment median < {TARGET_MS:.0f} ms: {'met' if r['median'] < TARGET_MS else 'NOT met'}"
        + (f"; {r['median'] / base['median']:.1f}x the baseline's time, "
           f"{r['cpu'] / base['cpu']:.1f}x its CPU time" if base else "")
    )  # fmt: skip
    print(
        f"peak resident memory: {peak:.0f} MB (target < {TARGET_MB:.0f} MB: "
        f"{'met' if peak < TARGET_MB else 'NOT met'})"
    )
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
