"""The user's own PyTorch model, loaded from their Python file through the protocol.

The protocol (documented for users in ``engine.byo.protocol``): the file defines
``build_model() -> nn.Module`` whose ``stages`` and ``heads`` are ``nn.ModuleList`` of equal
length K (stage k maps h_{k-1} -> h_k, head k maps h_k -> logits [B, C]), ``INPUT_SHAPE`` (one
sample's shape) and optionally ``CLASSES``. Every check here raises ``ByoError`` with one
sentence naming the problem, so the command line can print it and the app can show it.

Importing the file runs the user's code. That only ever happens for a file the user named on the
command line; the app imports it again by the path in the card, after checking the file's
SHA-256 against the one recorded when it was registered.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.byo import ByoError
from engine.registry import is_pickle, sha256_file

PROBE_ROWS = 4  # the batch size the shape checks run (not 1 or 2: torch.export specialises those)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def import_file(path: Path):
    """The user's module, imported from its path under a name of its own (its SHA-256)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ByoError(f"{path} does not exist or is not a file")
    if path.suffix != ".py":
        raise ByoError(f"{path.name} is not a Python file (.py)")
    name = f"aie_user_model_{sha256_file(path)[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error is theirs to see, in one line
        del sys.modules[name]
        raise ByoError(f"{path.name} could not be imported ({_first_line(e)})") from None
    return module


@dataclass(frozen=True)
class Spec:
    """What a protocol file declares, checked."""

    network: nn.Module
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None  # None: named 0..C-1 once C is known

    @property
    def num_exits(self) -> int:
        return len(self.network.stages)


