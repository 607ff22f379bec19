"""Build the trace of a multi-exit model on an image data split.

Works for any model with the multi-exit contract: ``stages`` and ``heads`` (``nn.ModuleList``
of equal length K), stage k maps h_{k-1} to h_k (h_{-1} = the input), head k maps h_k to the
logits of exit k. Cascades fit the same contract (identity stages, one whole classifier per
head), so the same builder serves both.

Per sample and exit the trace holds the softmax probabilities; the cost is the cumulative FLOPs
of reaching exit k (stages and heads up to k, counted by torch on the modules as executed); the
latency is the cumulative measured wall-clock per sample, amortised over a batch.

Command line: ``python -m engine.build MODEL`` (engine/build.py), for every family.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from engine.core.costs import count_flops
from engine.core.trace import Trace, TraceMeta
from engine.data import images


def _check_contract(model: nn.Module) -> int:
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(heads, nn.ModuleList):
        raise TypeError("a multi-exit model needs `stages` and `heads` nn.ModuleLists")
    if len(stages) != len(heads) or len(stages) == 0:
        raise TypeError("`stages` and `heads` must have the same, non-zero length")
    return len(stages)


@torch.no_grad()
def exit_flops(model: nn.Module, x: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """FLOPs per sample of each stage and each head, counted on one input."""
    _check_contract(model)
    h = torch.zeros(1, 1, images.SIZE, images.SIZE) if x is None else x[:1]
    stage_f, head_f = [], []
    for stage, head in zip(model.stages, model.heads, strict=True):
        f, h = count_flops(stage, h)
        stage_f.append(int(f))
        head_f.append(int(count_flops(head, h)[0]))
    return stage_f, head_f


@torch.no_grad()
def run_exits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, K, C] float32, latency_ms [N, K] cumulative, per sample) of ``model`` on x.

    Latency is measured per batch, piece by piece (stage k, then head k), divided by the batch
    size: the amortised per-sample wall-clock of reaching exit k at this batch size.
    """
    k = _check_contract(model)
    model.eval()
    n = len(x)
    probs, lat = None, np.zeros((n, k), dtype=np.float64)
    for i in range(0, n, batch_size):
        h = x[i : i + batch_size]
        b = len(h)
        spent = 0.0
        for e, (stage, head) in enumerate(zip(model.stages, model.heads, strict=True)):
            t0 = time.perf_counter()
            h = stage(h)
            z = head(h)
            spent += time.perf_counter() - t0
            p = torch.softmax(z.float(), dim=1).numpy()
            if probs is None:
                probs = np.zeros((n, k, p.shape[1]), dtype=np.float32)
            probs[i : i + b, e] = p
            lat[i : i + b, e] = spent * 1e3 / b
    return probs, lat


def build_trace(
    model: nn.Module,
    dataset: str | images.ImageSet,
    split: str = "test",
    model_id: str = "model",
    batch_size: int = 256,
    exit_names: list[str] | None = None,
    sample_ids: np.ndarray | None = None,
    extra_meta: dict | None = None,
) -> Trace:
    """The trace of ``model`` on a data split (a data set name, or an ``ImageSet`` already loaded).

    ``sample_ids`` default to the image's index in its split, so traces of different models on
    the same split line up sample by sample.
    """
    data = images.load(dataset, split) if isinstance(dataset, str) else dataset
    x = images.to_model_input(data.images)
    probs, latency = run_exits(model, x, batch_size)
    stage_f, head_f = exit_flops(model)
    cumulative = np.cumsum(np.array(stage_f, dtype=np.float64) + np.array(head_f))
    k = probs.shape[1]
    n = len(x)
    meta = TraceMeta(
        model_id=model_id,
        exit_names=tuple(exit_names or [f"exit {e}" for e in range(k)]),
        class_names=tuple(data.class_names),
        dataset=data.name,
        split=data.split,
        extra={
            "flops_stage": stage_f,
            "flops_head": head_f,
            "latency": f"per-sample wall-clock, amortised over batches of {batch_size}, "
            f"torch eager CPU, {torch.get_num_threads()} thread(s)",
            **(extra_meta or {}),
        },
    )
    ids = np.arange(n, dtype=np.int64) if sample_ids is None else np.asarray(sample_ids)
    return Trace(
        meta=meta,
        sample_id=ids,
        label=np.asarray(data.labels, dtype=np.int64),
        probs=probs,
        cost=np.broadcast_to(cumulative, (n, k)).copy(),
        latency_ms=latency,
    )


def build_trace_for_card(
    model_id: str, split: str = "test", dataset: str | None = None, batch_size: int = 256
) -> Trace:
    """Load a bundled model (SHA-256 checked) and trace it on its data set's split."""
    from engine.families import load_model
    from engine.registry import get_card

    card = get_card(model_id)
    model = load_model(model_id)
    names = card.raw.get("exit_names") or card.raw.get("metrics", {}).get("exit_names")
    return build_trace(
        model,
        dataset or card.dataset,
        split,
        model_id,
        batch_size,
        exit_names=names,
        extra_meta={"family": card.family, "weights_sha256": card.raw.get("weights_sha256")},
    )
