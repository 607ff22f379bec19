"""Layer skipping and ACT halting for real: FLOPs-predicted vs measured speed-up.

    python bench/skip_halt_speedup.py [--n 2000] [--repeats 5] [--threads 1]

Baselines run the same code path with nothing saved: SkipNet at threshold 0 (every block runs),
ACT with eps = -(M + 1), so that no input halts before the maximum M steps (its answer is not
ACT's and is not reported). "predicted" is the
baseline's mean FLOPs over the setting's mean FLOPs (both counted by torch on what ran);
"measured" is the baseline's wall-clock over the setting's, median of interleaved repeats.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engine.data import images
from engine.families import load_model
from engine.families.act import model as act
from engine.families.skipnet.model import run_skipnet
from engine.registry import get_card


def timed(fn, repeats: int) -> tuple[float, dict]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def rows_for(name, runs: dict, repeats: int, labels=None):
    """runs: setting -> zero-arg callable returning a record with 'flops' and 'pred'."""
    results = {}
    for _ in range(repeats):  # interleave settings so load drifts hit all alike
        for key, fn in runs.items():
            t, out = timed(fn, 1)
            results.setdefault(key, ([], out))[0].append(t)
    base_key = next(iter(runs))
    base_t = np.median(results[base_key][0])
    base_f = results[base_key][1]["flops"].mean()
    for key, (ts, out) in results.items():
        t = np.median(ts)
        pred, meas = base_f / out["flops"].mean(), base_t / t
        extra = labels(out) if labels and key != "all M steps" else "fixed depth"
        print(
            f"| {name} | {key} | {out['flops'].mean() / 1e6:.3f} | {pred:.2f} | {meas:.2f} "
            f"({t * 1e3:.0f} ms) | {meas / pred:.2f} | {extra} |"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    test = images.load("mnist", "test")
    x = images.to_model_input(test.images[: args.n])
    y = test.labels[: args.n]

    print("| model | setting | MFLOPs/input | predicted | measured | measured/predicted | notes |")
    print("|---|---|---|---|---|---|---|")
    skip = load_model("mnist_skipnet")
    rows_for(
        "mnist_skipnet",
        {
            f"threshold {t}": (lambda t=t: run_skipnet(skip, x, t, batch_size=256))
            for t in (0.0, 0.5, 0.8)
        },
        args.repeats,
        lambda o: f"accuracy {(o['pred'] == y).mean():.4f}, blocks run {o['executed'].mean():.2f}",
    )

    def act_runs(model, inputs, eps_list, batch):
        def run(eps):
            outs = [
                act.run_act(model, inputs[i : i + batch], eps=eps)
                for i in range(0, len(inputs), batch)
            ]
            return {k: np.concatenate([o[k] for o in outs]) for k in ("flops", "pred", "steps")}

        return {("all M steps" if e < 0 else f"eps {e}"): (lambda e=e: run(e)) for e in eps_list}

    m = load_model("mnist_act")
    rows_for(
        "mnist_act",
        act_runs(m, x.numpy(), (-(m.config.max_steps + 1.0), m.config.eps, 0.3), 256),
        args.repeats,
        lambda o: f"accuracy {(o['pred'] == y).mean():.4f}, mean steps {o['steps'].mean():.2f}",
    )
    par = load_model("parity_act")
    card = get_card("parity_act").raw
    xp, yp, _ = act.parity_data(args.n, par.config.num_bits, seed=card["training"]["test_seed"])
    rows_for(
        "parity_act",
        act_runs(par, xp, (-(par.config.max_steps + 1.0), par.config.eps), 256),
        args.repeats,
        lambda o: f"accuracy {(o['pred'] == yp).mean():.4f}, mean steps {o['steps'].mean():.2f}",
    )


if __name__ == "__main__":
    main()
