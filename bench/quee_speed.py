"""QuEE for real: the learned three-way choice vs the band rule, float32-only and int8-only.

For each budget (a fraction of the float32 full model's cost, measured int8 cost model), the
learned choice's λ is solved on the bundled train records and each baseline takes its most
accurate max-prob threshold within the same simulated budget (``engine.quee_build
.real_runs``). Then every rule runs for real through ``engine.run.runtime`` (ONNX Runtime, 1
thread, batch 256) on the first ``--n`` test images, interleaved, median of ``--repeats``.
Printed per row: measured ms, ms / float32 full model, accuracy, simulated cost and whether
the real decisions (exit and first int8 stage) are the simulated ones. Then, at the first
budget, each rule's *process CPU time* (steadier than wall-clock on a shared machine) over the
full model's, and the part of it spent in ONNX Runtime's ``run`` calls (cProfile), which says
how much of a rule's time is inference and how much bookkeeping (for the learned choice: its
regressors and a second, int8 group per exit). Load average before and after: compare ratios
within one run.

Run: ``python bench/quee_speed.py [--model fashion_multi_exit_cnn] [--budgets 0.5 0.8]``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import quee_build  # noqa: E402
from engine.core import quee  # noqa: E402
from engine.core.policies import Policy  # noqa: E402
from engine.data import images  # noqa: E402
from engine.families import load_model  # noqa: E402
from engine.registry import get_card  # noqa: E402
from engine.run.runtime import DEFAULT_QUEE_BAND, EarlyExitRunner  # noqa: E402


def cpu_split(fn) -> tuple[float, float]:
    """(process CPU s, CPU s inside ONNX Runtime's ``run``) of one call of ``fn``."""
    prof = cProfile.Profile(time.process_time)
    t0 = time.process_time()
    prof.enable()
    fn()
    prof.disable()
    cpu = time.process_time() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    ort = sum(v[3] for k, v in stats.items() if "onnxruntime_pybind11_state.run" in k[2])
    return cpu, ort


def cpu_table(model, model_id, x, b, calib, rows, budget, repeats) -> None:
    """CPU time of every rule at ``budget`` (settings from ``rows``) / the full model's."""
    runner = {
        name: EarlyExitRunner(model, name, model_id=model_id, calibration=calib, threads=1)
        for name in ("onnx", "onnx_int8", "quee")
    }
    setting = {r["rule"]: r["setting"] for r in rows if r["budget"] == budget}
    choice = quee.solve(b["fit"], b["gains"], b["costs"]["measured"], budget)
    calls = {
        "full float32": lambda: runner["onnx"].run_full(x),
        "learned": lambda: runner["quee"].run(
            x, Policy("max_prob", threshold=2.0), quee_choice=choice
        ),
        "band": lambda: runner["quee"].run(
            x, Policy("max_prob", threshold=setting["band"]), quee_band=DEFAULT_QUEE_BAND
        ),
        "float": lambda: runner["onnx"].run(x, Policy("max_prob", threshold=setting["float"])),
        "int8": lambda: runner["onnx_int8"].run(x, Policy("max_prob", threshold=setting["int8"])),
    }
    for fn in calls.values():
        fn()  # warm-up
    got = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            got[name].append(cpu_split(fn))
    med = {name: np.median(np.array(v), axis=0) for name, v in got.items()}
    full = med["full float32"][0]
    print(f"\nbudget {budget:g}, process CPU time, median of {repeats} interleaved (cProfile on)")
    print("| rule | CPU s | ÷ full float32 | in ORT run (s) | outside ORT (÷ full) |")
    print("|---|---|---|---|---|")
    for name, (cpu, ort) in med.items():
        print(f"| {name} | {cpu:.3f} | {cpu / full:.2f} | {ort:.3f} | {(cpu - ort) / full:.2f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion_multi_exit_cnn")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="test images (at most the records')")
    ap.add_argument("--cpu-repeats", type=int, default=5, help="repeats of the CPU-time table")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}")
    b = quee_build.load(quee_build.records_file(args.model))
    test = b["test"].subset(slice(0, args.n))
    card = get_card(args.model)
    model = load_model(args.model).eval()
    train = images.load(card.dataset, "train")
    calib = images.to_model_input(train.images[: quee_build.CALIB])
    x = images.to_model_input(images.load(card.dataset, "test").images[: test.num_samples])
    res = quee_build.real_runs(
        model,
        args.model,
        x,
        test,
        b["fit"],
        b["gains"],
        b["costs"]["measured"],
        calib,
        DEFAULT_QUEE_BAND,
        args.budgets,
        args.repeats,
    )
    print(
        f"{args.model}, {test.num_samples} test images, batch 256, 1 thread; "
        f"float32 full model {res['full_float_ms']} ms"
    )
    print("| budget | rule | setting | accuracy | simulated cost | ms | ÷ float32 full | agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        print(
            f"| {r['budget']:g} | {r['rule']} | {r['setting']:.4g} | {r['accuracy']:.4f} | "
            f"{r['simulated_cost']:.3f} | {r['ms']:.0f} | {r['ms_over_full_float']:.2f} | "
            f"{r['decisions_agree']:.2%} |"
        )
    cpu_table(model, args.model, x, b, calib, res["runs"], args.budgets[0], args.cpu_repeats)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
