"""Way in: a Hugging Face checkpoint on disk (config.json + safetensors, or a GGUF file).

    python -m engine.byo hf PATH --name ID [--csv FILE.csv] [--text FILE.txt [--no-tuned-lens]]
                                            [--joint] [--overwrite]

``inspect_checkpoint`` reads what the folder is without loading weights (config.json, the
safetensors headers, the model built on the meta device) and refuses what cannot be used, one
sentence each. Then ``add_checkpoint``:

- an encoder / sequence classifier (BERT-like) gets an exit head after every layer, trained on
  ``--csv`` (``text,label``), and becomes a card of the ``hf_encoder`` family with its test
  trace written where the tuning page finds it;
- a causal LM (Llama / Qwen layout, or a GGUF file) becomes a card of ``hf_causal_lm`` with its
  per-layer logit-lens agreement, KL and perplexity on ``--text`` in the card's metrics, and a
  tuned lens trained on the text's start (``train_lens.train``) saved in the user's lens folder
  (``tuned_lens.lens_for`` finds it), compared with the logit lens on the held-out tail.

The page ``pages/my_models.py`` calls the same functions; nothing here is downloaded
(``local_files_only``) and pickled weights are never opened.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from engine.byo import ByoError  # noqa: E402
from engine.registry import (  # noqa: E402
    ModelCard,
    check_new_model_id,
    is_pickle,
    list_cards,
    pickled_files,
    save_user_model,
    sha256_file,
)

COMMAND = "hf"
HELP = "a Hugging Face checkpoint on disk (config.json + safetensors, or a GGUF file)"
DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")
ENCODER_SUFFIXES = (
    "ForSequenceClassification",
    "ForMaskedLM",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForPreTraining",
    "Model",
)
MAX_LENS_TOKENS = 1024  # the logit lens reads the text's first tokens (one forward pass)
MAX_TEXT_BYTES = 5_000_000


@dataclass(frozen=True)
class Options:
    """How the exits are trained (the CLI's and the page's defaults are these)."""

    epochs: int = 40  # head epochs (frozen backbone); joint fine-tuning runs a tenth of them
    lr: float = 2e-3
    seed: int = 0
    max_length: int = 128  # tokens per text at most (the longest text sets the padded length)
    head_hidden: int = 128


@dataclass(frozen=True)
class LensOptions:
    """How a causal LM's tuned lens is trained on ``--text``: the text's start (at most
    ``train_tokens``) trains it, its tail (a fifth, at most ``eval_tokens``) is held out for the
    comparison; the rest is train_lens's recipe for SmolLM2, with epochs scaled so a short text
    still gets about ``steps`` steps."""

    train_tokens: int = 8192
    eval_tokens: int = 1024
    eval_fraction: float = 0.2
    min_train: int = 64
    min_eval: int = 16
    seq_len: int = 128
    rank: int = 64
    vocab: int = 4096
    steps: int = 100
    max_epochs: int = 200
    batch: int = 256
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """What the user's path is, read without loading the weights."""

    folder: Path
    kind: str  # "encoder" or "decoder"
    architecture: str
    gguf: str | None = None  # file name inside ``folder``
    config: object = None  # transformers.PretrainedConfig (None for GGUF)


# --- reading the checkpoint -----------------------------------------------------------------


