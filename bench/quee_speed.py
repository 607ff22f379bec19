"""QuEE for real: the learned three-way choice vs the band rule, float32-only and int8-only.

For each budget (a fraction of the float32 full model's cost, measured int8 cost model), the
learned choice's λ is solved on the bundled train records and each baseline takes its most
accurate max-prob threshold within the same simulated budget (``engine.quee_build
.real_runs``). Then every rule runs for real through ``engine.run.runtime`` (ONNX Runtime, 1
thread, batch 256) on the first ``--n`` test images, interleaved, median of ``--repeats``.
Printed per row: measured ms, ms / float32 full model, accuracy, simulated cost and whether
the real decisions (exit and first int8 stage) are the simulated ones. Load average before and
after: compare ratios within one run.

Run: ``python bench/quee_speed.py [--model fashion_multi_exit_cnn] [--budgets 0.5 0.8]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import quee_build  # noqa: E402
from engine.data import images  # noqa: E402
from engine.families import load_model  # noqa: E402
from engine.registry import get_card  # noqa: E402
from engine.run.runtime import DEFAULT_QUEE_BAND  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion_multi_exit_cnn")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="test images (at most the records')")
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
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
