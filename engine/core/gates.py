"""Learned exit gates, trained post hoc on a frozen multi-exit model's trace (JEI-DNN style).

A gate per exit reads what that exit (and the one before it) produced and scores whether
stopping there is right. The *target* of exit k is "correct at k, or no later exit does
better": true where exit k predicts the label, and true where no later exit does (stopping now
is the cheapest way to be wrong). A gate that predicts the target perfectly, thresholded at any
value in (0, 1], stops every sample at its earliest correct exit and the never-right ones at
the first exit: exactly ``oracle_correct(trace, "first")``.

This is the *post hoc* variant: the model is frozen and only the gates are fitted, on a trace
of data the gates are then not scored on. The joint variant, where gates and new heads are
trained together on a frozen backbone (JEI-DNN's answer to the train–test mismatch of
thresholding), reads the same features (``features_torch`` while it trains) and lives in
``engine.families.multi_exit_cnn.train_jei``; its gates ship inside the model
(``engine.families.multi_exit_cnn.model.JointGates``).

Features of exit k (``features``), all read from exits 0..k so the gate fits ``stop_mask``'s
contract: the exit's probabilities sorted in decreasing order, its normalised entropy and top-2
margin, whether its prediction agrees with exit k-1's, and exit k-1's max probability (both 0 at
the first exit). Each gate is a logistic regression (``hidden=0``) or a one-hidden-layer MLP,
fitted full-batch with L-BFGS in float64 on the CPU from a fixed seed: the same trace gives the
same gates, bit for bit, in seconds. The last exit's gate is 1: every sample stops there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.core.progress import Progress, track
from engine.core.trace import Trace

FEATURE_NAMES_TAIL = ("entropy", "margin", "agrees with previous exit", "previous max-prob")


def target(trace: Trace) -> np.ndarray:
    """[N, K] bool: stopping at exit k is right (correct at k, or no later exit is correct)."""
    correct = trace.correct
    later = np.zeros_like(correct)
    if trace.num_exits > 1:
        # any correct exit strictly after k: reversed cumulative OR, shifted by one
        later[:, :-1] = np.logical_or.accumulate(correct[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return correct | ~later


def features(probs: np.ndarray) -> np.ndarray:
    """[N, K, F] float64 gate inputs from probabilities [N, K, C] (F = C + 4)."""
    p = np.asarray(probs, dtype=np.float64)
    srt = -np.sort(-p, axis=-1)
    c = p.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1) / np.log(c)
    margin = srt[..., 0] - srt[..., 1]
    pred = p.argmax(axis=-1)
    agree = np.zeros(p.shape[:-1])
    prev_conf = np.zeros(p.shape[:-1])
    agree[:, 1:] = pred[:, 1:] == pred[:, :-1]
    prev_conf[:, 1:] = srt[:, :-1, 0]
    return np.concatenate([srt, np.stack([ent, margin, agree, prev_conf], axis=-1)], axis=-1)


def features_torch(probs: torch.Tensor) -> torch.Tensor:
    """``features`` in torch, differentiable in the probabilities (for jointly trained gates)."""
    srt = torch.sort(probs, dim=-1, descending=True).values
    c = probs.shape[-1]
    ent = -torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-30)), 0.0).sum(-1)
    ent = ent / float(np.log(c))
    margin = srt[..., 0] - srt[..., 1]
    pred = probs.argmax(dim=-1)
    agree = torch.zeros_like(margin)
    prev_conf = torch.zeros_like(margin)
    agree[:, 1:] = (pred[:, 1:] == pred[:, :-1]).to(probs.dtype)
    prev_conf[:, 1:] = srt[:, :-1, 0]
    return torch.cat([srt, torch.stack([ent, margin, agree, prev_conf], dim=-1)], dim=-1)


@dataclass(frozen=True)
class ExitGate:
    """One exit's fitted gate: standardisation, then logistic regression or a small MLP."""

    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F]
    weights: tuple[np.ndarray, ...]  # (W1, b1, W2, b2) for an MLP, (w, b) for a logistic gate
    constant: float | None = None  # set when the training target had one value only

    def score(self, x: np.ndarray) -> np.ndarray:
        """[N] probability that stopping is right, from features [N, F]."""
        if self.constant is not None:
            return np.full(len(x), self.constant)
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        if len(self.weights) == 4:
            w1, b1, w2, b2 = self.weights
            z = np.tanh(z @ w1 + b1)
            logit = z @ w2 + b2
        else:
            w, b = self.weights
            logit = z @ w + b
        return 1.0 / (1.0 + np.exp(-np.clip(logit.ravel(), -50, 50)))