def inspect_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint's kind; ByoError (one sentence) for a path that is not a model folder,
    pickled weights, an architecture with no layer list to walk, or weights whose tensors do
    not match config.json."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Checkpoint(path.parent, "decoder", "GGUF", path.name)
    if path.is_file() and is_pickle(path):
        raise ByoError(
            f"{path.name} is a pickled checkpoint, which is never opened here (unpickling runs "
            "code); convert it to safetensors (save_pretrained(..., safe_serialization=True))"
        )
    if not path.is_dir():
        raise ByoError(f"{path} is not a model folder (no such directory or GGUF file)")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Checkpoint(path, "decoder", "GGUF", ggufs[0].name)
        raise ByoError(f"{path} is not a Hugging Face model folder (it has no config.json)")
    pickles = pickled_files(path)
    if pickles:
        raise ByoError(
            f"{path.name} holds pickled weights ({', '.join(pickles)}), which are never opened "
            "here; convert them to safetensors (save_pretrained(..., safe_serialization=True)) "
            "and remove the pickle"
        )
    if not any(path.glob("*.safetensors")):
        raise ByoError(f"{path.name} has config.json but no .safetensors weights")
    config = _config(path)
    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    kind = _kind(config, arch)
    meta = _meta_model(config, arch, kind)
    _check_walkable(meta, kind, arch or config.model_type)
    _check_weights(path, meta, arch or config.model_type)
    return Checkpoint(path, kind, arch or config.model_type, None, config)


def _config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByoError(
            f"{path.name}/config.json cannot be read as a model config ({first})"
        ) from None


def _kind(config, arch: str) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    name = arch or config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise ByoError(
            f"{name} is an encoder-decoder model; only encoders (BERT-like) and decoders "
            "(Llama/Qwen-like) can be walked layer by layer here"
        )
    if arch.endswith(DECODER_SUFFIXES):
        return "decoder"
    if arch.endswith(ENCODER_SUFFIXES):
        return "encoder"
    mt = config.model_type
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    if mt in MODEL_MAPPING_NAMES:
        return "encoder"
    raise ByoError(f"{name}: neither an encoder nor a causal language model this code knows")


def _meta_model(config, arch: str, kind: str) -> torch.nn.Module:
    """The architecture config.json describes, built without memory (meta device)."""
    import transformers

    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
        build = cls.from_config
    else:
        build = cls
    try:
        with torch.device("meta"):
            return build(config)
    except (ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise ByoError(
            f"{arch or config.model_type}: the model in config.json cannot be built ({e})"
        ) from None


def _check_walkable(meta: torch.nn.Module, kind: str, name: str) -> None:
    if kind == "decoder":
        from engine.families.hf_causal_lm.model import LoadError, check_walkable

        try:
            check_walkable(meta)
        except LoadError as e:
            raise ByoError(
                f"{name}: this architecture cannot be walked layer by layer ({e})"
            ) from None
    else:
        from engine.families.hf_encoder.model import WalkError, find_parts

        try:
            find_parts(meta.base_model)
        except WalkError as e:
            raise ByoError(str(e)) from None


def _check_weights(folder: Path, meta: torch.nn.Module, name: str) -> None:
    """Every parameter config.json implies is in the safetensors files with its shape (a tied
    parameter may be stored under any of its names); the first that is not is named."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as s:
                for k in s.keys():
                    shapes[k] = tuple(s.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001 - a corrupt header, whatever safetensors raises
            raise ByoError(f"{f.name} is not a readable safetensors file ({e})") from None
    groups: dict[int, list[str]] = {}
    params = {}
    for n, p in meta.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
        params[id(p)] = p
    prefix = getattr(meta, "base_model_prefix", "") + "."

    def stored(n: str) -> str | None:
        for cand in (n, n.removeprefix(prefix), prefix + n):
            if cand in shapes:
                return cand
        return None

    for pid, names in groups.items():
        found = [s for s in map(stored, names) if s is not None]
        want = tuple(params[pid].shape)
        if not found:
            raise ByoError(
                f"the weights do not match config.json ({name}): tensor {names[0]} (shape "
                f"{list(want)}) is missing from the safetensors files"
            )
        if shapes[found[0]] != want:
            raise ByoError(
                f"the weights do not match config.json ({name}): tensor {found[0]} has shape "
                f"{list(shapes[found[0]])}, config.json implies {list(want)}"
            )


# --- adding it ------------------------------------------------------------------------------


def command(path, name, csv=None, text=None, joint=False, overwrite=False, tuned_lens=True) -> str:
    """The command line that does what was asked (recorded in the card, from CLI or page)."""
    argv = ["python", "-m", "engine.byo", COMMAND, str(path), "--name", name]
    if csv:
        argv += ["--csv", str(csv)]
    if text:
        argv += ["--text", str(text)]
    if text and not tuned_lens:
        argv.append("--no-tuned-lens")
    if joint:
        argv.append("--joint")
    if overwrite:
        argv.append("--overwrite")
    return shlex.join(argv)


def add_checkpoint(
    path: str | Path,
    name: str,
    csv: str | Path | None = None,
    text: str | Path | None = None,
    joint: bool = False,
    overwrite: bool = False,
    options: Options = Options(),
    report=None,
    tuned_lens: bool = True,
    lens_options: LensOptions = LensOptions(),
) -> ModelCard:
    """Check, train or read, and save the user's checkpoint as a model card (the CLI's and the
    page's one entry). ``report(what, fraction)`` is called as work progresses (a page's bar;
    tqdm shows the same on stderr). Nothing is written before everything has worked. A causal
    LM given a text also gets a tuned lens trained on it, unless ``tuned_lens`` is False."""
    check_new_model_id(name, overwrite)
    ck = inspect_checkpoint(path)
    cmd = command(path, name, csv, text, joint, overwrite, tuned_lens)
    if ck.kind == "encoder":
        if text and not csv:
            raise ByoError(
                f"{ck.architecture} is an encoder: give --csv FILE.csv (text,label), not --text"
            )
        if not csv:
            raise ByoError(
                f"{ck.architecture} is an encoder: give --csv FILE.csv with text,label rows to "
                "train its exit heads"
            )
        return add_encoder(ck, name, Path(csv), joint, overwrite, options, cmd, report)
    if csv:
        raise ByoError(
            f"{ck.architecture} is a causal language model: give --text FILE.txt, not --csv"
        )
    if joint:
        raise ByoError("--joint fine-tunes an encoder's exits; a causal language model has none")
    text = Path(text) if text else None
    lens = lens_options if tuned_lens else None
    return add_decoder(ck, name, text, overwrite, cmd, report, lens)


def _known_labels(config) -> tuple[str, ...] | None:
    """The checkpoint's own label names, when its classifier has real ones (not LABEL_0...)."""
    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if not arch.endswith("ForSequenceClassification") or not names:
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return tuple(names)


