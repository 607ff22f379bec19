"""Does a decoder's time profile predict what real early-exit generations take?

For each language model, ``python -m engine.profile MODEL`` measured, per layer count, one
KV-cached decode step, and what a confidence read and a K/V fill add (the "layers" axis; see
``engine.families.hf_causal_lm.timing``). Here the model generates for real, at batch 1, with
CALM exit rules at several thresholds (and, for a pretrained decoder, both K/V fills); each
generated token's time is predicted from the profile with ``costs.decode_ms`` (its own exit
layer, the reads its rule asked, the layers it filled) and the sum is set against the
measured wall-clock of the decode loop (the prompt's prefill left out of both). Printed per
row: mean layers per token, measured and predicted ms per token and their ratio (target 0.9
to 1.1), and the FLOPs-style prediction (layers per token / full depth) against the measured
fraction of the full-depth time. The profile is measured first, in this run, so both sides see
the same machine state; the load average is printed before and after.

    python bench/lm_decode_time.py [--models bbc_char_early_exit_lm smollm2_135m] [--tokens 48]
                                   [--repeats 3] [--rounds 5] [--threads N]

The char LM's ~2 ms per token is Python dispatch more than arithmetic and drifts by tens of
per cent between minutes on a shared VM, so it is profiled and measured ``--rounds`` times
(each round: a fresh profile, then every rule) and the median ratio is printed with its range;
the time fraction is each round's own (measured ÷ that round's full depth).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import families  # noqa: E402
from engine.core import costs  # noqa: E402
from engine.registry import get_card  # noqa: E402
from engine.run import profile as prof  # noqa: E402

PROMPT = "The government said on Monday that"


def char_lm_rows(model, p, tokens: int, repeats: int):
    """(label, threshold, fill) -> measured and predicted ms per token for the char LM."""
    from engine.families.early_exit_lm import model as lm

    n = model.n_layer
    rules = [("full depth", None, 2.0)] + [
        (f"max-prob >= {t}", "max_prob", t) for t in (0.95, 0.8, 0.6, 0.4)
    ]
    for label, measure, t in rules:
        pol = lm.ExitPolicy(measure=measure or "max_prob", threshold=t)
        lm.generate(model, PROMPT, 8, pol)  # warm-up
        walls, g = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            g = lm.generate(model, PROMPT, tokens, pol)
            walls.append(time.perf_counter() - t0)
        prefill = _char_prefill_s(model, lm)
        e = np.asarray(g.exit_layer[1:])  # the first token comes from the prefill
        asked = costs.asked_reads(e, n) if t <= 1 else np.zeros(len(e))
        yield (
            label,
            e,
            (statistics.median(walls) - prefill) * 1e3 / len(e),
            (costs.decode_ms(p, costs.time_unit(1), e + 1, asked).mean()),
        )


def _char_prefill_s(model, lm) -> float:
    ids = torch.tensor([lm.encode(PROMPT, model.config.vocab)])
    out = []
    for _ in range(5):
        cache = lm.KVCache.empty(model, 1)
        t0 = time.perf_counter()
        lm.prefill(model, ids, cache)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def decoder_rows(model, p, tokens: int, repeats: int):
    """The same for a pretrained decoder (``analysis.generate``), both K/V fills."""
    from engine.families.hf_causal_lm import analysis as A

    n = model.n_layer
    ids = A._check_prompt(model, list(range(1000, 1000 + 24)), tokens)
    low = 2 * n // 3
    rules = [("full depth", None, "propagate")] + [
        (f"max-prob >= {t}, from layer {low + 1}, {fill}", A.ExitRule("max_prob", t, low), fill)
        for t in (0.9, 0.6, 0.3)
        for fill in ("propagate", "lazy")
    ]
    for label, rule, fill in rules:
        A.generate(model, ids, 2, rule, fill=fill, stop_at_eos=False)  # warm-up
        walls, g = [], None
        for _ in range(repeats):
            g = A.generate(model, ids, tokens, rule, fill=fill, stop_at_eos=False)
            walls.append(g.seconds - g.prefill_seconds)
        e = np.asarray(g.exit_layer[1:])
        asked = costs.asked_reads(e, n, low) if rule else np.zeros(len(e))
        filled = (n - 1 - e) if fill == "propagate" else np.zeros(len(e))
        pred = costs.decode_ms(p, costs.time_unit(1), e + 1, asked, filled)
        yield label, e, statistics.median(walls) * 1e3 / len(e), pred.mean()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["bbc_char_early_exit_lm", "smollm2_135m"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--rounds", type=int, default=5, help="profile + every rule, again (the char LM only)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}  torch threads {torch.get_num_threads()}")
    for model_id in args.models:
        card = get_card(model_id)
        fam = families.get(card.family)
        t0 = time.perf_counter()
        model = fam.load(card)
        small = card.family == "early_exit_lm"
        rows = char_lm_rows if small else decoder_rows
        n = model.n_layer
        table = {}  # rule -> (mean layers, [measured], [predicted]) over rounds
        for _ in range(args.rounds if small else 1):
            p = prof.profile(card, batch=2, repeats=7, warmup=2)  # batch 1 is what is checked
            for label, e, meas, pred in rows(model, p, args.tokens, args.repeats):
                row = table.setdefault(label, (np.mean(e + 1), [], []))
                row[1].append(meas)
                row[2].append(pred)
        print(f"\n{model_id}: {args.rounds if small else 1} round(s) in "
              f"{time.perf_counter() - t0:.0f} s; last parts "
              f"{ {k: round(v, 3) for k, v in p.timings[1].parts_ms.items()} } ms")  # fmt: skip
        print(f"{'rule':44s} {'layers':>6s} {'meas ms':>8s} {'pred ms':>8s} {'ratio':>6s} "
              f"{'(range)':>11s} {'time frac':>9s} {'layer frac':>10s}")  # fmt: skip
        full = None
        for label, (layers, meas, pred) in table.items():
            ratio = np.asarray(meas) / np.asarray(pred)
            full = np.asarray(meas) if full is None else full
            print(f"{label:44s} {layers:6.2f} {np.median(meas):8.3f} {np.median(pred):8.3f} "
                  f"{np.median(ratio):6.2f} {ratio.min():5.2f}-{ratio.max():4.2f} "
                  f"{np.median(np.asarray(meas) / full):9.2f} {layers / n:10.2f}")  # fmt: skip
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
