"""Way in: per-token exit traces from another tool (CALM-style arrays, per-token LM traces).

``python -m engine.byo trace FILE --name ID [--format calm|lm-tokens] [--overwrite]`` converts
the file into a trace in the user trace folder with a small model card (family
``foreign_trace``, no weights), so the tuning page lists it; the tuning page's upload reads the
same files. Tokens are the samples, decoder layers the exits, the cost unit is layers (a token
that leaves after layer k has run k layers). A file is a ``.npz`` (read with
``allow_pickle=False``: object arrays are refused) or ``.safetensors``, at most ``MAX_FILE_MB``
(the tuning page's upload limit), holding plain numeric arrays.

``calm``: what t5x CALM's decoding returns (``t5x/contrib/calm``, ``predict_batch_with_aux``'s
aux outputs, one decode per row), ``[batch, length]``:

- ``exits`` int: the number of decoder layers run for each token, 1..L; -1 where nothing was
  decoded (t5x fills undecoded positions with -1).
- ``confidences`` float in [0, 1]: the confidence at the layer the token left (-1 where nothing
  was decoded).
- optional ``mask`` (bool or 0/1, 1 = a real token) or ``lengths`` int ``[batch]`` (the first
  ``lengths[b]`` tokens are real); without either, the tokens with ``exits != -1`` are real.
- optional ``num_layers`` (scalar int, t5x's ``decoder_layers``; default: the largest exit).
- optional ``threshold`` (scalar, t5x's ``conf_threshold``; default: the smallest confidence
  of a token that left before the last layer, the highest threshold the run can have used).
- optional ``agree`` (bool or 0/1): the token emitted at the exit is the full model's token
  (an oracle run, or a second full run). Without it quality is unknown and shows as n/a.

Such a file holds one operating point: each token's confidence *at its exit*, under the
threshold the run used, and nothing about the other layers. It is exact at that threshold.
Above it, a token whose exit confidence is below the new threshold would have gone deeper, to
an unknown layer: it is charged the last layer (an upper bound on layers) and counts as
agreeing there. Below the run's threshold a token may have left earlier, at a layer the file
cannot tell: it stays at its recorded exit (the curve is flat there). The trace carries this
as a note that the tuning page shows. For a true re-tune, export per-layer outputs (below).

``lm-tokens``: a per-token, per-layer trace (a logit lens or exit heads over every layer),
``[tokens, L]`` or ``[batch, length, L]``, layers ordered by depth, the last one the full model:

- ``top1`` int: the top-1 token id at each layer.
- ``confidence`` float in [0, 1]: that token's probability (or any score, higher = surer).
- optional ``mask`` / ``lengths`` as above (``lengths`` for ``[batch, length, L]`` only).
- optional ``reference`` int ``[tokens]`` / ``[batch, length]``: the token to agree with
  (default: the last layer's ``top1``; give the text's next token to measure accuracy).

This one re-tunes fully: at threshold t a token leaves at the first layer whose confidence is at
least t (else at the last layer), and quality is the agreement of that layer's top-1 with the
reference.

Both become a *confidence trace* (``engine.core.trace``): two classes, "agrees with the
reference" or not, one-hot per layer, and the token's own confidence per layer, which the
max-probability policies read; the tuning page tunes it like any other trace.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from engine.byo import ByoError
from engine.core.trace import Trace, TraceError, TraceMeta

COMMAND = "trace"
HELP = "per-token exit traces from another tool (CALM-style arrays, per-token LM traces)"
FORMATS = ("calm", "lm-tokens")
SUFFIXES = (".npz", ".safetensors")
FAMILY = "foreign_trace"
MAX_FILE_MB = 200  # the tuning page's upload limit (app.loaders.MAX_TRACE_MB)
MAX_UNPACKED_MB = 4 * MAX_FILE_MB  # what a compressed .npz may expand to


# --- reading arrays --------------------------------------------------------------------------


def is_token_file(filename: str, data: bytes = b"") -> bool:
    """Whether a file is one of these (by its extension; a nameless one by its zip header)."""
    suffix = Path(filename or "").suffix.lower()
    return suffix in SUFFIXES or (not suffix and data[:2] == b"PK")


def read_arrays(data: bytes, filename: str) -> dict[str, np.ndarray]:
    """The plain numeric arrays in a ``.npz`` or ``.safetensors`` file; never unpickles."""
    if len(data) > MAX_FILE_MB * 1024 * 1024:
        raise TraceError("file", f"larger than {MAX_FILE_MB} MB")
    if not data:
        raise TraceError("file", "the file is empty")
    suffix = Path(filename or "").suffix.lower()
    if suffix == ".safetensors":
        arrays = _read_safetensors(data)
    elif suffix == ".npz" or (not suffix and data[:2] == b"PK"):
        arrays = _read_npz(data)
    else:
        raise TraceError("file", f"expected a .npz or .safetensors file, got {suffix!r}")
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise TraceError(key, f"must be a numeric array, got {arr.dtype}")
    return arrays


def _read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        return dict(load(data))
    except Exception as e:  # the header or the data is malformed, or a dtype numpy lacks
        raise TraceError("file", f"not a readable safetensors file ({type(e).__name__})") from None


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            unpacked = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, ValueError) as e:
        raise TraceError("file", f"not a readable .npz file ({type(e).__name__})") from None
    if unpacked > MAX_UNPACKED_MB * 1024 * 1024:
        raise TraceError("file", f"its arrays take more than {MAX_UNPACKED_MB} MB unpacked")
    out = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    out[key] = npz[key]
                except ValueError as e:
                    if "allow_pickle" in str(e):
                        raise TraceError(
                            key,
                            "holds Python objects (pickled); only plain numeric arrays are read",
                        ) from None
                    raise
    except TraceError:
        raise
    except Exception as e:
        raise TraceError("file", f"not a readable .npz file ({type(e).__name__})") from None
    return out


def detect_format(arrays: dict[str, np.ndarray]) -> str:
    if "top1" in arrays:
        return "lm-tokens"
    if "exits" in arrays:
        return "calm"
    found = ", ".join(sorted(arrays)) or "none"
    raise TraceError(
        "file",
        "neither a CALM file (arrays exits, confidences) nor a per-token LM trace (arrays top1, "
        f"confidence); its arrays: {found}",
    )


# --- checks ----------------------------------------------------------------------------------


def _need(arrays: dict, key: str, kind: str, ndims: tuple[int, ...], what: str) -> np.ndarray:
    if key not in arrays:
        found = ", ".join(sorted(arrays)) or "none"
        raise TraceError(key, f"missing (the file has: {found})")
    arr = arrays[key]
    if arr.ndim not in ndims:
        raise TraceError(key, f"must be {what}, got shape {arr.shape}")
    if kind == "int" and arr.dtype.kind not in "iu":
        raise TraceError(key, f"must be integers, got {arr.dtype}")
    if kind == "float" and arr.dtype.kind not in "fiu":
        raise TraceError(key, f"must be numbers, got {arr.dtype}")
    return arr


def _same_shape(key: str, arr: np.ndarray, ref_key: str, shape: tuple) -> None:
    if arr.shape != shape:
        raise TraceError(key, f"has shape {arr.shape}, but {ref_key} has {shape}; they must match")


def _where(index: tuple, layered: bool = False) -> str:
    """Where in the file: ``token [b, t]``, or ``token [b, t] at layer k`` (1-based)."""
    token = "token [" + ", ".join(str(int(i)) for i in index[: len(index) - layered]) + "]"
    return f"{token} at layer {int(index[-1]) + 1}" if layered else token


def _scalar(arrays: dict, key: str, kind: str) -> float | None:
    if key not in arrays:
        return None
    arr = arrays[key]
    if arr.size != 1:
        raise TraceError(key, f"must be a single number, got shape {arr.shape}")
    v = arr.reshape(()).item()
    if kind == "int" and (arr.dtype.kind not in "iu" or v < 1):
        raise TraceError(key, f"must be a positive integer, got {v!r}")
    if kind == "float" and not (np.isfinite(v) and 0 <= v <= 1):
        raise TraceError(key, f"must be a number in [0, 1], got {v!r}")
    return v


def _bool01(arrays: dict, key: str, ref_key: str, shape: tuple) -> np.ndarray | None:
    if key not in arrays:
        return None
    arr = arrays[key]
    _same_shape(key, arr, ref_key, shape)
    if arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
        raise TraceError(key, "must hold only 0/1 or true/false")
    return arr.astype(bool)


def _token_mask(arrays: dict, grid: tuple, ref_key: str, default: np.ndarray) -> np.ndarray:
    """Which positions of the token grid are real tokens: ``mask``, ``lengths`` or ``default``."""
    if "mask" in arrays and "lengths" in arrays:
        raise TraceError("mask", "give mask or lengths, not both")
    mask = _bool01(arrays, "mask", ref_key, grid)
    if "lengths" in arrays:
        lengths = arrays["lengths"]
        if len(grid) != 2:
            raise TraceError("lengths", "needs tokens as [batch, length]; give a mask instead")
        if lengths.shape != grid[:1] or lengths.dtype.kind not in "iu":
            raise TraceError("lengths", f"must be integers of shape ({grid[0]},)")
        if (lengths < 0).any() or (lengths > grid[1]).any():
            raise TraceError("lengths", f"must lie in 0..{grid[1]} (the length)")
        mask = np.arange(grid[1])[None, :] < lengths[:, None]
    mask = default if mask is None else mask
    if not mask.any():
        raise TraceError("mask", "no tokens are left after masking")
    return mask


def _check_conf(key: str, conf: np.ndarray, real: np.ndarray, layered: bool = False) -> None:
    """Finite and in [0, 1] at every real token (padding may hold anything, t5x writes -1)."""
    c = conf.astype(np.float64)
    bad = real & ~np.isfinite(c)
    if bad.any():
        raise TraceError(key, f"NaN or infinity at {_where(np.argwhere(bad)[0], layered)}")
    bad = real & ((c < 0) | (c > 1))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise TraceError(key, f"{c[i]:.4g} at {_where(i, layered)} is outside [0, 1]")


# --- conversion ------------------------------------------------------------------------------


def _sample_ids(mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    if mask.ndim == 1:
        return idx[:, 0].astype(np.int64)
    return np.array([":".join(str(int(v)) for v in row) for row in idx], dtype=object)


def _token_trace(
    name: str,
    fmt: str,
    sample_id: np.ndarray,
    conf: np.ndarray,
    hit: np.ndarray | None,
    reference: str,
    extra_meta: dict,
) -> Trace:
    """The confidence trace: exits = layers, classes = agrees with the reference or not."""
    n, k = conf.shape
    right = np.ones((n, k), dtype=bool) if hit is None else hit
    probs = np.stack([right, ~right], axis=-1).astype(np.float32)
    label = np.full(n, 0 if hit is not None else -1, dtype=np.int64)
    meta = TraceMeta(
        model_id=name,
        exit_names=tuple(f"layer {j + 1}" for j in range(k)),
        class_names=(f"same token as {reference}", "another token"),
        dataset="tokens",
        split="test",
        cost_unit="layers",
        extra={"source_format": fmt, **extra_meta},
    )
    cost = np.tile(np.arange(1, k + 1, dtype=np.float64), (n, 1))
    return Trace(meta, sample_id, label, probs, cost, confidence=conf.astype(np.float64))


def calm_trace(arrays: dict[str, np.ndarray], name: str) -> Trace:
    """A t5x CALM run's per-token exits and exit confidences (see the module docstring)."""
    exits = arrays.get("exits")
    if exits is not None and exits.ndim == 3:
        raise TraceError(
            "exits",
            f"has shape {exits.shape} (several decodes per row); keep one, e.g. exits[:, -1, :] "
            "and confidences[:, -1, :] (t5x sorts the best decode last)",
        )
    exits = _need(arrays, "exits", "int", (2,), "[batch, length]")
    grid = exits.shape
    conf = _need(arrays, "confidences", "float", (1, 2, 3), "[batch, length]")
    _same_shape("confidences", conf, "exits", grid)
    real = _token_mask(arrays, grid, "exits", exits != -1)
    agree = _bool01(arrays, "agree", "exits", grid)
    layers = _scalar(arrays, "num_layers", "int")
    top = int(exits[real].max())
    num_layers = int(layers) if layers is not None else max(top, 1)
    bad = real & ((exits < 1) | (exits > num_layers))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise TraceError(
            "exits",
            f"{int(exits[i])} at {_where(i)} is outside 1..{num_layers} (the number of decoder "
            "layers run per token)",
        )
    _check_conf("confidences", conf, real)
    threshold = _scalar(arrays, "threshold", "float")
    early = real & (exits < num_layers)
    if threshold is not None:
        below = early & (conf.astype(np.float64) < threshold)
        if below.any():
            i = tuple(np.argwhere(below)[0])
            raise TraceError(
                "confidences",
                f"{float(conf[i]):.4g} at {_where(i)} left at layer {int(exits[i])} below the "
                f"run's threshold {threshold:.4g}",
            )
    elif early.any():
        threshold = float(conf[early].min())

    e = exits[real].astype(np.int64) - 1
    c = conf[real].astype(np.float64)
    n = len(e)
    rows = np.arange(n)
    per_layer = np.zeros((n, num_layers))
    per_layer[rows, e] = c
    hit = None
    if agree is not None:
        hit = np.zeros((n, num_layers), dtype=bool)
        hit[:, -1] = True  # the full model's token agrees with itself
        hit[rows, e] = agree[real]
    at = "the run's threshold" if threshold is None else f"the run's threshold {threshold:.4g}"
    note = (
        f"A CALM run: the file holds each token's confidence at its exit only, so the numbers "
        f"are exact at {at}. Above it, a token whose exit confidence falls below the threshold "
        "is charged the last layer (an upper bound on layers) and counts as agreeing; below it, "
        "tokens stay at their recorded exits (the file cannot say where they would have left). "
        "Export per-layer top-1 ids and confidences (format lm-tokens) to re-tune for real."
    )
    if agree is None:
        note += " The file has no agree array, so agreement with the full model is unknown."
    extra = {"note": note, "threshold": threshold, "retunable": False}
    return _token_trace(name, "calm", _sample_ids(real), per_layer, hit, "the full model", extra)


