"""Language-model analyses behind the language page (no streamlit here).

- ``classify``: run the multi-exit MiniLM on raw texts, every exit's probabilities (the exit
  a policy takes is ``engine.core.policies.exit_index`` on them, the traces' rule).
- ``token_attributions``: Captum Layer Integrated Gradients on the word embeddings for one
  exit: which word pieces pushed that exit toward its prediction.
- ``depth_by_confidence``: exit depth against the annotators' agreement on the test tweets.
- ``parse_lines``: the uploaded text file, one item per line, validated.

Pages reach the model module through here only: ``exit_names`` (display names of the layers)
and ``BackboneUnavailable`` (raised when the pretrained encoder is not installed) are the
model's, re-exposed for the language page.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.core.stats import spearman
from engine.families.multi_exit_bert.model import BackboneUnavailable as BackboneUnavailable
from engine.families.multi_exit_bert.model import encode, tokens
from engine.families.multi_exit_bert.model import exit_names as exit_names
from engine.run.inspection import embedding_attributions

MAX_UPLOAD_BYTES = 1_000_000
MAX_ITEMS = 200
MAX_CHARS = 2_000


class TextInputError(ValueError):
    """A text upload or input that cannot be classified; the message is for the user."""


def parse_lines(data: bytes | str, max_items: int = MAX_ITEMS) -> list[str]:
    """One item per non-empty line of a plain-text file (UTF-8)."""
    if isinstance(data, bytes):
        if len(data) > MAX_UPLOAD_BYTES:
            raise TextInputError(
                f"the file is {len(data) / 1e6:.1f} MB; plain-text uploads are limited to "
                f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB"
            )
        if b"\x00" in data:
            raise TextInputError("this is not a plain-text file (it contains binary data)")
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise TextInputError(
                f"the file is not UTF-8 text (undecodable byte at position {e.start})"
            ) from None
    lines = [ln.strip() for ln in data.splitlines()]
    items = [ln for ln in lines if ln]
    if not items:
        raise TextInputError("no text found: put one item per line")
    if len(items) > max_items:
        raise TextInputError(f"{len(items)} items; at most {max_items} per upload")
    too_long = [i for i, t in enumerate(items) if len(t) > MAX_CHARS]
    if too_long:
        raise TextInputError(
            f"line {too_long[0] + 1} has {len(items[too_long[0]])} characters; at most "
            f"{MAX_CHARS} per item"
        )
    return items


@dataclass
class Classified:
    texts: list[str]
    probs: np.ndarray  # [N, K, C]
    num_tokens: np.ndarray  # [N]


@torch.no_grad()
def classify(model, texts: list[str]) -> Classified:
    probs, lengths = [], []
    for i in range(0, len(texts), 32):
        ids, mask = encode(texts[i : i + 32], model.config.max_length)
        logits = model(ids, mask)
        probs.append(torch.stack([torch.softmax(z, -1) for z in logits], 1).numpy())
        lengths.append(mask.sum(1).numpy())
    return Classified(list(texts), np.concatenate(probs), np.concatenate(lengths))


def token_attributions(model, text: str, exit_k: int, target: int | None = None, steps: int = 32):
    """(word pieces, attribution per piece, target class, convergence delta) for exit k.

    Layer Integrated Gradients on the word-embedding layer (the baseline replaces every piece
    but [CLS]/[SEP] by [PAD]); attributions summed over the embedding dimension. Runs with
    gradients on (not under inference_mode, where Captum cannot differentiate).
    """
    ids, mask = encode([text], model.config.max_length)
    pieces = tokens(text, model.config.max_length)

    def exit_logits(input_ids, attention_mask):
        h = input_ids
        for stage in model.stages[: exit_k + 1]:
            h = stage(h, attention_mask)
        return model.heads[exit_k](h, attention_mask)

    scores, target, delta = embedding_attributions(
        exit_logits, model.embeddings.word_embeddings, ids, mask, 0, target, steps
    )
    return pieces, scores, target, delta


@dataclass
class DepthByConfidence:
    bin_labels: list[str]
    count: np.ndarray  # [B]
    mean_exit: np.ndarray  # [B] mean exit index (0-based)
    sem_exit: np.ndarray  # [B] standard error of the mean
    accuracy: np.ndarray  # [B] accuracy at the exit taken
    spearman: float  # exit depth vs annotator confidence, all rows with a known confidence
    n: int


CONF_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.999, 1.0)


def depth_by_confidence(
    exits: np.ndarray, confidence: np.ndarray, correct: np.ndarray, edges=CONF_EDGES
) -> DepthByConfidence:
    """Mean exit per annotator-confidence bin (the last bin is full agreement, 1.0)."""
    ok = np.isfinite(confidence)
    e, c, r = exits[ok].astype(np.float64), confidence[ok], correct[ok]
    labels, count, mean, sem, acc = [], [], [], [], []
    for j in range(len(edges) - 1):
        lo, hi = edges[j], edges[j + 1]
        last = j == len(edges) - 2
        sel = (c > lo) & (c <= hi) if not last else (c > lo)
        if j == 0:
            sel = c <= hi
        if j == 0:
            labels.append(f"≤ {hi:g}")
        elif last:
            labels.append("1.0 (all agree)")
        else:
            labels.append(f"{lo:g}–{hi:g}" if hi < 0.99 else f"{lo:g}–<1")
        n = int(sel.sum())
        count.append(n)
        mean.append(e[sel].mean() if n else np.nan)
        sem.append(e[sel].std(ddof=1) / np.sqrt(n) if n > 1 else np.nan)
        acc.append(r[sel].mean() if n else np.nan)
    return DepthByConfidence(
        labels,
        np.array(count),
        np.array(mean),
        np.array(sem),
        np.array(acc, dtype=np.float64),
        spearman(e, c),
        int(ok.sum()),
    )
