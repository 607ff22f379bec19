"""Server-side time of one slider rerun of the tuning page's fragment, on the largest trace,
and of the language page's study fragment (SmolLM2's cached per-layer records, ``--page
language``).

Drives pages/tuning.py with Streamlit's AppTest (no browser): loads the largest bundled trace
(by samples x exits), then moves the threshold slider ``--moves`` times. The fragment records
its own wall-clock time (``aie.tuning_fragment_ms``: policy evaluation, metrics, figures,
table, everything the fragment renders); the AppTest round trip (whole script, including the
test harness) is printed alongside. Target: fragment under 150 ms.

    python bench/app_latency.py [--moves 20] [--model MODEL_ID] [--page tuning|language]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_MS = 150.0


def largest_trace() -> tuple[str, int, int] | None:
    from engine.trace_store import available_traces, load_trace

    best = None
    for model_id, split in available_traces():
        if split != "test":
            continue
        t = load_trace(model_id, split, build_if_missing=False)
        size = (t.num_samples * t.num_exits, model_id, t.num_samples, t.num_exits)
        best = max(best, size) if best else size
    return None if best is None else best[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=20)
    ap.add_argument("--model", default=None, help="model id (default: the largest trace)")
    ap.add_argument("--page", choices=("tuning", "language"), default="tuning")
    args = ap.parse_args(argv)
    os.environ.setdefault("AIE_DATA_DIR", tempfile.mkdtemp(prefix="aie-bench-"))

    import torch

    torch.set_num_threads(1)
    from streamlit.testing.v1 import AppTest

    print(f"load average before: {os.getloadavg()}")
    if args.page == "language":
        return language(AppTest, args.moves)
    if args.model:
        from engine.trace_store import load_trace

        t = load_trace(args.model, "test", build_if_missing=False)
        model_id, n, k = args.model, t.num_samples, t.num_exits
    else:
        found = largest_trace()
        if found is None:
            print("no bundled traces found in assets/traces; train a model first")
            return 1
        model_id, n, k = found
    at = AppTest.from_file(str(ROOT / "pages" / "tuning.py"), default_timeout=120)
    at.query_params["model"] = model_id
    at.query_params["policy"] = "max_prob"
    at.query_params["t"] = "0.9"
    at.run()
    if at.exception:
        print("the page raised:", at.exception[0].message)
        return 1
    frag, total = [], []
    values = [0.5 + 0.49 * i / max(1, args.moves - 1) for i in range(args.moves)]
    for v in values:
        start = time.perf_counter()
        at.slider(key="w.t.max_prob").set_value(round(v, 3)).run()
        total.append((time.perf_counter() - start) * 1e3)
        frag.append(at.session_state["aie.tuning_fragment_ms"])
    med = statistics.median(frag)
    p90 = sorted(frag)[int(0.9 * (len(frag) - 1))]
    print(f"trace: {model_id} ({n} samples x {k} exits)")
    print(
        f"tuning fragment, server side, {len(frag)} slider moves: median {med:.1f} ms, "
        f"p90 {p90:.1f} ms, min {min(frag):.1f} ms (target < {TARGET_MS:.0f} ms: "
        f"{'met' if med < TARGET_MS else 'NOT met'})"
    )
    print(f"AppTest round trip (whole script + harness): median {statistics.median(total):.1f} ms")
    print(f"load average after: {os.getloadavg()}")
    return 0


def language(AppTest, moves: int) -> int:
    """The threshold slider over SmolLM2's cached per-layer records (no model loaded)."""
    at = AppTest.from_file(str(ROOT / "pages" / "language.py"), default_timeout=120)
    at.run()
    if at.exception:
        print("the page raised:", at.exception[0].message)
        return 1
    frag, total = [], []
    for i in range(moves):
        start = time.perf_counter()
        at.slider(key="slm.st.t.max_prob").set_value(round(0.3 + 0.69 * i / max(1, moves - 1), 3))
        at.run()
        total.append((time.perf_counter() - start) * 1e3)
        frag.append(at.session_state["aie.lang.study_fragment_ms"])
    med = statistics.median(frag)
    p90 = sorted(frag)[int(0.9 * (len(frag) - 1))]
    print(
        f"language study fragment, server side, {len(frag)} slider moves: median {med:.1f} ms, "
        f"p90 {p90:.1f} ms, max {max(frag):.1f} ms (target < {TARGET_MS:.0f} ms: "
        f"{'met' if med < TARGET_MS else 'NOT met'})"
    )
    print(f"AppTest round trip (whole page + harness): median {statistics.median(total):.1f} ms")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
