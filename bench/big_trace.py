"""The tuning page on a million-sample trace: load time, slider rerun time, peak memory.

Makes the synthetic trace with bench/make_big_trace.py (in a subprocess, so its memory is not
counted here; reused when the file exists), then drives pages/tuning.py with Streamlit's AppTest
as a user would: types the file's path into "Load a trace file from this machine", presses
Load, and moves the max-prob threshold slider ``--moves`` times. Printed: the load (read +
every curve the page draws), the fragment's own server-side time per slider move
(``aie.tuning_fragment_ms``, median / p90; target < 150 ms), the AppTest round trip, and
this process's peak resident memory (``getrusage``; target < 2 GB), with the load average
before and after.

    python bench/big_trace.py [--samples 1000000] [--exits 12] [--moves 15] [--profile]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--exits", type=int, default=12)
    ap.add_argument("--moves", type=int, default=15)
    ap.add_argument("--trace", type=Path, default=None, help="an existing trace file instead")
    ap.add_argument("--profile", action="store_true", help="cProfile the slider moves")
    args = ap.parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    path = args.trace or ROOT / ".cache" / f"big_trace_{args.samples}x{args.exits}.parquet"
    if not path.exists():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_big_trace.py"), "--samples",
             str(args.samples), "--exits", str(args.exits), "--out", str(path)],
            check=True,
        )  # fmt: skip
        print(f"made {path} in {time.perf_counter() - t0:.1f} s")
    os.environ.setdefault("AIE_DATA_DIR", tempfile.mkdtemp(prefix="aie-bench-"))
    os.environ["AIE_LOCAL_PATHS"] = "1"

    from streamlit.testing.v1 import AppTest

    print(f"peak memory before the app: {peak_mb():.0f} MB")
    at = AppTest.from_file(str(ROOT / "pages" / "tuning.py"), default_timeout=600)
    at.run()
    t0 = time.perf_counter()
    at.text_input(key="w.trace_path").set_value(str(path))
    at.button(key="b.trace_path").click().run()
    load_s = time.perf_counter() - t0
    if at.exception or at.error:
        print("the page failed:", [e.value for e in at.exception] + [e.value for e in at.error])
        return 1
    print(f"trace: {path.name}; first load (read + every curve drawn): {load_s:.1f} s")
    print(f"peak memory after loading: {peak_mb():.0f} MB")
    frag, total, cpu = [], [], []
    values = [0.5 + 0.49 * i / max(1, args.moves - 1) for i in range(args.moves)]
    prof = cProfile.Profile() if args.profile else None
    if prof:  # AppTest runs the script in a thread of its own: profile the threads it starts
        threading.setprofile(lambda *_: prof.enable())
    for v in values:
        start = time.perf_counter()
        at.slider(key="w.t.max_prob").set_value(round(v, 3)).run()
        total.append((time.perf_counter() - start) * 1e3)
        frag.append(at.session_state["aie.tuning_fragment_ms"])
        cpu.append(at.session_state["aie.tuning_fragment_cpu_ms"])
    if at.exception:
        print("the page raised:", at.exception[0].value)
        return 1
    med = statistics.median(frag)
    p90 = sorted(frag)[int(0.9 * (len(frag) - 1))]
    peak = peak_mb()
    print(
        f"tuning fragment, server side, {len(frag)} slider moves: median {med:.1f} ms, "
        f"p90 {p90:.1f} ms, max {max(frag):.1f} ms (target < {TARGET_MS:.0f} ms: "
        f"{'met' if med < TARGET_MS else 'NOT met'})"
    )
    print(
        f"its CPU time (thread_time; what a busy machine does not inflate): median "
        f"{statistics.median(cpu):.1f} ms, p90 {sorted(cpu)[int(0.9 * (len(cpu) - 1))]:.1f} ms"
    )
    print(f"AppTest round trip (whole script + harness): median {statistics.median(total):.1f} ms")
    print(
        f"peak resident memory: {peak:.0f} MB (target < {TARGET_MB:.0f} MB: "
        f"{'met' if peak < TARGET_MB else 'NOT met'})"
    )
    if prof:
        st_ = pstats.Stats(prof)
        st_.sort_stats("tottime").print_stats(25)
        st_.print_callers("blake2b|iterencode|dataframe_to_arrays")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
