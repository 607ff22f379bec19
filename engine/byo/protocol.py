"""Way in: a PyTorch model in your own Python file (stages + one exit head per stage).

``python -m engine.byo torch MODEL.py --weights W.safetensors --data DATA --name ID
[--overwrite]``

The protocol. ``MODEL.py`` is a self-contained Python file (it may import installed packages,
not files beside it) that defines

- ``build_model()`` returning an ``nn.Module`` with two attributes, ``stages`` and ``heads``,
  both ``nn.ModuleList`` of the same length K: stage k maps h_{k-1} to h_k (h_{-1} is the input
  batch ``[B, *INPUT_SHAPE]``) and must keep the batch dimension first; head k maps h_k to the
  logits ``[B, C]`` of exit k, with the same C for every head. Each sample's result must not
  depend on the other samples in its batch (the runtime shrinks batches as samples exit; this
  is checked on four rows of the data against two of them).
- ``INPUT_SHAPE``: one sample's shape, any rank, e.g. ``(3, 32, 32)`` or ``(40,)``.
- ``CLASSES`` (optional): C class names; by default ``"0"`` … ``"C-1"``.

``W.safetensors`` holds the network's ``state_dict()`` (``safetensors.torch.save_file``); it is
loaded with ``load_state_dict(strict=True)``. Pickled weights (``.pt``, ``.bin``, ...) are
refused. ``DATA`` (``.safetensors`` or ``.npz``, read with ``allow_pickle=False``) holds ``x``
``[N, *INPUT_SHAPE]`` float32, already preprocessed as the model expects, and ``y`` ``[N]``
integer labels in ``0..C-1``; row i is sample id i in the app.

What it does: imports the file, builds the model, runs a batch of four inputs through every
stage and head to check the shapes, loads the weights, checks the data, then traces the model over the data
(every exit's probabilities per sample, FLOPs per exit) and registers it: a card in the user
model folder (``engine.paths.user_models_dir``) with the weights copied beside it, and the trace
in ``engine.paths.user_traces_dir``, where the tuning page, the inspector and the runtime find
it. Any problem is one sentence on stderr (exit code 2) and nothing already saved is replaced
without ``--overwrite``.

This runs your code: importing ``MODEL.py`` executes it, now and whenever the app loads the
model later (from the path recorded in the card, only after checking the file's SHA-256 against
the one recorded now: if you edit the file, register it again with ``--overwrite``). Code is
only ever loaded from a file you named on this command line, never from a browser upload.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from engine.byo import ByoError
from engine.core.trace import TraceError
from engine.families.torch_protocol import model as protocol
from engine.registry import sha256_file

COMMAND = "torch"
HELP = "a PyTorch model in your own Python file (stages + one exit head per stage)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Register a multi-exit PyTorch model defined in your own Python file: build_model() "
        "returning a module with `stages` and `heads` (nn.ModuleList, one head per stage), "
        "INPUT_SHAPE and optionally CLASSES (see engine/byo/protocol.py). This imports and "
        "runs MODEL.py, now and whenever the app loads the model."
    )
    p.add_argument("model_file", metavar="MODEL.py", type=Path, help="your protocol file")
    p.add_argument(
        "--weights", required=True, type=Path, help="the state_dict as .safetensors (no pickles)"
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="evaluation data: .safetensors or .npz with x [N, *INPUT_SHAPE] float32, y [N] int",
    )
    p.add_argument("--name", required=True, help="model id in the app (lower-case, 1-64 chars)")
    p.add_argument("--title", help="name shown in the model picker (default: the id)")
    p.add_argument("--overwrite", action="store_true", help="replace a user model of the same name")


def register(
    model_file: Path,
    weights: Path,
    data: Path,
    name: str,
    overwrite: bool = False,
    title: str | None = None,
    progress=None,
):
    """Check everything, trace (reporting to ``progress``), then save card, weights and
    trace; returns (card, trace)."""
    from engine.families.torch_protocol.family import FAMILY_NAME, trace_of_model
    from engine.registry import save_user_model
    from engine.trace_store import user_trace_file

    model_file, weights, data = (Path(p).resolve() for p in (model_file, weights, data))
    spec = protocol.read_spec(protocol.import_file(model_file), model_file.name)
    # the structure first, on zeros (the data's shape is checked against INPUT_SHAPE below)
    probe = torch.zeros((protocol.PROBE_ROWS, *spec.input_shape))
    num_classes = protocol.check_shapes(spec, probe, model_file.name)
    tensors = protocol.read_weights(weights)
    protocol.load_weights(spec.network, tensors, weights.name)
    arrays = protocol.read_data(data, spec.input_shape, num_classes)
    rows = np.arange(protocol.PROBE_ROWS) % len(arrays.x)
    protocol.check_shapes(spec, torch.from_numpy(arrays.x[rows]), model_file.name)
    classes = spec.classes or tuple(str(c) for c in range(num_classes))
    model = protocol.ProtocolModel(spec.network, spec.input_shape, classes).eval()
    data_sha = sha256_file(data)
    # named by content: models registered on the same data line up on the compare page
    dataset = f"user:{data.name}:{data_sha[:8]}"
    try:
        trace = trace_of_model(model, arrays, name, dataset, progress=progress)
    except TraceError as e:
        raise ByoError(f"the model's outputs on {data.name} are not usable ({e})") from None
    card = save_user_model(
        {
            "model_id": name,
            "title": title or name,
            "family": FAMILY_NAME,
            "module": "engine.families.torch_protocol.model",
            "dataset": dataset,
            "split": "test",
            "class_names": list(classes),
            "config": {
                "file": str(model_file),
                "file_sha256": sha256_file(model_file),
                "input_shape": list(spec.input_shape),
                "classes": list(classes),
                "data": str(data),
                "data_sha256": data_sha,
                "source_weights": str(weights),
            },
            "training_command": f"python -m engine.byo torch {model_file} --weights {weights} "
            f"--data {data} --name {name}",
        },
        tensors,
        overwrite=overwrite,
    )
    trace.write_parquet(user_trace_file(name, "test"))
    return card, trace


def main(args: argparse.Namespace) -> int:
    from engine.core.progress import terminal

    card, trace = register(
        args.model_file, args.weights, args.data, args.name, args.overwrite, args.title, terminal()
    )
    acc = (trace.pred[:, -1] == trace.label).mean()
    print(
        f"registered {card.model_id}: {trace.num_exits} exits, {trace.num_classes} classes, "
        f"{trace.num_samples} samples (last-exit accuracy {acc:.2%}); card {card.path}. "
        "Open the tuning page or the inspector and pick it."
    )
    return 0
