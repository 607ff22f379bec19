"""Train a user's encoder's exit heads on their labelled CSV (``text,label``) and trace it.

Reached through ``python -m engine.byo hf PATH --name ID --csv FILE.csv`` (``engine.byo.hf``).

1. The CSV is read and checked (``read_labelled``), split train/test with a fixed seed.
2. Frozen backbone (default): every layer's pooled features are computed once for every text
   (the slow step, one pass of the encoder), then all heads train together on them (sum of the
   per-exit cross-entropies, DeeBERT's second stage): seconds. ``joint``: backbone and heads
   fine-tune together on the same loss, a full forward/backward per step.
3. The test split becomes a Trace built by ``engine.run.exits.run_exits``, the function the
   runtime's decisions are checked against, with the FLOPs counted by torch at the padded length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.progress import Meter, Progress, show, terminal, track
from engine.core.trace import Trace, TraceMeta
from engine.families.hf_encoder import model as hfe
from engine.families.multi_exit_bert.train import heads_epoch
from engine.run.exits import exit_costs, run_exits

FAMILY = "hf_encoder"
MIN_ROWS = 20
TEST_FRACTION = 0.2
Report = Callable[[str, float], None]  # (what is running, fraction done), e.g. a page's bar


class DataError(ValueError):
    """The labelled CSV cannot be used; the message is one sentence for the user."""


@dataclass
class Labelled:
    texts: list[str]
    labels: np.ndarray  # [N] int64 index into class_names
    class_names: tuple[str, ...]
    path: str


def _label_order(values: list[str]) -> list[str]:
    """Distinct labels, numerically when they are all integers, else alphabetically."""
    distinct = set(values)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def read_labelled(path: str | Path, known: tuple[str, ...] | None = None) -> Labelled:
    """The user's CSV: a ``text`` and a ``label`` column, at least ``MIN_ROWS`` rows, every
    label non-empty and, when the checkpoint names its labels (``known``), one of them."""
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    try:
        df = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path.name} is not a readable CSV file ({str(e).splitlines()[0]})"
        ) from None
    cols = {c.strip().lower(): c for c in df.columns}
    for need in ("text", "label"):
        if need not in cols:
            raise DataError(
                f"{path.name} has no {need!r} column (columns: {', '.join(df.columns) or 'none'}); "
                "the file needs a header row text,label"
            )
    texts = [t if t is not None else "" for t in df[cols["text"]].to_list()]
    labels = [("" if v is None else str(v).strip()) for v in df[cols["label"]].to_list()]
    if len(texts) < MIN_ROWS:
        raise DataError(f"{path.name} has {len(texts)} rows; at least {MIN_ROWS} are needed")
    empty = [i for i, v in enumerate(labels) if not v]
    if empty:
        raise DataError(f"{path.name}: row {empty[0] + 2} has an empty label")
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise DataError(f"{path.name}: row {blank[0] + 2} has an empty text")
    if known is not None:
        unknown = [i for i, v in enumerate(labels) if v not in known]
        if unknown:
            i = unknown[0]
            raise DataError(
                f"{path.name}: row {i + 2} has the label {labels[i]!r}, which is not one of the "
                f"checkpoint's labels ({', '.join(known)})"
            )
        names = list(known)
    else:
        names = _label_order(labels)
    if len(set(labels)) < 2:
        raise DataError(
            f"{path.name}: every row has the label {labels[0]!r}; exits need two classes"
        )
    index = {n: i for i, n in enumerate(names)}
    return Labelled(
        texts, np.array([index[v] for v in labels], dtype=np.int64), tuple(names), str(path)
    )


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a seeded permutation, the last ``TEST_FRACTION`` for test."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * TEST_FRACTION))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _progress(report: Report | None) -> Progress:
    """The command line's bars (``engine.core.progress``), or a page's ``report(what,
    fraction)`` when there is one."""
    if report is None:
        return terminal()
    return lambda done, total, label: report(label, min(1.0, done / max(1, total)))


@torch.no_grad()
def features(
    model: hfe.HFEncoderExits, x: torch.Tensor, report: Report | None = None, batch: int = 64
) -> np.ndarray:
    """Every layer's pooled features of every text, [N, K, H] float32: one encoder pass."""
    out = np.zeros((len(x), model.num_exits, model.config.hidden_size), np.float32)
    for i in track(range(0, len(x), batch), "features", _progress(report)):
        out[i : i + batch] = model.pooled_features(x[i : i + batch]).numpy()
    return out


