"""PonderNet (Banino, Balaguer & Blundell 2021) on the parity task.

Like ACT (``engine.families.act.model``), a recurrent cell is applied again and again to the same input,
and after every step n a halting head says how likely the network is to stop *at* that step:

    x^n     = [x, delta(n == 1)]                  input plus a first-step flag        [B, L+1]
    s^n     = S(x^n, s^{n-1}),  s^0 = 0           the cell (the same choices as ACT)  [B, H]
    y^n     = W_y s^n + b_y                       the step's class logits             [B, C]
    lam^n   = sigmoid(W_h s^n + b_h)              P(halt at n | not halted before n)  [B]

Unlike ACT, halting is a proper random variable N. With the last step M forced to halt
(lam^M := 1, so the distribution sums to exactly 1):

    p_n     = lam^n prod_{j<n} (1 - lam^j)        P(N = n)                            [B, M]
    p_M     = prod_{j<M} (1 - lam^j)              the remainder, absorbed by step M

Training minimises the expected task loss over the halting step plus a KL to a geometric prior
(see ``train.py``):

    L       = sum_n p_n CE(y^n, target)  +  beta KL(p || p_G(lambda_p))

with p_G the same halting distribution for a constant lam^n = lambda_p (a geometric distribution
whose tail beyond M is absorbed by step M, exactly as for p), so KL = 0 iff the model halts like
the prior. The network answers with the output y^N of the step it halts at, never a mixture.

Inference picks N in one of two ways:
    threshold   N = the first n with sum_{k<=n} p_k >= q  (q = 0.5: the median halting step)
    sample      N = the first n with u_n < lam^n,  u_n ~ U(0, 1) from a seeded generator,
                i.e. flip a Bernoulli(lam^n) coin at every step (N is then distributed as p)

The halting scores lam^n do not depend on q (step n feeds s^{n-1}), so the whole test set can be
unrolled once and evaluated at any q in numpy (``records.py``); ``run`` is the inference path that
really stops, dropping halted inputs from the batch, with FLOPs counted by torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from engine.core.costs import count_flops
from engine.families.act.model import ParityRecurrence, unroll, unrolled_scores


@dataclass
class PonderNetConfig:
    num_bits: int = 12  # L, the string length the model reads
    hidden: int = 64  # H
    cell: str = "rnn"  # "rnn" (tanh, as ACT's parity model), "gru" or "mlp"
    num_classes: int = 2  # C
    max_steps: int = 12  # M; step M always halts
    q: float = 0.5  # default threshold on the cumulative halting probability
    halt_bias_init: float = -2.0  # sigmoid(-2) ~ 0.12: start near a geometric prior of ~0.1

    @classmethod
    def from_dict(cls, d: dict) -> PonderNetConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


# --- the halting math ------------------------------------------------------------------------


def halting_distribution(lam: np.ndarray) -> np.ndarray:
    """p [..., M] from halting scores lam [..., M] (numpy, float64): p_n = lam_n prod_{j<n}(1 -
    lam_j), the last step taking the remainder prod_{j<M}(1 - lam_j) whatever lam_M is."""
    lam = np.asarray(lam, dtype=np.float64)
    survive = np.cumprod(1.0 - lam, axis=-1)  # P(N > n)
    before = np.concatenate([np.ones_like(lam[..., :1]), survive[..., :-1]], axis=-1)  # P(N >= n)
    p = lam * before
    p[..., -1] = before[..., -1]
    return p


def log_halting_distribution(a: torch.Tensor) -> torch.Tensor:
    """log p [B, M] from halting logits a [B, M] (torch, differentiable): the same distribution
    as ``halting_distribution(sigmoid(a))``, in log space so that a saturated lam never gives
    log 0."""
    log_lam, log_stay = F.logsigmoid(a), F.logsigmoid(-a)  # log lam, log(1 - lam)
    log_before = torch.cat([torch.zeros_like(a[:, :1]), torch.cumsum(log_stay, 1)[:, :-1]], 1)
    return torch.cat([(log_lam + log_before)[:, :-1], log_before[:, -1:]], 1)


def log_geometric_prior(lambda_p: float, max_steps: int) -> torch.Tensor:
    """log p_G [M]: the halting distribution of a constant lam = lambda_p (truncated geometric)."""
    a = torch.full((1, max_steps), float(np.log(lambda_p) - np.log1p(-lambda_p)))
    return log_halting_distribution(a.double())[0]


def kl_to_prior(log_p: torch.Tensor, lambda_p: float) -> torch.Tensor:
    """KL(p || p_G(lambda_p)) per input [B], from log p [B, M]."""
    log_prior = log_geometric_prior(lambda_p, log_p.shape[1]).to(log_p.dtype)
    return (log_p.exp() * (log_p - log_prior)).sum(1)


def threshold_steps(p: np.ndarray, q: float) -> np.ndarray:
    """N [...] in 1..M: the first step whose cumulative halting probability reaches q (step M at
    the latest, so float round-off in the sum never runs past the end)."""
    reached = np.cumsum(p, axis=-1) >= q
    reached[..., -1] = True
    return reached.argmax(-1) + 1


def sampled_steps(lam: np.ndarray, seed: int) -> np.ndarray:
    """N [n] in 1..M: the first step whose Bernoulli(lam^n) coin says halt; the coins are
    u [n, M] ~ U(0, 1) from ``np.random.default_rng(seed)`` (one row per input)."""
    u = np.random.default_rng(seed).random(lam.shape)
    halt = u < lam
    halt[..., -1] = True
    return halt.argmax(-1) + 1


def expected_steps(p: np.ndarray) -> np.ndarray:
    """E[N] = sum_n n p_n [...]."""
    return (p * np.arange(1, p.shape[-1] + 1)).sum(-1)


# --- the network -----------------------------------------------------------------------------


class PonderNet(ParityRecurrence):
    """ACT's recurrence (cell, halting unit ``halt`` giving a^n with lam^n = sigmoid(a^n), output
    layer ``out`` giving y^n), read as PonderNet's per-step halting probability."""

    def step(self, e: torch.Tensor, s: torch.Tensor, first: bool):
        """One step: (new state [B, H], halting logit a^n [B], class logits y^n [B, C])."""
        s = self.next_state(e, s, first)
        return s, self.halt(s)[:, 0], self.out(s)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass, every input unrolled M steps: halting logits a [B, M], log p [B, M],
        step logits [B, M, C]."""
        a, logits, _ = unroll(self, x, self.config.max_steps)
        return {"a": a, "log_p": log_halting_distribution(a), "logits": logits}

    @torch.no_grad()
    def unroll(self, x: torch.Tensor, max_steps: int | None = None):
        """Every input unrolled all steps: (lam [B, M], step logits [B, M, C])."""
        a, logits, _ = unroll(self, x, max_steps or self.config.max_steps)
        return torch.sigmoid(a), logits


def build(config: dict) -> PonderNet:
    return PonderNet(PonderNetConfig.from_dict(config))


def ponder_loss(out: dict, y: torch.Tensor, lambda_p: float, beta: float):
    """PonderNet's objective on a ``forward`` output: (loss, expected task loss, KL), batch means.

    loss = sum_n p_n CE(y^n, target) + beta KL(p || p_G(lambda_p)).
    """
    logits, log_p = out["logits"], out["log_p"]
    b, m, c = logits.shape
    ce = F.cross_entropy(logits.reshape(b * m, c), y.repeat_interleave(m), reduction="none")
    rec = (log_p.exp() * ce.view(b, m)).sum(1).mean()
    kl = kl_to_prior(log_p, lambda_p).mean()
    return rec + beta * kl, rec, kl


# --- inference that really stops -------------------------------------------------------------


@dataclass(frozen=True)
class PonderRun:
    """What ``run`` did, per input."""

    steps: np.ndarray  # [n] int, the halting step N (1..M)
    lam: np.ndarray  # [n, M] halting scores of the steps that ran, NaN after
    p: np.ndarray  # [n, M] P(N = k) for the steps that ran, 0 after
    probs: np.ndarray  # [n, C] softmax of y^N, the halting step's output
    pred: np.ndarray  # [n]
    flops: np.ndarray  # [n] counted by torch: the encoder once, then the steps taken


@torch.no_grad()
def run(
    model: PonderNet,
    x: np.ndarray | torch.Tensor,
    q: float | None = None,
    *,
    sample: bool = False,
    seed: int = 0,
    max_steps: int | None = None,
) -> PonderRun:
    """Run each input until it halts, dropping halted inputs from the batch.

    Halts at the first step whose cumulative halting probability reaches ``q`` (default: the
    config's), or, with ``sample=True``, where the Bernoulli(lam^n) coin comes up (coins as in
    ``sampled_steps``, so the run and the stored records agree). ``max_steps`` (<= M) makes that
    step absorb the remainder instead of M.
    """
    model.eval()
    cfg = model.config
    q = cfg.q if q is None else float(q)
    m = cfg.max_steps if max_steps is None else min(int(max_steps), cfg.max_steps)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    b = len(x)
    u = torch.from_numpy(np.random.default_rng(seed).random((b, m))) if sample else None
    enc, e = count_flops(model.encode, x)
    s = model.initial_state(e)
    survive = torch.ones(b, dtype=torch.float64)  # P(N >= n), as a running product
    cum = torch.zeros(b, dtype=torch.float64)  # P(N <= n), as a running sum
    lam_all = torch.full((b, m), float("nan"), dtype=torch.float64)
    p_all = torch.zeros(b, m, dtype=torch.float64)
    probs = torch.zeros(b, cfg.num_classes, dtype=torch.float64)
    steps = torch.zeros(b, dtype=torch.int64)
    flops = torch.full((b,), enc / max(b, 1), dtype=torch.float64)
    active = torch.arange(b)
    for n in range(m):
        total, (s_new, a, z) = count_flops(model.step, e[active], s[active], n == 0)
        flops[active] += total / len(active)
        s[active] = s_new
        lam = torch.sigmoid(a).double()  # the float32 value the unroll stores, then float64
        lam_all[active, n] = lam
        last = n == m - 1
        p = survive[active] if last else lam * survive[active]
        p_all[active, n] = p
        cum[active] += p
        survive[active] *= 1.0 - lam
        halt = (u[active, n] < lam) if sample else (cum[active] >= q)
        halt |= last
        done = active[halt]
        steps[done] = n + 1
        probs[done] = torch.softmax(z[halt].double(), 1)
        active = active[~halt]
        if len(active) == 0:
            break
    return PonderRun(
        steps=steps.numpy(),
        lam=lam_all.numpy(),
        p=p_all.numpy(),
        probs=probs.numpy(),
        pred=probs.argmax(1).numpy(),
        flops=flops.numpy(),
    )


@torch.no_grad()
def halting_scores(model: PonderNet, x: np.ndarray | torch.Tensor, chunk: int = 1000):
    """Every input unrolled all M steps: (lam [n, M], step probabilities [n, M, C]), numpy; with
    these, ``records.at_q`` evaluates any q without the model."""
    model.eval()
    return unrolled_scores(model.unroll, x, chunk)


@torch.no_grad()
def infer(model: PonderNet, x: torch.Tensor, q: float) -> torch.Tensor:
    """``run``'s loop at threshold ``q`` with nothing counted or recorded (what a deployment
    runs, for the profiler): halted inputs leave the batch; returns the class probabilities."""
    m = model.config.max_steps
    e = model.encode(x)
    s = model.initial_state(e)
    b = len(x)
    survive = torch.ones(b, dtype=torch.float64)
    cum = torch.zeros(b, dtype=torch.float64)
    probs = torch.zeros(b, model.config.num_classes, dtype=torch.float64)
    active = torch.arange(b)
    for n in range(m):
        s_new, a, z = model.step(e[active], s[active], n == 0)
        s[active] = s_new
        lam = torch.sigmoid(a).double()
        last = n == m - 1
        cum[active] += survive[active] if last else lam * survive[active]
        survive[active] *= 1.0 - lam
        halt = (cum[active] >= q) | last
        probs[active[halt]] = torch.softmax(z[halt].double(), 1)
        active = active[~halt]
        if len(active) == 0:
            break
    return probs