def read_spec(module, filename: str = "the model file") -> Spec:
    """``build_model()``, ``INPUT_SHAPE`` and ``CLASSES`` of an imported protocol file."""
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise ByoError(f"{filename} defines no build_model() function returning the nn.Module")
    shape = getattr(module, "INPUT_SHAPE", None)
    if (
        not isinstance(shape, (tuple, list))
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ByoError(
            f"{filename} needs INPUT_SHAPE, one sample's shape as a tuple of positive integers "
            f"such as (3, 32, 32); got {shape!r}"
        )
    classes = getattr(module, "CLASSES", None)
    if classes is not None and (
        not isinstance(classes, (tuple, list)) or not all(isinstance(c, str) for c in classes)
    ):
        raise ByoError(f"{filename}: CLASSES must be a list of class names (strings)")
    try:
        net = build()
    except Exception as e:
        raise ByoError(f"{filename}: build_model() failed ({_first_line(e)})") from None
    if not isinstance(net, nn.Module):
        raise ByoError(
            f"{filename}: build_model() returned {type(net).__name__}, not a torch nn.Module"
        )
    stages, heads = getattr(net, "stages", None), getattr(net, "heads", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(heads, nn.ModuleList):
        raise ByoError(
            f"{filename}: the model needs `stages` and `heads` as nn.ModuleList attributes "
            f"(got {type(stages).__name__} and {type(heads).__name__})"
        )
    if len(stages) != len(heads) or not stages:
        raise ByoError(
            f"{filename}: the model has {len(stages)} stages and {len(heads)} heads; it needs "
            "one exit head per stage (and at least one stage)"
        )
    return Spec(net, tuple(int(d) for d in shape), tuple(classes) if classes else None)


def check_shapes(spec: Spec, probe: torch.Tensor, filename: str = "the model file") -> int:
    """Run a batch through every stage and head; the number of classes C. Refuses a stage
    that changes the batch size or returns no tensor, a head whose output is not [B, C] or
    whose C differs from the first head's, and a model that mixes the samples of a batch."""
    b = probe.shape[0]
    net = spec.network.eval()
    h, classes, logits = probe, None, []
    with torch.no_grad():
        for k, (stage, head) in enumerate(zip(net.stages, net.heads, strict=True)):
            try:
                h = stage(h)
            except Exception as e:
                raise ByoError(
                    f"{filename}: stage {k} fails on a batch of {b} inputs of shape "
                    f"{spec.input_shape} ({_first_line(e)})"
                ) from None
            if not isinstance(h, torch.Tensor):
                raise ByoError(
                    f"{filename}: stage {k} returns {type(h).__name__}; a stage must return "
                    "one tensor"
                )
            if h.ndim == 0 or h.shape[0] != b:
                got = h.shape[0] if h.ndim else "no"
                raise ByoError(
                    f"{filename}: stage {k} turns a batch of {b} into {got} rows; a stage "
                    "must keep the batch dimension first (one row per sample)"
                )
            try:
                z = head(h)
            except Exception as e:
                raise ByoError(
                    f"{filename}: head {k} fails on stage {k}'s output ({_first_line(e)})"
                ) from None
            if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != b:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ByoError(
                    f"{filename}: head {k} returns {got} for a batch of {b}; a head must "
                    "return logits of shape [batch, classes]"
                )
            logits.append(z)
            if classes is None:
                classes = int(z.shape[1])
            elif z.shape[1] != classes:
                raise ByoError(
                    f"{filename}: head {k} predicts {z.shape[1]} classes but head 0 predicts "
                    f"{classes}; every head must predict the same classes"
                )
    _check_independence(net, probe, logits, filename)
    if classes < 2:
        raise ByoError(f"{filename}: the heads predict {classes} class; at least two are needed")
    if spec.classes is not None and len(spec.classes) != classes:
        raise ByoError(
            f"{filename}: CLASSES names {len(spec.classes)} classes but the heads predict {classes}"
        )
    return classes


def _check_independence(net: nn.Module, probe: torch.Tensor, logits, filename: str) -> None:
    """Refuse a model whose output for a sample depends on the other samples of its batch
    (the runtime's compacted batches would change it): the probe's first half alone must give
    the logits it gets in the whole probe, up to float rounding."""
    if bool((probe == probe[:1]).all()):
        return  # identical rows (a zero probe): nothing to compare
    half = probe.shape[0] // 2
    h = probe[:half]
    with torch.no_grad():
        for k, (stage, head) in enumerate(zip(net.stages, net.heads, strict=True)):
            h = stage(h)
            z, want = head(h), logits[k][:half]
            if (z - want).abs().max() > 1e-4 * (1 + want.abs().max()):
                raise ByoError(
                    f"{filename}: exit {k}'s logits for a sample change with the other samples "
                    "in its batch; each sample must be computed on its own (the runtime "
                    "shrinks batches as samples exit)"
                )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; pickled formats are refused without being opened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if is_pickle(path):
        raise ByoError(
            f"{path.name} is a pickle-based format, which is never loaded (it can run code); "
            "save the weights with safetensors.torch.save_file(model.state_dict(), "
            "'weights.safetensors')"
        )
    if not path.is_file():
        raise ByoError(f"{path} does not exist or is not a file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ByoError(
            f"{path.name} is not a readable safetensors file ({_first_line(e)}); save the "
            "weights with safetensors.torch.save_file"
        ) from None


def load_weights(net: nn.Module, tensors: dict[str, torch.Tensor], filename: str) -> None:
    """``load_state_dict(strict=True)``, after naming the first key that does not match."""
    want = net.state_dict()
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    shaped = [k for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]
    if missing:
        raise ByoError(
            f"{filename} lacks the model's weight {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        raise ByoError(
            f"{filename} has a weight {unexpected[0]!r} that the model does not have"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    if shaped:
        k = shaped[0]
        raise ByoError(
            f"{filename}: weight {k!r} has shape {tuple(tensors[k].shape)} but the model's is "
            f"{tuple(want[k].shape)}"
        )
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ByoError(f"{filename} does not fit the model ({_first_line(e)})") from None


@dataclass(frozen=True)
class Data:
    """The user's evaluation data: inputs x [N, *input_shape] float32, labels y [N] int64."""

    x: np.ndarray
    y: np.ndarray


def read_data(path: Path, input_shape: tuple[int, ...], num_classes: int) -> Data:
    """``x`` and ``y`` from a safetensors or .npz file (never a pickle), checked against the
    model's input shape and classes."""
    path = Path(path)
    if not path.is_file():
        raise ByoError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            raise ByoError(
                f"{path.name}: give the data as .safetensors or .npz with arrays x and y "
                "(numpy.savez or safetensors.numpy.save_file; pickles are never loaded)"
            )
    except ByoError:
        raise
    except Exception as e:
        raise ByoError(f"{path.name} could not be read ({_first_line(e)})") from None
    if "x" not in arrays or "y" not in arrays:
        raise ByoError(f"{path.name} needs arrays named x and y; it has {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if tuple(x.shape[1:]) != tuple(input_shape) or x.ndim != len(input_shape) + 1:
        raise ByoError(
            f"{path.name}: x has shape {tuple(x.shape)} but the model takes "
            f"[N, {', '.join(map(str, input_shape))}] (INPUT_SHAPE {tuple(input_shape)})"
        )
    if len(x) == 0:
        raise ByoError(f"{path.name}: x has no samples")
    if not np.issubdtype(x.dtype, np.floating):
        raise ByoError(f"{path.name}: x must be floating point (float32), got {x.dtype}")
    if not np.isfinite(x).all():
        raise ByoError(f"{path.name}: x contains NaN or infinite values")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ByoError(
            f"{path.name}: y must be {len(x)} integer labels, one per row of x; got "
            f"{y.dtype} of shape {tuple(y.shape)}"
        )
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise ByoError(
            f"{path.name}: label {int(bad[0])} is outside 0..{num_classes - 1} (the heads "
            f"predict {num_classes} classes)"
        )
    return Data(np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64))


class ProtocolModel(nn.Module):
    """The user's network behind the runtime's contract: its own ``stages`` and ``heads``, and
    the ``input_shape`` the runtime, the ONNX export and the FLOP counter read."""

    def __init__(self, network: nn.Module, input_shape: tuple[int, ...], class_names):
        super().__init__()
        self.network = network
        self.input_shape = tuple(input_shape)
        self.class_names = tuple(class_names)

    @property
    def stages(self) -> nn.ModuleList:
        return self.network.stages

    @property
    def heads(self) -> nn.ModuleList:
        return self.network.heads

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits."""
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            out.append(head(x))
        return out


def build(config: dict) -> nn.Module:
    """The card's network, untrained: the recorded file imported again (refused if it changed
    since registration) and its ``build_model()`` wrapped as a ``ProtocolModel``."""
    path = Path(config["file"])
    if not path.is_file():
        raise ByoError(
            f"the model file {path} is gone; register the model again with "
            "python -m engine.byo torch ... --overwrite"
        )
    if sha256_file(path) != config["file_sha256"]:
        raise ByoError(
            f"{path.name} changed since it was registered; register it again with "
            "python -m engine.byo torch ... --overwrite"
        )
    spec = read_spec(import_file(path), path.name)
    if spec.input_shape != tuple(config["input_shape"]):
        raise ByoError(f"{path.name}: INPUT_SHAPE differs from the card's; register it again")
    return ProtocolModel(spec.network, spec.input_shape, config["classes"])


def read_card_data(config: dict) -> Data:
    """The evaluation data the card was registered with, refused if the file changed."""
    path = Path(config["data"])
    if not path.is_file():
        raise ByoError(f"the data file {path} is gone; register the model again")
    if sha256_file(path) != config["data_sha256"]:
        raise ByoError(f"{path.name} changed since it was registered; register the model again")
    return read_data(path, tuple(config["input_shape"]), len(config["classes"]))