def _reset_heads(model: hfe.HFEncoderExits, seed: int) -> None:
    torch.manual_seed(seed)
    for m in model.heads.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def train_heads(
    model,
    feats: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    seed: int,
    report: Report | None = None,
) -> list[float]:
    """All heads on cached features (backbone frozen); the mean loss per epoch."""
    _reset_heads(model, seed)
    x, t = torch.from_numpy(feats), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.heads.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    progress = _progress(report)
    model.heads.train()
    for _ in track(range(epochs), "heads", progress):
        losses.append(
            heads_epoch(model.heads, opt, x, t, torch.randperm(len(t), generator=gen), 64)
        )
        show(progress, "heads", loss=losses[-1])  # the last epoch's
    model.heads.eval()
    return losses


def train_joint(
    model,
    x: torch.Tensor,
    y: np.ndarray,
    epochs: int,
    lr: float,
    seed: int,
    report: Report | None = None,
    batch: int = 16,
) -> list[float]:
    """Backbone and heads fine-tuned together on the summed exit losses (slow: every step
    runs the whole encoder forward and backward)."""
    _reset_heads(model, seed)
    model.stages.requires_grad_(True)
    t = torch.from_numpy(y)
    opt = torch.optim.AdamW(
        [
            {"params": model.stages.parameters(), "lr": lr * 0.05},
            {"params": model.heads.parameters(), "lr": lr},
        ],
        weight_decay=1e-2,
    )
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(t) + batch - 1) // batch)
    losses, done = [], 0
    progress = _progress(report)
    meter = Meter(progress, "joint", window=20)  # the last 20 steps' loss
    progress(0, steps, "joint")  # one bar over every epoch's steps
    model.train()
    for _ in range(epochs):
        perm, total = torch.randperm(len(t), generator=gen), 0.0
        for i in range(0, len(t), batch):
            idx = perm[i : i + batch]
            loss = sum(F.cross_entropy(z, t[idx]) for z in model(x[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            meter.add(len(idx), loss=float(loss.detach()))
            done += 1
            progress(done, steps, "joint")
        losses.append(total / len(t))
    model.eval()
    model.stages.requires_grad_(False)
    return losses


def make_trace(
    model_id: str,
    model,
    x: torch.Tensor,
    data: Labelled,
    rows: np.ndarray,
    split_name: str = "test",
    progress: Progress | None = None,
) -> Trace:
    """The trace of ``rows`` of the CSV: probabilities from ``run_exits`` (the runtime's
    reference), cumulative FLOPs of the padded input counted by torch."""
    probs, latency = run_exits(model, x, progress=progress)
    costs = exit_costs(model, tuple(x.shape[1:]))
    n, k = probs.shape[:2]
    meta = TraceMeta(
        model_id=model_id,
        exit_names=tuple(hfe.exit_names(model.config)),
        class_names=data.class_names,
        dataset=Path(data.path).stem,
        split=split_name,
        extra={
            "family": FAMILY,
            "checkpoint": model.config.path,
            "csv": data.path,
            "seq_length": model.config.seq_length,
            "flops_stage": [int(f) for f in costs.stage],
            "flops_head": [int(f) for f in costs.head],
        },
    )
    return Trace(
        meta=meta,
        sample_id=rows.astype(np.int64),
        label=data.labels[rows],
        probs=probs,
        cost=np.broadcast_to(costs.cumulative, (n, k)).copy(),
        latency_ms=latency,
        extra={"text": np.array([data.texts[i] for i in rows], dtype=object)},
    )
