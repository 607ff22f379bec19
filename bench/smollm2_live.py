"""SmolLM2-135M live: load time, greedy tokens/s with the KV cache, self-speculation (acceptance
and speed ratio against greedy, measured in one run) and per-token early exit's agreement with
the full model, plus the logit lens and skip plans on a held-out BBC article.

Run: ``python bench/smollm2_live.py [spec] [exit] [lens]`` (one thread; ~8 minutes for all
three on a busy 2-core machine).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.families.hf_causal_lm import analysis as A  # noqa: E402
from engine.families.hf_causal_lm import model as M  # noqa: E402

PROMPTS = ("What is the capital of France?", "Write two sentences about the sea.")
NEW = 48


def main(parts: tuple[str, ...] = ("spec", "exit", "lens")) -> None:
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}")
    t = time.perf_counter()
    lm = M.load_smollm2()
    print(f"load: {time.perf_counter() - t:.1f} s")
    ps = [M.chat_ids(lm, q) for q in PROMPTS]
    refs, speed = [], []
    for p in ps:
        g = A.generate(lm, p, NEW)
        refs.append(g.tokens)
        speed.append(g.tokens_per_s)
        print(
            f"greedy {len(g.tokens)} tokens, {g.tokens_per_s:.1f} tok/s: {M.decode(lm, g.tokens)!r}"
        )
    base = sum(speed) / len(speed)
    print("\nself-speculation (exit after layer k, d drafts): acceptance, tok/s, x greedy")
    for k in (7, 14, 20, 24) if "spec" in parts else ():
        for d in (2, 4, 6):
            rs = [A.self_speculate(lm, p, NEW, d, exit_layer=k) for p in ps]
            assert all(r.tokens == ref for r, ref in zip(rs, refs, strict=True)), (d, k)
            acc = sum(r.accepted for r in rs) / sum(r.drafted for r in rs)
            tps = sum(r.tokens_per_s for r in rs) / len(rs)
            print(f"  k={k:2d} d={d}: acceptance {acc:.2f}, {tps:.1f} tok/s, x{tps / base:.2f}")
    print(
        "\nper-token early exit (CALM propagation) vs greedy: agreement, prefix, ppl, layers, exits"
    )
    rules = [
        A.ExitRule("max_prob", 0.8),
        A.ExitRule("max_prob", 0.8, min_layer=15),
        A.ExitRule("max_prob", 0.95, min_layer=15),
        A.ExitRule("margin", 0.8, min_layer=15),
        A.ExitRule("saturation", 0.95),
        A.ExitRule("saturation", 0.99),
    ]
    for rule in rules if "exit" in parts else ():
        for p, ref in zip(ps, refs, strict=True):
            g = A.generate(lm, p, NEW, rule)
            q = A.generation_quality(lm, p, g.tokens, ref)
            early = [e for e in g.exit_layer if e < lm.n_layer - 1]
            print(
                f"  {rule.measure}>={rule.threshold} (from layer {rule.min_layer}): agreement "
                f"{q.agreement:.2f} (next-token {q.next_token_agreement:.2f}), prefix "
                f"{q.prefix_match}/{len(ref)}, ppl {q.perplexity:.2f}, "
                f"layers {g.mean_layers:.1f}, {g.tokens_per_s:.1f} tok/s, "
                f"{len(early)} exits (lowest {min(early, default='-')})"
            )
    if "lens" not in parts:
        print(f"load average after: {os.getloadavg()}")
        return
    from engine.data.text import bbc_text

    ids = M.encode(lm, bbc_text("test")[:3000])[:128]
    lens = A.logit_lens(lm, ids)
    print(f"\nlogit lens on {len(ids)} BBC tokens (agreement / NLL by layer):")
    print(
        "  "
        + " ".join(
            f"{j}:{a:.2f}/{n:.1f}"
            for j, (a, n) in enumerate(zip(lens.agreement, lens.nll, strict=True))
        )
    )
    for n_skip in (3, 6):
        for name, plan in (
            ("middle", A.middle_block(30, n_skip)),
            ("spaced", A.evenly_spaced(30, n_skip)),
        ):
            q = A.evaluate_plan(lm, ids, plan)
            print(f"  skip {name} {plan}: agreement {q.agreement:.2f}, NLL {q.nll:.2f}")
        q = A.evaluate_plan(lm, ids, exit_layer=29 - n_skip)
        print(f"  exit after layer {29 - n_skip}: agreement {q.agreement:.2f}, NLL {q.nll:.2f}")
    for q in A.greedy_skip_order(lm, ids[:64], 3):
        print(f"  greedy skip {q.skip}: agreement {q.agreement:.2f}, NLL {q.nll:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("spec", "exit", "lens"))
