"""Build the trace of a multi-exit model on an image data split.

Works for any model with the multi-exit contract: ``stages`` and ``heads`` (``nn.ModuleList``
of equal length K), stage k maps h_{k-1} to h_k (h_{-1} = the input), head k maps h_k to the
logits of exit k. Cascades fit the same contract (identity stages, one whole classifier per
head), so the same builder serves both.

Per sample and exit the trace holds the softmax probabilities; the cost is the cumulative FLOPs
of reaching exit k (stages and heads up to k, counted by torch on the modules as executed); the
latency is the cumulative measured wall-clock per sample, amortised over a batch. All three come
from ``engine.run.exits``, which the runtime and the inspector use too.

Command line: ``python -m engine.build MODEL`` (engine/build.py), for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.core.gates import with_joint_gates
from engine.core.progress import Progress
from engine.core.trace import Trace, TraceMeta
from engine.data import images
from engine.run.exits import ExitCosts, exit_costs, run_exits


def build_trace(
    model: nn.Module,
    dataset: str | images.ImageSet,
    split: str = "test",
    model_id: str = "model",
    batch_size: int = 256,
    exit_names: list[str] | None = None,
    sample_ids: np.ndarray | None = None,
    extra_meta: dict | None = None,
    progress: Progress | None = None,
) -> Trace:
    """The trace of ``model`` on a data split (a data set name, or an ``ImageSet`` already loaded).

    ``sample_ids`` default to the image's index in its split, so traces of different models on
    the same split line up sample by sample.
    """
    data = images.load(dataset, split) if isinstance(dataset, str) else dataset
    return trace_of_inputs(
        model,
        images.to_model_input(data.images),
        data.labels,
        data.class_names,
        data.name,
        data.split,
        model_id,
        batch_size,
        exit_names,
        sample_ids,
        extra_meta,
        progress,
    )


@dataclass(frozen=True)
class TraceInputs:
    """Everything a trace build runs the model on and writes beside its outputs, without the
    model: what a process that runs the model elsewhere (``engine.run.ray_build``) needs."""

    x: torch.Tensor  # [N, *input_shape] float32, prepared for the model
    labels: np.ndarray
    class_names: tuple[str, ...] | list[str]
    dataset: str
    split: str = "test"
    model_id: str = "model"
    batch_size: int = 256
    exit_names: list[str] | None = None
    sample_ids: np.ndarray | None = None
    extra_meta: dict | None = None


def trace_of_inputs(
    model: nn.Module,
    x: torch.Tensor,
    labels: np.ndarray,
    class_names: tuple[str, ...] | list[str],
    dataset: str,
    split: str = "test",
    model_id: str = "model",
    batch_size: int = 256,
    exit_names: list[str] | None = None,
    sample_ids: np.ndarray | None = None,
    extra_meta: dict | None = None,
    progress: Progress | None = None,
) -> Trace:
    """The trace of ``model`` on inputs already prepared for it (x [N, *input_shape] float32),
    for models whose inputs are not one of the image data sets (the user's own models)."""
    inputs = TraceInputs(
        x,
        labels,
        class_names,
        dataset,
        split,
        model_id,
        batch_size,
        exit_names,
        sample_ids,
        extra_meta,
    )
    probs, latency = run_exits(model, x, batch_size, progress)
    costs = exit_costs(model, tuple(x.shape[1:]))
    return trace_from_outputs(inputs, probs, latency, costs, torch.get_num_threads())


def trace_from_outputs(
    inputs: TraceInputs, probs: np.ndarray, latency: np.ndarray, costs: ExitCosts, threads: int
) -> Trace:
    """The trace of ``run_exits``' outputs on ``inputs`` (run with ``threads`` torch threads):
    the one place a trace's columns and metadata are assembled, in one process or after a
    distributed run."""
    k = probs.shape[1]
    n = len(inputs.x)
    meta = TraceMeta(
        model_id=inputs.model_id,
        exit_names=tuple(inputs.exit_names or [f"exit {e}" for e in range(k)]),
        class_names=tuple(inputs.class_names),
        dataset=inputs.dataset,
        split=inputs.split,
        extra={
            "flops_stage": [int(f) for f in costs.stage],
            "flops_head": [int(f) for f in costs.head],
            "latency": f"per-sample wall-clock, amortised over batches of {inputs.batch_size}, "
            f"torch eager CPU, {threads} thread(s)",
            **(inputs.extra_meta or {}),
        },
    )
    ids = (
        np.arange(n, dtype=np.int64) if inputs.sample_ids is None else np.asarray(inputs.sample_ids)
    )
    return Trace(
        meta=meta,
        sample_id=ids,
        label=np.asarray(inputs.labels, dtype=np.int64),
        probs=probs,
        cost=np.broadcast_to(costs.cumulative, (n, k)).copy(),
        latency_ms=latency,
    )


def trace_inputs_for_card(
    model_id: str, split: str = "test", dataset: str | None = None, batch_size: int = 256
) -> TraceInputs:
    """What ``build_trace_for_card`` runs a bundled image model on: its data set's split."""
    from engine.registry import get_card

    card = get_card(model_id)
    data = images.load(dataset or card.dataset, split)
    names = card.raw.get("exit_names") or card.raw.get("metrics", {}).get("exit_names")
    return TraceInputs(
        images.to_model_input(data.images),
        data.labels,
        data.class_names,
        data.name,
        data.split,
        model_id,
        batch_size,
        exit_names=names,
        extra_meta={"family": card.family, "weights_sha256": card.raw.get("weights_sha256")},
    )


def build_trace_for_card(
    model_id: str,
    split: str = "test",
    dataset: str | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> Trace:
    """Load a bundled model (SHA-256 checked) and trace it on its data set's split."""
    from engine.families import load_model

    inputs = trace_inputs_for_card(model_id, split, dataset, batch_size)
    model = load_model(model_id)
    return with_model_gates(trace_of_inputs(model, **vars(inputs), progress=progress), model)


def with_model_gates(trace: Trace, model: nn.Module) -> Trace:
    """A JEI model's trace carries its own jointly trained gates' scores (the runtime's live
    gate policy reads the same gates); any other model's trace is returned as it is."""
    if getattr(model, "gates", None) is None:
        return trace
    return with_joint_gates(trace, model.gates.scores(trace.probs))
