"""all-MiniLM-L6-v2 (frozen, from its package) with an exit head after every layer (DeeBERT)."""

from __future__ import annotations

import numpy as np
import torch

from engine.core.costs import count_flops
from engine.core.family import FamilyError, LiveRun, Timed
from engine.core.policies import Policy, stop_mask
from engine.families.common import TraceFamily
from engine.families.multi_exit_bert import model as meb
from engine.families.multi_exit_bert.train import cumulative_cost, trace_for


class MultiExitBert(TraceFamily):
    name = "multi_exit_bert"
    title = "early exit (MiniLM)"
    paper = "Xin 2020 (DeeBERT)"
    about = "A frozen pretrained encoder with a classifier after every layer."
    not_on_ray = (
        "its trace comes from backbone features computed once in length-sorted batches and "
        "cached; index-ordered shards would pad each batch differently"
    )

    def build(self, config: dict):
        return meb.build(config)

    def trace(self, card, split: str = "test", dataset: str | None = None, progress=None):
        if dataset not in (None, card.dataset):
            raise FamilyError(f"{card.model_id}: this family reads one data set only")
        return trace_for(card.model_id, split, progress)

    def live_input(self, card) -> str:
        return "text"

    def timed(self, card, model, batch: int) -> Timed:
        """Point k: embeddings, layers and heads 0..k on ``batch`` test tweets, padded to the
        model's length (the work of deciding at layer k)."""
        from engine.data.text import load_tweets

        texts = list(load_tweets("test", limit=batch).texts)
        texts = (texts * -(-batch // len(texts)))[:batch]
        ids, mask = meb.encode(texts, model.config.max_length)
        pairs = list(zip(model.stages, model.heads, strict=True))

        @torch.no_grad()
        def run(k: int):
            h = ids
            for stage, head in pairs[: k + 1]:
                h = stage(h, mask)
                z = head(h, mask)
            return z

        return Timed("exit", np.arange(len(pairs), dtype=np.float64), run, batch)

    @torch.no_grad()
    def run_one(self, model, card, x: str, value: float) -> LiveRun:
        """One text, layer by layer, stopping at the first exit whose max probability reaches
        ``value`` (the traces' rule, ``stop_mask``); the layers above it are not run."""
        policy = Policy("max_prob", threshold=float(value))
        ids, mask = meb.encode([x], model.config.max_length)
        h, seen, spent = ids, [], 0
        for k, (stage, head) in enumerate(zip(model.stages, model.heads, strict=True)):
            f_stage, h = count_flops(stage, h, mask)
            f_head, logits = count_flops(head, h, mask)
            spent += f_stage + f_head
            seen.append(torch.softmax(logits.float(), -1)[0].numpy())
            if stop_mask(policy, np.stack(seen)[None])[0, k] or k == model.num_exits - 1:
                break
        n = model.num_exits
        coef = card.raw.get("metrics", {}).get("flops_coefficients")
        full = (
            cumulative_cost(np.asarray(coef, dtype=np.float64), mask.sum(1).numpy())[0, -1]
            if coef
            else float("nan")
        )
        return LiveRun(
            prediction=int(seen[-1].argmax()),
            confidence=float(seen[-1].max()),
            cost=float(spent),
            full_cost=float(full),
            decision=f"left at layer {k + 1} of {n}",
            steps=np.array([p.max() for p in seen] + [np.nan] * (n - len(seen))),
            ran=np.arange(n) <= k,
            probs=np.stack(seen),
            detail={"exit": k},
        )


FAMILY = MultiExitBert()