@dataclass(frozen=True)
class Gates:
    """The gates of every exit but the last (whose gate is always 1)."""

    exits: tuple[ExitGate, ...]
    hidden: int
    seed: int

    @property
    def num_exits(self) -> int:
        return len(self.exits) + 1

    def score(self, probs: np.ndarray) -> np.ndarray:
        """[N, K] float32 gate scores in [0, 1] for probabilities [N, K, C]."""
        if probs.shape[1] != self.num_exits:
            raise ValueError(
                f"these gates are for {self.num_exits} exits, the trace has {probs.shape[1]}"
            )
        x = features(probs)
        out = np.ones(probs.shape[:2], dtype=np.float64)
        for k, g in enumerate(self.exits):
            out[:, k] = g.score(x[:, k])
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def _fit_one(x: np.ndarray, y: np.ndarray, hidden: int, l2: float, seed: int) -> ExitGate:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    if y.min() == y.max():
        return ExitGate(mean, scale, (), constant=float(y[0]))
    gen = torch.Generator().manual_seed(seed)
    z = torch.from_numpy((x - mean) / scale)
    t = torch.from_numpy(y.astype(np.float64))
    f = x.shape[1]
    if hidden:
        params = [
            (torch.randn(f, hidden, generator=gen, dtype=torch.float64) / np.sqrt(f)),
            torch.zeros(hidden, dtype=torch.float64),
            (torch.randn(hidden, 1, generator=gen, dtype=torch.float64) / np.sqrt(hidden)),
            torch.zeros(1, dtype=torch.float64),
        ]
    else:
        params = [torch.zeros(f, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    for p in params:
        p.requires_grad_(True)

    def forward() -> torch.Tensor:
        if hidden:
            return (torch.tanh(z @ params[0] + params[1]) @ params[2] + params[3]).squeeze(1)
        return (z @ params[0] + params[1]).squeeze(1)

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = params[::2]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(), t)
        loss = loss + l2 * sum((p**2).sum() for p in w)
        loss.backward()
        return loss

    opt.step(closure)
    return ExitGate(mean, scale, tuple(p.detach().numpy().copy() for p in params))


def fit(
    trace: Trace, hidden: int = 0, l2: float = 1e-4, seed: int = 0, progress: Progress | None = None
) -> Gates:
    """Fit one gate per exit (but the last) on a labelled trace; deterministic for a seed;
    ``progress`` hears of every exit."""
    if not trace.has_labels:
        raise ValueError("gates are trained on a labelled trace")
    lab = trace.label != -1
    sub = trace if lab.all() else trace.subset(lab)
    x = features(sub.probs)
    y = target(sub)
    exits = tuple(
        _fit_one(x[:, k], y[:, k], hidden, l2, seed + k)
        for k in track(range(trace.num_exits - 1), "gates (exits)", progress)
    )
    return Gates(exits, hidden, seed)


def cross_fit_scores(
    trace: Trace,
    folds: int = 2,
    hidden: int = 0,
    l2: float = 1e-4,
    seed: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """[N, K] gate scores where each sample is scored by gates fitted on the other folds.

    For a model without a usable training trace: every score is out-of-sample, and the folds
    are a seeded permutation of the samples.
    """
    order = np.random.default_rng(seed).permutation(trace.num_samples)
    fold = np.empty(trace.num_samples, dtype=np.int64)
    fold[order] = np.arange(trace.num_samples) % folds
    out = np.ones((trace.num_samples, trace.num_exits), dtype=np.float32)
    for f in track(range(folds), "gates (folds)", progress):
        gates = fit(trace.subset(fold != f), hidden, l2, seed)
        out[fold == f] = gates.score(trace.probs[fold == f])
    return out


def target_accuracy(trace: Trace, gate: np.ndarray, at: float = 0.5) -> np.ndarray:
    """[K] fraction of samples whose gate (thresholded at ``at``) agrees with the target."""
    return ((np.asarray(gate) >= at) == target(trace)).mean(axis=0)


JOINT_FITTED_ON = "trained jointly with the heads on the train split (JEI-DNN)"


def with_joint_gates(trace: Trace, scores: np.ndarray) -> Trace:
    """``trace`` carrying the scores of a model's own, jointly trained gates (a JEI model's)."""
    extra = {**trace.meta.extra, "gate": {"fitted_on": JOINT_FITTED_ON, "joint": True}}
    return replace(trace, meta=replace(trace.meta, extra=extra), gate=scores)
