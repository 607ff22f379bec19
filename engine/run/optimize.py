"""Inference variants of a multi-exit model's stages, to close the gap between FLOPs and time.

FLOPs count multiply-adds; on a CPU the batch norms, ReLUs and memory traffic between them cost
time that FlopCounterMode does not see (bench/README.md: stage 1 is 28% of the FLOPs, ~70% of
the time). Libraries remove part of that; this module builds each variant so the benchmark
(``bench/multi_exit_cost.py``) can time it against the plain one, stage by stage:

- ``fold_bn``: every Conv2d → BatchNorm2d pair folded into one convolution, by
  ``torch.fx.experimental.optimization.fuse`` (it traces the module with torch.fx and applies
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` to each pair; works on any fx-traceable stage, the
  residual blocks' shortcut included);
- ``fold_bn_cl``: the same in ``torch.channels_last`` memory format (the input is converted
  once; oneDNN's NHWC convolutions avoid the NCHW reorders);
- ``compile``: ``fold_bn_cl`` under ``torch.compile`` (Inductor, C++ codegen with the system
  compiler, offline); its compile time is reported separately, never inside a timed run;
- ONNX Runtime graph optimisation levels (``engine.run.onnx_export.GRAPH_LEVELS``) and int8
  schemes (``engine.run.onnx_export.Int8Scheme``: QDQ or QOperator, per-channel or per-tensor
  weights), and a *mixed* chain that keeps int8 only for the stages where it was measured to
  pay (``pick_int8_stages``, ``mixed_chain``).

Float variants compute the same function up to float rounding (folding changes the summation
order), so they are not bit-for-bit the traces: ``agreement`` measures how far (argmax equal,
max |Δprob|); ``tests/test_optimize.py`` asserts it.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

TORCH_VARIANTS = ("eager", "fold_bn", "fold_bn_cl", "compile")
# what the runtime's "torch_opt" backend runs: the fastest variant without a compile step
# (bench/multi_exit_cost.py: 0.65x eager's time at batch 256; torch.compile is no faster here
# and costs about a minute of compilation per model and batch shape)
RUNTIME_VARIANT = "fold_bn_cl"


@dataclass
class TorchStages:
    """A multi-exit model's stages and heads as one inference variant (``TORCH_VARIANTS``)."""

    name: str
    stages: list[nn.Module]
    heads: list[nn.Module]
    channels_last: bool = False
    build_s: float = 0.0  # folding / wrapping time (torch.compile compiles lazily, on first call)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the memory format the stages expect."""
        x = x.float()
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def fold_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every Conv2d → BatchNorm2d folded into the convolution."""
    from torch.fx.experimental.optimization import fuse

    if module.training:
        raise ValueError("batch norm can only be folded in eval mode (model.eval())")
    try:
        return fuse(module, inplace=False)
    except Exception as e:  # torch.fx cannot trace data-dependent control flow
        raise ValueError(f"cannot fold batch norm: torch.fx cannot trace this stage ({e})") from e


def torch_stages(model: nn.Module, variant: str = "fold_bn_cl") -> TorchStages:
    """The stages and heads of ``model`` (eval mode, CPU or CUDA) as ``variant``; the model
    itself is never modified."""
    if variant not in TORCH_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {TORCH_VARIANTS}")
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) first")
    t0 = time.perf_counter()
    if variant == "eager":
        return TorchStages(variant, list(model.stages), list(model.heads))
    stages = [fold_bn(s) for s in model.stages]
    heads = [copy.deepcopy(h) for h in model.heads]
    cl = variant in ("fold_bn_cl", "compile")
    if cl:
        stages = [s.to(memory_format=torch.channels_last) for s in stages]
    if variant == "compile":
        stages = [torch.compile(s, dynamic=False) for s in stages]
        heads = [torch.compile(h, dynamic=False) for h in heads]
    return TorchStages(variant, stages, heads, cl, time.perf_counter() - t0)


# --- measuring -------------------------------------------------------------------------------


def stage_times(
    stage: Callable[[int, object], object],
    head: Callable[[int, object], object],
    x: object,
    num_stages: int,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> np.ndarray:
    """[K] median milliseconds of stage k + head k on the activations ``x`` produces (the
    runtime's ``run_full`` unit), stages chained as in a full run. Backend-neutral: ``stage``
    and ``head`` are e.g. a chain's methods. ``clock``: wall-clock by default;
    ``time.process_time`` counts CPU time only, which a busy machine inflates far less."""
    runs = []
    for _ in range(repeats):
        h, row = x, []
        for k in range(num_stages):
            t0 = clock()
            h = stage(k, h)
            head(k, h)
            row.append((clock() - t0) * 1e3)
        runs.append(row)
    return np.array([statistics.median(c) for c in zip(*runs, strict=True)])


@dataclass(frozen=True)
class Agreement:
    """A variant's exits against the reference's on the same inputs."""

    argmax_equal: np.ndarray  # [K] share of samples whose predicted class is the reference's
    max_abs_dprob: np.ndarray  # [K] largest |Δ softmax probability| over samples and classes
    accuracy: np.ndarray | None = None  # [K] the variant's accuracy, when labels are given


def agreement(
    reference: Sequence[np.ndarray], logits: Sequence[np.ndarray], labels: np.ndarray | None = None
) -> Agreement:
    """Compare per-exit logits ([K] arrays [N, C]) of a variant with the reference's."""
    eq, dp, acc = [], [], []
    for r, z in zip(reference, logits, strict=True):
        pr = torch.softmax(torch.as_tensor(r).float(), -1).numpy()
        pz = torch.softmax(torch.as_tensor(z).float(), -1).numpy()
        eq.append(float(np.mean(pr.argmax(-1) == pz.argmax(-1))))
        dp.append(float(np.abs(pr - pz).max()))
        if labels is not None:
            acc.append(float(np.mean(pz.argmax(-1) == labels)))
    return Agreement(np.array(eq), np.array(dp), np.array(acc) if labels is not None else None)


def all_logits(stage, head, x, num_stages: int) -> list[np.ndarray]:
    """Every exit's logits as numpy arrays, one chained pass."""
    out, h = [], x
    for k in range(num_stages):
        h = stage(k, h)
        z = head(k, h)
        out.append(z.detach().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z))
    return out


# --- int8 only where it pays -----------------------------------------------------------------


def pick_int8_stages(
    float_ms: Sequence[float], int8_ms: Sequence[float], margin: float = 0.9
) -> tuple[bool, ...]:
    """Which stages to run in int8: those measured at most ``margin`` × their float time (a
    stage that is only marginally faster is not worth the accuracy it costs)."""
    return tuple(bool(q <= margin * f) for f, q in zip(float_ms, int8_ms, strict=True))


def mixed_chain(float_chain, int8_chain, use_int8: Sequence[bool]):
    """An ``OnnxChain`` taking stage k from ``int8_chain`` where ``use_int8[k]``, the float one
    elsewhere; heads stay float (a few thousand FLOPs: nothing to gain, confidence to lose).
    Every graph maps float32 to float32, so they chain whatever their precision."""
    from engine.run.onnx_export import OnnxChain

    stages = tuple(
        q if use else f
        for f, q, use in zip(float_chain.stages, int8_chain.stages, use_int8, strict=True)
    )
    tag = "".join("q" if u else "f" for u in use_int8)
    return OnnxChain(int8_chain.directory, stages, float_chain.heads, f"mixed-{tag}")