def add_encoder(
    ck: Checkpoint,
    name: str,
    csv: Path,
    joint: bool,
    overwrite: bool,
    options: Options,
    cmd: str,
    report=None,
) -> ModelCard:
    from engine.families.hf_encoder import model as hfe
    from engine.families.hf_encoder import train
    from engine.trace_store import user_trace_file

    start = time.perf_counter()
    try:
        data = train.read_labelled(csv, _known_labels(ck.config))
    except train.DataError as e:
        raise ByoError(str(e)) from None
    try:
        tok = hfe.load_tokenizer(ck.folder)
    except (OSError, ValueError, TypeError, KeyError):
        raise ByoError(
            f"{ck.folder.name} has no tokenizer this code can load; save it beside the model "
            "(tokenizer.save_pretrained(folder))"
        ) from None
    try:
        base = hfe.load_backbone(ck.folder)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ByoError(f"{ck.folder.name}: the weights could not be loaded ({first})") from None
    limit = min(options.max_length, int(getattr(ck.config, "max_position_embeddings", 512)))
    seq_length = max(hfe.token_counts(tok, data.texts, limit))
    config = hfe.Config(
        path=str(ck.folder.resolve()),
        num_classes=len(data.class_names),
        seq_length=int(seq_length),
        head_hidden=options.head_hidden,
        joint=joint,
    )
    model = hfe.HFEncoderExits(config, base)
    x = hfe.encode(tok, data.texts, seq_length)
    rows_train, rows_test = train.split(len(data.texts), options.seed)
    y = data.labels
    if joint:
        epochs = max(1, options.epochs // 10)
        losses = train.train_joint(
            model, x[rows_train], y[rows_train], epochs, options.lr, options.seed, report
        )
    else:
        epochs = options.epochs
        feats = train.features(model, x, report)
        losses = train.train_heads(
            model, feats[rows_train], y[rows_train], epochs, options.lr, options.seed, report
        )
    model.eval()
    trace = train.make_trace(
        name, model, x[rows_test], data, rows_test, progress=_as_progress(report, "test trace")
    )
    train_trace = train.make_trace(
        name, model, x[rows_train], data, rows_train, "train", _as_progress(report, "train trace")
    )
    test_acc = trace.correct.mean(0)
    train_acc = train_trace.correct.mean(0)
    raw = {
        "model_id": name,
        "title": f"{ck.architecture} with {model.num_exits} exits, {csv.name}",
        "family": train.FAMILY,
        "module": "engine.families.hf_encoder.model",
        "config": config.to_dict(),
        "dataset": Path(data.path).stem,
        "split": "train",
        "class_names": list(data.class_names),
        "max_length": options.max_length,
        "seed": options.seed,
        "epochs": epochs,
        "training_command": cmd,
        "train_seconds": round(time.perf_counter() - start, 1),
        "data": {
            "csv": str(csv.resolve()),
            "sha256": sha256_file(csv),
            "rows": len(data.texts),
            "train_rows": int(len(rows_train)),
            "test_rows": int(len(rows_test)),
            "test_fraction": train.TEST_FRACTION,
        },
        "backbone": {
            "architecture": ck.architecture,
            "path": config.path,
            "frozen": not joint,
            "shipped": joint,
            "files_sha256": {
                p.name: sha256_file(p) for p in sorted(ck.folder.glob("*.safetensors"))
            },
            "note": "the fine-tuned backbone is in the weights file with the heads"
            if joint
            else "only the exit heads are in the weights file; the backbone is read from path",
        },
        "input": "token ids and attention mask stacked as [B, 2, T] float32 "
        "(engine.families.hf_encoder.model.encode)",
        "metrics": {
            "test_accuracy_per_exit": [round(float(a), 4) for a in test_acc],
            "train_accuracy_per_exit": [round(float(a), 4) for a in train_acc],
            "flops_per_exit": [round(float(c)) for c in trace.exit_cost],
            "final_loss": round(float(losses[-1]), 4),
        },
    }
    card = save_user_model(raw, model.state_dict(), overwrite=overwrite)
    trace.write_parquet(user_trace_file(name, "test"))
    from engine.families.hf_causal_lm.tuned_lens import remove_user_lens

    if overwrite:
        remove_user_lens(name)  # a decoder this encoder replaced leaves no lens
    if report is not None:
        report("saved", 1.0)
    return card


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ByoError(f"{path}: no such text file")
    data = path.read_bytes()
    if len(data) > MAX_TEXT_BYTES:
        raise ByoError(
            f"{path.name} is {len(data) / 1e6:.1f} MB; the logit lens reads at most 5 MB"
        )
    if b"\x00" in data:
        raise ByoError(f"{path.name} is not a plain-text file (it contains binary data)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ByoError(
            f"{path.name} is not UTF-8 text (undecodable byte at position {e.start})"
        ) from None
    if not text.strip():
        raise ByoError(f"{path.name} is empty")
    return text


def _lens_split(ids: list[int], text: Path, o: LensOptions) -> tuple[list[int], list[int]]:
    """(training ids, held-out ids): the text's start and its tail, sizes scaled to the text."""
    n_eval = min(o.eval_tokens, max(o.min_eval, round(len(ids) * o.eval_fraction)))
    n_train = min(o.train_tokens, len(ids) - n_eval)
    if n_train < o.min_train:
        raise ByoError(
            f"{text.name} is {len(ids)} tokens long; training a tuned lens on it needs at least "
            f"{o.min_train + o.min_eval} (give a longer text, or pass --no-tuned-lens)"
        )
    return ids[:n_train], ids[len(ids) - n_eval :]


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive pieces of ``size`` tokens (each read as its own sequence), none under two."""
    return [c for c in (ids[i : i + size] for i in range(0, len(ids), size)) if len(c) >= 2]


def _as_progress(report, what: str):
    """A ``Progress`` (``engine.core.progress``) for the calls that take one, told to
    ``report`` as (what, fraction); tqdm on a terminal when there is no report."""
    from engine.core.progress import terminal

    if report is None:
        return terminal()
    return lambda done, total, _label: report(what, done / total if total else 1.0)


def _report_part(report, lo: float, hi: float):
    """``report`` for one stretch [lo, hi] of the whole bar."""
    if report is None:
        return None
    return lambda what, f: report(what, lo + (hi - lo) * float(f))


def train_user_lens(lm, name: str, ids: list[int], text: Path, o: LensOptions, cmd: str, report):
    """A tuned lens for the user's model trained on the start of ``ids`` and compared with the
    logit lens on the held-out tail: (the lens, its card's fields)."""
    from engine.core.progress import terminal
    from engine.families.hf_causal_lm import train_lens as T
    from engine.families.hf_causal_lm import tuned_lens as TL

    train_ids, eval_ids = _lens_split(ids, text, o)
    if lm.n_layer < 2:
        raise ByoError("a tuned lens needs a model of at least two layers; pass --no-tuned-lens")
    cfg = TL.TunedLensConfig(lm.n_layer, lm.hidden_size, min(o.rank, lm.hidden_size), name)
    steps_per_epoch = -(-len(train_ids) // o.batch)
    epochs = max(2, min(o.max_epochs, -(-o.steps // steps_per_epoch)))
    if report is not None:
        report("reading the model's states on the text", 0.15)
    torch.manual_seed(o.seed)
    lens, info = T.train(
        lm,
        _chunks(train_ids, o.seq_len),
        cfg,
        o.vocab,
        epochs,
        o.batch,
        o.lr,
        o.seed,
        report=_report_part(report, 0.2, 0.9),
        progress=terminal() if report is None else None,  # a page's bar is ``report``
    )
    if report is not None:
        report("comparing the tuned lens with the logit lens on the held-out tail", 0.9)
    df = TL.compare(lm, lens, _chunks(eval_ids, o.seq_len), text.stem, o.seq_len)
    comparison = {"max_len": o.seq_len, "max_tokens": len(eval_ids), "rows": df.to_dicts()}
    raw = {
        "model_id": TL.card_id(name),
        "title": f"Tuned lens for {name}: a rank-{cfg.rank} affine translator per layer",
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.tuned_lens",
        "config": TL.config_dict(cfg),
        "dataset": text.stem,
        "split": "train",
        "paper": "Belrose et al. 2023, Eliciting latent predictions with the tuned lens",
        "training": {
            "objective": f"sum over layers of KL(final || lens_l) over the {o.vocab} tokens of "
            "most final and logit-lens mass (renormalised); metrics over the full vocabulary",
            "tokens": info["tokens"],
            "seq_len": o.seq_len,
            "batch": o.batch,
            "lr": o.lr,
            "optimizer": "Adam, learning rate decayed linearly to 0",
        },
        "seed": o.seed,
        "epochs": epochs,
        "training_command": cmd,
        "train_seconds": info["train_seconds"],
        "data": {
            "text": str(text.resolve()),
            "sha256": sha256_file(text),
            "train_tokens": len(train_ids),
            "held_out_tokens": len(eval_ids),
            "held_out": f"the text's last {len(eval_ids)} tokens",
        },
        "metrics": {
            "train_kl_sum_per_epoch": info["train_kl_sum_per_epoch"],
            "train_vocab_mass": info["train_vocab_mass"],
            "comparison": comparison,
        },
    }
    return lens, raw


def add_decoder(
    ck: Checkpoint,
    name: str,
    text: Path | None,
    overwrite: bool,
    cmd: str,
    report=None,
    lens_options: LensOptions | None = LensOptions(),
) -> ModelCard:
    """The causal LM's card: the logit lens on the text's first tokens and, unless
    ``lens_options`` is None, a tuned lens trained on the text (saved in the user's lens
    folder; its held-out comparison in both cards)."""
    from engine.families.hf_causal_lm import analysis
    from engine.families.hf_causal_lm import model as lm_model
    from engine.families.hf_causal_lm import tuned_lens as TL

    body = _read_text(text) if text is not None else None
    if body is not None and lens_options is not None and not overwrite:
        TL.check_new_user_lens(name)  # a lens left without its model: refused before minutes
    if report is not None:
        report("loading the model", 0.0)
    from transformers.utils import logging

    logging.disable_progress_bar()  # one load of a few seconds; the page shows its own status
    try:
        loading = _as_progress(_report_part(report, 0.0, 0.1), "loading the model")
        lm = lm_model.load(ck.folder, ck.gguf, loading)
    except lm_model.LoadError as e:
        raise ByoError(str(e)) from None
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ByoError(f"{ck.folder.name}: the weights could not be loaded ({first})") from None
    metrics: dict = {}
    data: dict = {}
    if body is not None:
        if lm.tokenizer is None:
            raise ByoError(f"{ck.folder.name} has no tokenizer, so --text cannot be read by it")
        all_ids = lm_model.encode(lm, body)
        ids = all_ids[:MAX_LENS_TOKENS]
        if len(ids) < 2:
            raise ByoError(f"{text.name} is shorter than two tokens; the logit lens needs more")
        if lens_options is not None:
            _lens_split(all_ids, text, lens_options)  # a text too short: refused before work
        if report is not None:
            report("logit lens", 0.1)
        lens = analysis.logit_lens(lm, ids)
        metrics["logit_lens"] = {
            "tokens": len(ids),
            "agreement_per_layer": [round(float(v), 4) for v in lens.agreement],
            "kl_per_layer": [round(float(v), 4) for v in lens.kl],
            "perplexity_per_layer": [round(float(v), 4) for v in lens.perplexity],
        }
        data = {"text": str(text.resolve()), "sha256": sha256_file(text), "tokens": len(ids)}
    tuned = None
    if body is not None and lens_options is not None:
        tuned, lens_raw = train_user_lens(lm, name, all_ids, text, lens_options, cmd, report)
    cfg = lm.hf.config
    config = {"path": str(ck.folder.resolve())}
    if ck.gguf:
        config["gguf"] = ck.gguf
    raw = {
        "model_id": name,
        "title": f"{ck.architecture} ({lm.n_layer} layers), read at every layer",
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.model",
        "config": config,
        "dataset": text.stem if text is not None else "none",
        "split": "test",
        "architecture": f"{type(lm.hf).__name__}: {lm.n_layer} decoder layers, hidden "
        f"{cfg.hidden_size}, vocabulary {cfg.vocab_size}",
        "weights": "not ours: read from config.path at load time",
        "training_command": cmd,
        "data": data,
        "metrics": metrics,
    }
    if tuned is not None:
        lens_card = TL.save_user_lens(tuned, lens_raw, overwrite)
        metrics["tuned_lens"] = {
            "card": lens_card.model_id,
            "weights_sha256": lens_card.raw["weights_sha256"],
            "train_tokens": lens_raw["data"]["train_tokens"],
            "comparison": lens_raw["metrics"]["comparison"],
        }
    elif overwrite:
        TL.remove_user_lens(name)  # the model it was trained for is replaced
    card = save_user_model(raw, None, overwrite=overwrite)
    # an encoder replaced by this decoder (--overwrite) leaves no trace or weights behind
    from engine.trace_store import user_trace_file

    for stale in (user_trace_file(name, "test"), card.weights_path):
        stale.unlink(missing_ok=True)
    if report is not None:
        report("saved", 1.0)
    return card


# --- what the user has ------------------------------------------------------------------------


@dataclass(frozen=True)
class UserModel:
    """One row of the user's models, as the page lists them."""

    model_id: str
    kind: str
    data: str
    metrics: str
    files: str


def _summary(card: ModelCard) -> str:
    m = card.raw.get("metrics", {})
    if "test_accuracy_per_exit" in m:
        acc = m["test_accuracy_per_exit"]
        return f"test accuracy {acc[0]:.1%} at layer 1 … {acc[-1]:.1%} at layer {len(acc)}"
    if "logit_lens" in m:
        a = m["logit_lens"]["agreement_per_layer"]
        out = f"logit-lens agreement with the last layer {a[0]:.1%} at layer 1 … {a[-1]:.1%}"
        if "tuned_lens" in m:
            first = {r["lens"]: r for r in m["tuned_lens"]["comparison"]["rows"] if r["layer"] == 0}
            out += (
                f"; held-out KL at layer 1: tuned lens {first['tuned']['kl']:.3f}, "
                f"logit lens {first['logit']['kl']:.3f}"
            )
        return out
    return "no metrics"


def user_models() -> list[UserModel]:
    """The user's models (any way in), newest ids last."""
    out = []
    for card in list_cards():
        if not card.user:
            continue
        data = card.raw.get("data", {})
        src = data.get("csv") or data.get("text") or card.dataset
        files = [str(card.path)]
        if card.weights_path.exists():
            files.append(str(card.weights_path))
        if "path" in card.config:
            files.append(str(card.config["path"]))
        kind = {"hf_encoder": "encoder + exits", "hf_causal_lm": "causal LM"}.get(
            card.family, card.family
        )
        out.append(UserModel(card.model_id, kind, str(src), _summary(card), " · ".join(files)))
    return out


# --- command line ---------------------------------------------------------------------------


DESCRIPTION = (
    f"{HELP}. An encoder or sequence classifier (BERT-like) gets an exit head after every "
    "layer, trained on --csv (backbone frozen unless --joint), a test trace for the tuning page "
    "and the real early-exit runtime; a causal LM (Llama/Qwen layout, or a .gguf file) gets "
    "per-layer logit-lens agreement, KL and perplexity on --text and a tuned lens trained on it "
    "(compared with the logit lens on the text's held-out tail). Read offline only; pickled "
    "weights (.bin, .pt, .pth, .ckpt, .pkl) are refused: convert them to safetensors."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument(
        "path", help="a model folder (config.json + *.safetensors [+ tokenizer]) or a .gguf file"
    )
    p.add_argument(
        "--name", required=True, help="the model id in the app (lower-case, e.g. my_bert)"
    )
    p.add_argument("--csv", help="encoder: labelled texts, a CSV with a header row text,label")
    p.add_argument(
        "--text",
        help="causal LM: a UTF-8 text file the logit lens is measured on and a tuned lens is "
        "trained on (its last fifth, at most 1024 tokens, held out to compare the two)",
    )
    p.add_argument(
        "--no-tuned-lens",
        dest="tuned_lens",
        action="store_false",
        help="causal LM: measure the logit lens on --text but train no tuned lens",
    )
    p.add_argument(
        "--joint",
        action="store_true",
        help="encoder: fine-tune the backbone with the heads (slower; saves the backbone)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace your model of the same name")
    d = Options()
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"head epochs (default {d.epochs})")
    p.add_argument("--seed", type=int, default=d.seed, help="train/test split and training seed")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text at most")


def main(args: argparse.Namespace) -> int:
    options = Options(epochs=args.epochs, seed=args.seed, max_length=args.max_length)
    card = add_checkpoint(
        args.path,
        args.name,
        args.csv,
        args.text,
        args.joint,
        args.overwrite,
        options,
        tuned_lens=args.tuned_lens,
    )
    row = next(m for m in user_models() if m.model_id == card.model_id)
    print(f"added {card.model_id} ({row.kind}): {row.metrics}")
    print(f"card: {card.path}")
    if "tuned_lens" in card.raw.get("metrics", {}):
        from engine.families.hf_causal_lm.tuned_lens import lens_for

        print(f"tuned lens: {lens_for(card).path}")
    if card.family == "hf_encoder":
        print("its test trace is in the tuning page's model list")
    return 0
