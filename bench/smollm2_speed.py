"""SmolLM2-135M speed: tokens/s of every decoding path, FLOPs-predicted versus measured speed-up.

Paths, at batch 1 and batch 8 (the same chat prompts, greedy, a fixed number of new tokens):
full model without a KV cache (every step re-runs the whole sequence), greedy with the KV
cache (the baseline of every ratio), per-token early exit (CALM, max-prob thresholds and one
saturation threshold, K/V propagated), skipping a middle block of layers, and self-speculation
(LayerSkip; batch 1 only: ``analysis.self_speculate`` decodes one sequence). At batch 8 early
exit runs twice: with the batch compacted to the rows still active at each layer, and without
(a layer runs while any row needs it), which is what batching does to the speed-up.

Per path, decode only (each prompt's prefill, timed and counted separately, subtracted):
- tok/s, and measured speed-up = its tok/s / greedy's at the same batch size;
- layers/token and layer-predicted speed-up (greedy's layers / its layers);
- FLOPs/token (weight matmuls counted by forward hooks: decoder layers, the 49,152-word head
  each confidence check and each token pays, CALM's K/V projections) and FLOPs-predicted
  speed-up; realised = measured / FLOPs-predicted (target >= 0.8 for exit and skip at batch 1);
- weight bytes read per token (each layer or head call reads its weights once, whatever its
  rows) and the speed-up that predicts: at one thread a small batch is bound by memory, not
  FLOPs, which is why batching and verification passes are cheaper than their FLOPs.
Self-speculation adds its acceptance rate per draft depth d and exit layer k. Load time: cold =
a fresh Python process (imports, GGUF dequantisation, first answer; the file in the OS cache),
warm = a second load in the same process, and the cached object (the app's loader) answering.

Run: ``python bench/smollm2_speed.py --quick`` (smoke run, < 2 min) or without ``--quick``
(the full table; estimated 30-60 min on one thread of a quiet machine). Prints the load average
before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.families.hf_causal_lm import analysis as A  # noqa: E402
from engine.families.hf_causal_lm import batched as B  # noqa: E402
from engine.families.hf_causal_lm import model as M  # noqa: E402

PROMPTS = (
    "What is the capital of France?",
    "Write two sentences about the sea.",
    "Name three colours.",
    "How do plants make food?",
    "Give me a tip for learning to cook.",
    "What is a prime number?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
)
ANSWER = "What is the capital of France?"


class FlopCounter:
    """Forward hooks counting the rows (positions) through each decoder layer, the head and the
    K/V projections; FLOPs = 2 x weights x rows (attention scores, norms and softmax left out:
    under 10 % of a layer at these lengths)."""

    def __init__(self, lm: M.CausalLM):
        layer = lm.layers[0]
        attn = layer.self_attn
        self.layer_flops = 2 * sum(
            m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)
        )
        self.head_flops = 2 * lm.hf.lm_head.weight.numel()
        self.kv_flops = 2 * (attn.k_proj.weight.numel() + attn.v_proj.weight.numel())
        self.layer_rows = self.head_rows = self.kv_rows = 0
        self.layer_calls = self.head_calls = self.kv_calls = 0
        self._handles = [lm.hf.lm_head.register_forward_hook(self._count("head"))]
        for lay in lm.layers:
            self._handles.append(lay.register_forward_pre_hook(self._count("layer")))
            self._handles.append(lay.self_attn.k_proj.register_forward_hook(self._count("kv")))

    def _count(self, name):
        def hook(module, args, *_):
            setattr(
                self, f"{name}_rows", getattr(self, f"{name}_rows") + args[0].shape[:-1].numel()
            )
            setattr(self, f"{name}_calls", getattr(self, f"{name}_calls") + 1)

        return hook

    def snapshot(self) -> tuple[int, float, float]:
        """(layer rows, FLOPs, weight bytes read) so far: each call reads its weights once,
        whatever its rows (float32); K/V projections outside a layer are CALM's propagation."""
        flops = (
            self.layer_rows * self.layer_flops
            + self.head_rows * self.head_flops
            + (self.kv_rows - self.layer_rows) * self.kv_flops
        )
        read = (
            self.layer_calls * self.layer_flops
            + self.head_calls * self.head_flops
            + (self.kv_calls - self.layer_calls) * self.kv_flops
        ) * 2  # 2 FLOPs per float32 weight = 4 bytes
        return self.layer_rows, float(flops), float(read)

    def close(self):
        for h in self._handles:
            h.remove()


