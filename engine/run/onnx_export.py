"""Export a multi-exit model to ONNX as a chain of per-stage and per-head graphs.

Early exit needs to stop between stages, so one ONNX graph per stage and per exit head is
exported (``stage_k.onnx``, ``head_k.onnx``) and the runtime (``engine.run.runtime``) calls them as a
chain of ONNX Runtime sessions, compacting the batch between them. Every graph has a dynamic
batch dimension (the dynamo exporter with ``torch.export.Dim("batch")``) so compacted batches of
any size run through the same session.

The int8 variant is made with ``onnxruntime.quantization.quantize_static`` (by default QOperator
format, int8 per-channel weights, uint8 activations, MinMax calibration; ``Int8Scheme`` says why
and names the alternatives the benchmark compares). Static quantisation was chosen
over ``quantize_dynamic`` because dynamic int8 turns convolutions into ``ConvInteger``, which
ONNX Runtime's CPU provider runs several times *slower* than float32 (bench/README.md), while
static int8 convolutions run as ``QLinearConv`` kernels (written as such in QOperator format,
fused from QuantizeLinear/DequantizeLinear pairs in QDQ format). Static
quantisation needs calibration inputs for every graph: the float model's own activations on a
few hundred calibration images.

Exports are cached under ``<cache_dir>/onnx/<model_id>-<hash>/`` where the hash covers the
weights, the module structure, the input shape and the library versions, so a retrained model
never reuses a stale export.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.core.progress import Progress, track
from engine.paths import cache_dir


@dataclass(frozen=True)
class OnnxChain:
    """Paths of one exported model: ``stages[k]`` maps h_{k-1} -> h_k, ``heads[k]`` h_k -> logits."""

    directory: Path
    stages: tuple[Path, ...]
    heads: tuple[Path, ...]
    precision: str  # "float32" or "int8"

    @property
    def num_exits(self) -> int:
        return len(self.stages)


def model_hash(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """SHA-256 (first 16 hex digits) of weights, structure, input shape and library versions."""
    import onnxruntime

    h = hashlib.sha256()
    h.update(repr(model).encode())
    h.update(repr(tuple(input_shape)).encode())
    h.update(f"{torch.__version__} {onnxruntime.__version__}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_dir(model: nn.Module, input_shape: tuple[int, ...], model_id: str | None) -> Path:
    tag = f"{model_id}-" if model_id else ""
    return cache_dir() / "onnx" / f"{tag}{model_hash(model, input_shape)}"


@contextlib.contextmanager
def _quiet(*names: str):
    """Silence the exporter's and quantiser's chatter (torchvision notices, pre-process hints)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_one(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """One module -> one ONNX file with a dynamic batch dimension, written atomically."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.onnx")
    with _quiet("torch.onnx", "onnxscript"), torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    tmp.replace(path)


def export_chain(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    model_id: str | None = None,
    directory: Path | None = None,
    progress: Progress | None = None,
) -> OnnxChain:
    """Export every stage and head of ``model`` (cached; re-exported only when missing),
    reporting each stage to ``progress``.

    ``input_shape`` is the shape of one sample (without the batch dimension; default
    ``engine.run.exits.model_input_shape``).
    """
    from engine.run.exits import model_input_shape

    input_shape = tuple(input_shape or model_input_shape(model))
    directory = Path(directory) if directory else default_dir(model, input_shape, model_id)
    directory.mkdir(parents=True, exist_ok=True)
    k = len(model.stages)
    stages = tuple(directory / f"stage_{i}.onnx" for i in range(k))
    heads = tuple(directory / f"head_{i}.onnx" for i in range(k))
    if all(p.exists() for p in stages + heads):
        return OnnxChain(directory, stages, heads, "float32")
    was_training = model.training
    model.eval()
    # batch 2: torch.export specialises dimensions of size 0 and 1
    h = torch.zeros((2, *input_shape))
    with torch.no_grad():
        pairs = list(enumerate(zip(model.stages, model.heads, strict=True)))
        for i, (stage, head) in track(pairs, "ONNX export (stages)", progress):
            if not stages[i].exists():
                _export_one(stage, h, stages[i])
            h = stage(h)
            if not heads[i].exists():
                _export_one(head, h, heads[i])
    model.train(was_training)
    return OnnxChain(directory, stages, heads, "float32")


class _Reader:
    """CalibrationDataReader over one array, in batches (duck-typed: get_next / rewind)."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 64):
        self.name, self.data, self.batch, self.pos = name, data, batch, 0

    def get_next(self):
        if self.pos >= len(self.data):
            return None
        out = {self.name: self.data[self.pos : self.pos + self.batch]}
        self.pos += self.batch
        return out

    def rewind(self):
        self.pos = 0


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


@dataclass(frozen=True)
class Int8Scheme:
    """How a graph is quantised (``onnxruntime.quantization.quantize_static`` arguments).

    ``fmt``: "qdq" (QuantizeLinear/DequantizeLinear pairs around float ops, fused by ORT into
    int8 kernels at session start) or "qoperator" (QLinearConv/QLinearMatMul written into the
    graph); ``per_channel``: one weight scale per output channel instead of per tensor;
    ``activation``: "int8" or "uint8" activations (weights are always int8).

    The default is what bench/multi_exit_cost.py measured fastest on this x86 CPU (AVX-512
    VNNI): uint8 activations × int8 weights, the pairing ONNX Runtime's x86 kernels are built
    for, ~0.65× float32's time; int8 × int8 (the former default, QDQ) was *slower* than float32
    (1.3–1.5×), and QOperator with int8 activations 4–6×."""

    fmt: str = "qoperator"
    per_channel: bool = True
    activation: str = "uint8"

    @property
    def tag(self) -> str:
        """Cache-folder name."""
        return f"int8-{self.fmt}-{'pc' if self.per_channel else 'pt'}-{self.activation}"


def quantize_chain(
    model: nn.Module,
    chain: OnnxChain,
    calibration: torch.Tensor,
    scheme: Int8Scheme | None = None,
    progress: Progress | None = None,
) -> OnnxChain:
    """Static int8 copies of every graph in ``chain`` (``scheme``, default ``Int8Scheme()``),
    calibrated on the float model's activations for ``calibration`` (a float
    input batch [M, *input_shape]). Cached next to the float export; the scheme and the
    calibration set are part of the cache key. ``progress``: each graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    scheme = scheme or Int8Scheme()
    if scheme.fmt not in ("qdq", "qoperator") or scheme.activation not in ("int8", "uint8"):
        raise ValueError(f"unknown int8 scheme {scheme}")
    calib_hash = hashlib.sha256(calibration.detach().cpu().numpy().tobytes()).hexdigest()[:8]
    qdir = chain.directory / f"{scheme.tag}-{calib_hash}"
    qdir.mkdir(parents=True, exist_ok=True)
    stages = tuple(qdir / p.name for p in chain.stages)
    heads = tuple(qdir / p.name for p in chain.heads)
    if all(p.exists() for p in stages + heads):
        return OnnxChain(qdir, stages, heads, "int8")
    # the float model's activations at every stage are the calibration inputs of the next graph
    inputs: list[tuple[Path, Path, np.ndarray]] = []
    h = calibration.float()
    with torch.no_grad():
        for i, stage in enumerate(model.stages):
            inputs.append((chain.stages[i], stages[i], h.numpy()))
            h = stage(h)
            inputs.append((chain.heads[i], heads[i], h.numpy()))
    for src, dst, data in track(inputs, "int8 quantisation (graphs)", progress):
        if dst.exists():
            continue
        pre = dst.with_suffix(f".pre{os.getpid()}.onnx")
        tmp = dst.with_suffix(f".tmp{os.getpid()}.onnx")
        with _quiet("", "onnxruntime"):
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            except Exception:  # pre-processing only helps; quantise the raw graph if it fails
                pre.write_bytes(src.read_bytes())
            quantize_static(
                str(pre),
                str(tmp),
                _Reader(_input_name(src), np.ascontiguousarray(data, dtype=np.float32)),
                quant_format=QuantFormat.QDQ if scheme.fmt == "qdq" else QuantFormat.QOperator,
                activation_type=QuantType.QInt8
                if scheme.activation == "int8"
                else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=scheme.per_channel,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        pre.unlink(missing_ok=True)
        tmp.replace(dst)
    return OnnxChain(qdir, stages, heads, "int8")


GRAPH_LEVELS = ("disable", "basic", "extended", "all")  # SessionOptions.graph_optimization_level


def session_options(threads: int, level: str = "all", optimized_path: Path | None = None):
    """ONNX Runtime options: ``threads`` intra-op threads, sequential, graph optimisation
    ``level`` (one of ``GRAPH_LEVELS``; "all" adds the layout transforms, NCHWc on x86, to
    "extended"'s fusions), and the optimised graph written to ``optimized_path`` if given."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"unknown graph optimisation level {level!r}; one of {GRAPH_LEVELS}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = levels[level]
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


class OnnxSessions:
    """ONNX Runtime sessions for a chain; ``stage(k, x)`` and ``head(k, h)`` take and return
    float32 numpy arrays. ``level``: graph optimisation level (``GRAPH_LEVELS``); with
    ``save_optimized`` each optimised graph is written to ``chain.directory/opt-<level>/``."""

    def __init__(
        self,
        chain: OnnxChain,
        threads: int | None = None,
        level: str = "all",
        save_optimized: bool = False,
    ):
        import onnxruntime as ort

        threads = threads or torch.get_num_threads()
        self.chain = chain
        self.threads = threads
        self.level = level
        out = chain.directory / f"opt-{level}"
        if save_optimized:
            out.mkdir(exist_ok=True)

        def make(p: Path):
            dst = out / f"{p.parent.name}-{p.name}" if save_optimized else None
            opts = session_options(threads, level, dst)
            s = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
            return s, s.get_inputs()[0].name

        self._stages = [make(p) for p in chain.stages]
        self._heads = [make(p) for p in chain.heads]

    def stage(self, k: int, x: np.ndarray) -> np.ndarray:
        sess, name = self._stages[k]
        return sess.run(None, {name: x})[0]

    def head(self, k: int, h: np.ndarray) -> np.ndarray:
        sess, name = self._heads[k]
        return sess.run(None, {name: h})[0]