def lm_token_trace(arrays: dict[str, np.ndarray], name: str) -> Trace:
    """Per token, per layer top-1 ids and confidences (see the module docstring)."""
    top1 = _need(arrays, "top1", "int", (2, 3), "[tokens, layers] or [batch, length, layers]")
    conf = _need(arrays, "confidence", "float", (1, 2, 3, 4), "the shape of top1")
    _same_shape("confidence", conf, "top1", top1.shape)
    if top1.shape[-1] < 1:
        raise TraceError("top1", "has no layers")
    grid = top1.shape[:-1]
    real = _token_mask(arrays, grid, "top1 without its layer axis", np.ones(grid, dtype=bool))
    _check_conf("confidence", conf, np.broadcast_to(real[..., None], top1.shape), layered=True)
    if "reference" in arrays:
        ref = _need(arrays, "reference", "int", (len(grid),), "top1 without its layer axis")
        _same_shape("reference", ref, "top1 without its layer axis", grid)
        what = "the reference"
    else:
        ref = top1[..., -1]
        what = "the last layer"
    hit = top1[real] == ref[real][:, None]
    extra = {"retunable": True}
    return _token_trace(
        name, "lm-tokens", _sample_ids(real), conf[real].astype(np.float64), hit, what, extra
    )


CONVERTERS = {"calm": calm_trace, "lm-tokens": lm_token_trace}