@dataclass
class Row:
    name: str
    batch: int
    tokens: int  # decode tokens (the prefill's first token left out)
    seconds: float  # decode seconds (best of the repeats)
    layer_rows: int
    flops: float
    read: float  # weight bytes
    agreement: float = math.nan  # tokens equal to greedy's at the same position
    acceptance: float = math.nan

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


def timed(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(counter, name, batch, run, prefill, repeats, n_rows, n_new, ref=None, outs=None):
    """Time ``run`` (best of repeats) and count one run; subtract the prefill's share."""
    r0, f0, b0 = counter.snapshot()
    seconds, out = timed(run, 1)
    r1, f1, b1 = counter.snapshot()
    if repeats > 1:
        seconds = min(seconds, timed(run, repeats - 1)[0])
    p_sec, p_rows, p_flops, p_read = prefill
    toks = outs(out) if outs else out
    row = Row(
        name,
        batch,
        n_rows * (n_new - 1),
        max(seconds - p_sec, 1e-9),
        r1 - r0 - p_rows,
        f1 - f0 - p_flops,
        b1 - b0 - p_read,
    )
    if ref is not None:
        same = sum(
            a == b for t, r in zip(toks, ref, strict=True) for a, b in zip(t, r, strict=False)
        )
        row.agreement = same / sum(len(r) for r in ref)
    return row, out


def counted(counter, run, repeats):
    """(seconds, best of repeats; layer rows, FLOPs, weight bytes of one run) of ``run``."""
    r0, f0, b0 = counter.snapshot()
    run()
    r1, f1, b1 = counter.snapshot()
    return timed(run, repeats)[0], r1 - r0, f1 - f0, b1 - b0


def prefill_cost(counter, lm, prompts, batch, skip, repeats):
    """The prompts' prefill as each path runs it: one walk per prompt at batch 1 (the head on
    every row, as ``analysis.generate``), one padded walk at batch 8, at full depth but ``skip``."""
    skip = frozenset(skip)

    def run():
        if batch == 1:
            for p in prompts:
                M.walk(lm, M.LayerCache(lm.n_layer), p, skip=skip)
        else:
            ids, pads = B._left_pad([list(p) for p in prompts])
            cache = B.BatchCache.empty(lm, pads, ids.shape[1] + 1)
            B.walk_batch(lm, cache, torch.arange(len(prompts)), ids, skip=skip)

    return counted(counter, run, repeats)


def nocache_prefill(counter, lm, prompts, batch, repeats):
    """The no-cache path's first step: one full ``forward`` of the prompts."""
    if batch == 1:
        return counted(
            counter,
            lambda: [B.generate_batch_nocache(lm, [p], 1, stop_at_eos=False) for p in prompts],
            repeats,
        )
    return counted(
        counter, lambda: B.generate_batch_nocache(lm, prompts, 1, stop_at_eos=False), repeats
    )


def load_times(threads: int) -> None:
    child = (
        "import sys, time\n"
        "import torch\n"
        f"torch.set_num_threads({threads})\n"
        "from engine.families.hf_causal_lm import analysis as A, model as M\n"
        "lm = M.load_smollm2()\n"
        "t = time.time()\n"
        f"g = A.generate(lm, M.chat_ids(lm, {ANSWER!r}), 12)\n"
        "print(t, time.time(), repr(M.decode(lm, g.tokens)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if res.returncode:
        print(f"cold load failed: {res.stderr[-500:]}")
        return
    loaded, answered, text = res.stdout.strip().split(" ", 2)
    print(
        f"cold (fresh process: imports + load + 12-token answer): {float(answered) - t0:.1f} s "
        f"(loaded after {float(loaded) - t0:.1f} s; target < 30 s) -> {text}"
    )


def warm_times(lm, reload: bool) -> None:
    if reload:
        t = time.perf_counter()
        lm2 = M.load_smollm2()
        t_load = time.perf_counter() - t
        A.generate(lm2, M.chat_ids(lm2, ANSWER), 12)
        print(
            f"warm reload in-process: load {t_load:.1f} s, + answer {time.perf_counter() - t:.1f} s"
        )
    t = time.perf_counter()
    g = A.generate(lm, M.chat_ids(lm, ANSWER), 12)
    print(
        f"warm: the cached object (the app's loader) -> 12-token answer: "
        f"{time.perf_counter() - t:.2f} s (target < 2 s) -> {M.decode(lm, g.tokens)!r}"
    )


def table(rows: list[Row], base: dict[int, Row]) -> None:
    print(
        "| path | batch | tok/s | measured × | layers/token | layer-pred × | GFLOPs/token "
        "| FLOPs-pred × | realised | MB read/token | read-pred × | agreement | acceptance |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[r.batch]
        meas = r.tps / b.tps
        lay = (b.layer_rows / b.tokens) / (r.layer_rows / r.tokens)
        pred = (b.flops / b.tokens) / (r.flops / r.tokens)
        rpred = (b.read / b.tokens) / (r.read / r.tokens)
        acc = "" if math.isnan(r.acceptance) else f"{r.acceptance:.2f}"
        agr = "" if math.isnan(r.agreement) else f"{r.agreement:.2f}"
        print(
            f"| {r.name} | {r.batch} | {r.tps:.1f} | {meas:.2f} | {r.layer_rows / r.tokens:.1f} "
            f"| {lay:.2f} | {r.flops / r.tokens / 1e9:.3f} | {pred:.2f} | {meas / pred:.2f} "
            f"| {r.read / r.tokens / 1e6:.0f} | {rpred:.2f} | {agr} | {acc} |"
        )


def exit_name(rule: A.ExitRule) -> str:
    floor = f" from layer {rule.min_layer + 1}" if rule.min_layer else ""
    return f"exit {rule.measure} ≥ {rule.threshold}{floor}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="best of (default 1 quick, 3)")
    args = ap.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    if not quick:
        load_times(args.threads)
    t = time.perf_counter()
    lm = M.load_smollm2()
    print(f"load in this process: {time.perf_counter() - t:.1f} s")
    warm_times(lm, reload=not quick)
    n = lm.n_layer
    new = 8 if quick else 32
    ps8 = [M.chat_ids(lm, q) for q in PROMPTS]
    ps1 = ps8[:2] if quick else ps8
    # max-prob pays a head call per layer checked; saturation (cosine of consecutive states) none
    rules = [A.ExitRule("max_prob", t) for t in ((0.9,) if quick else (0.5, 0.7, 0.9))]
    # the page's default floor: exits only from layer 21 on (earlier layers echo their input)
    rules += [] if quick else [A.ExitRule("max_prob", 0.9, 20), A.ExitRule("saturation", 0.99)]
    skips = (6,) if quick else (3, 6)
    specs = ((4, (20,)),) if quick else tuple((d, (7, 14, 20, 24)) for d in (2, 4, 6))
    counter = FlopCounter(lm)
    print(
        f"\n{len(ps1)} prompts at batch 1, {len(ps8)} at batch 8, {new} new tokens each, "
        f"{args.threads} thread(s), best of {repeats}; FLOPs per row: layer "
        f"{counter.layer_flops / 1e6:.1f} M, head {counter.head_flops / 1e6:.1f} M"
    )
    rows: list[Row] = []
    base: dict[int, Row] = {}

    # --- batch 1 ---
    def gen1(**kw):
        return lambda: [A.generate(lm, p, new, stop_at_eos=False, **kw).tokens for p in ps1]

    pre = prefill_cost(counter, lm, ps1, 1, (), repeats)
    g1, ref1 = measure(counter, "greedy, KV cache", 1, gen1(), pre, repeats, len(ps1), new)
    base[1] = g1
    nc_pre = nocache_prefill(counter, lm, ps1, 1, repeats)

    def nocache1():
        return [B.generate_batch_nocache(lm, [p], new, stop_at_eos=False) for p in ps1]

    r, _ = measure(
        counter, "full, no KV cache", 1, nocache1, nc_pre, repeats, len(ps1), new, ref1,
        outs=lambda o: [b.generations[0].tokens for b in o],
    )  # fmt: skip
    rows += [r, g1]
    for rule in rules:
        r, _ = measure(
            counter, exit_name(rule), 1, gen1(rule=rule), pre, repeats,
            len(ps1), new, ref1,
        )  # fmt: skip
        rows.append(r)
    for k in skips:
        plan = A.middle_block(n, k)
        pre_s = prefill_cost(counter, lm, ps1, 1, plan, repeats)
        r, _ = measure(
            counter, f"skip middle {k} {plan[0]}-{plan[-1]}", 1, gen1(skip=plan), pre_s, repeats,
            len(ps1), new, ref1,
        )  # fmt: skip
        rows.append(r)
    for d, layers in specs:
        for k in layers:

            def spec(d=d, k=k):
                return [A.self_speculate(lm, p, new, d, exit_layer=k, stop_at_eos=False)
                        for p in ps1]  # fmt: skip

            r, out = measure(
                counter, f"self-spec d={d} k={k}", 1, spec, pre, repeats, len(ps1), new, ref1,
                outs=lambda o: [s.tokens for s in o],
            )  # fmt: skip
            r.acceptance = sum(s.accepted for s in out) / max(1, sum(s.drafted for s in out))
            assert r.agreement == 1.0, "self-speculation must be greedy decoding"
            rows.append(r)

    # --- batch 8 ---
    def gen8(**kw):
        return lambda: B.generate_batch(lm, ps8, new, stop_at_eos=False, **kw)

    def toks(bg):
        return [g.tokens for g in bg.generations]

    ref8 = [A.greedy(lm, p, new, stop_at_eos=False) for p in ps8] if not quick else None
    pre8 = prefill_cost(counter, lm, ps8, 8, (), repeats)
    g8, out = measure(counter, "greedy, KV cache", 8, gen8(), pre8, repeats, 8, new, ref8, toks)
    ref8 = ref8 or toks(out)
    base[8] = g8
    nc8 = nocache_prefill(counter, lm, ps8, 8, repeats)
    r, _ = measure(
        counter, "full, no KV cache", 8,
        lambda: B.generate_batch_nocache(lm, ps8, new, stop_at_eos=False), nc8, repeats, 8, new,
        ref8, toks,
    )  # fmt: skip
    rows += [r, g8]
    for rule in rules:
        for compact in (True, False):
            name = f"{exit_name(rule)}, " + ("compacted" if compact else "not compacted")
            r, _ = measure(
                counter, name, 8, gen8(rule=rule, compact=compact), pre8, repeats, 8, new, ref8,
                toks,
            )  # fmt: skip
            rows.append(r)
    for k in skips:
        plan = A.middle_block(n, k)
        pre_s = prefill_cost(counter, lm, ps8, 8, plan, repeats)
        r, _ = measure(
            counter, f"skip middle {k} {plan[0]}-{plan[-1]}", 8, gen8(skip=plan), pre_s,
            repeats, 8, new, ref8, toks,
        )  # fmt: skip
        rows.append(r)
    counter.close()

    print("\nDecode only (prefill subtracted); × = against greedy with the KV cache, same batch:")
    table(rows, base)
    print(
        f"\nbatching: greedy at batch 8 gives {g8.tps / g1.tps:.2f}× the tokens/s of batch 1 "
        "(8 rows share each weight read)."
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