def read(data: bytes, filename: str, fmt: str | None = None, name: str | None = None) -> Trace:
    """A token trace from a file's bytes; ``fmt`` None detects it from the arrays' names."""
    arrays = read_arrays(data, filename)
    found = detect_format(arrays)
    if fmt is not None and fmt != found:
        raise TraceError(
            "file", f"--format {fmt} was given, but the arrays are those of a {found} file"
        )
    return CONVERTERS[found](arrays, name or Path(filename or "uploaded").stem)


# --- the command line -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "calm: exits, confidences [batch, length] (+ mask/lengths, num_layers, threshold, "
        "agree); lm-tokens: top1, confidence [tokens, layers] or [batch, length, layers] "
        "(+ mask/lengths, reference). Both in .npz or .safetensors; see engine/byo/foreign.py."
    )
    p.add_argument("file", type=Path, help="a .npz or .safetensors file of per-token arrays")
    p.add_argument("--name", required=True, help="model id for the picker (lower case, 1-64)")
    p.add_argument(
        "--format", choices=FORMATS, default=None, help="default: told by the arrays' names"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a trace of the same name")


def main(args: argparse.Namespace) -> int:
    from engine.registry import MODEL_ID, save_user_model
    from engine.trace_store import user_trace_file

    path: Path = args.file
    if not path.is_file():
        raise ByoError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_MB * 1024 * 1024:
        raise ByoError(f"{path.name}: file: larger than {MAX_FILE_MB} MB")
    if not MODEL_ID.fullmatch(args.name):
        raise ByoError(
            f"--name {args.name!r}: use 1-64 lower-case letters, digits, '_', '-' or '.'"
        )
    try:
        trace = read(path.read_bytes(), path.name, args.format, args.name)
    except TraceError as e:
        raise ByoError(f"{path.name}: {e}") from None
    out = user_trace_file(args.name)
    if out.exists() and not args.overwrite:
        raise ByoError(
            f"a trace {args.name!r} exists already ({out}); pass --overwrite to replace it"
        )
    fmt = trace.meta.extra["source_format"]
    card = {
        "model_id": args.name,
        "family": FAMILY,
        "module": f"engine.families.{FAMILY}.family",
        "config": {"format": fmt, "num_layers": trace.num_exits},
        "title": f"{args.name} (per-token trace, {fmt})",
        "dataset": "tokens",
        "source_file": str(path.resolve()),
    }
    save_user_model(card, overwrite=args.overwrite)
    trace.write_parquet(out)
    print(
        f"saved {args.name}: {trace.num_samples} tokens x {trace.num_exits} layers ({fmt}) to "
        f"{out}; pick it on the tuning page"
    )
    if note := trace.meta.extra.get("note"):
        print(note)
    return 0
