"""Adaptive Computation Time (Graves 2016), faithful, on the parity task.

A recurrent cell is applied repeatedly ("pondering") to the same input; after every step a
halting unit says how sure the network is that it can stop. With ponder steps n = 1, 2, ...

    x^n   = [x, delta(n == 1)]                    input plus a first-step flag      [B, L+1]
    s^n   = S(x^n, s^{n-1}),  s^0 = 0             the cell (GRU, or Graves' tanh RNN) [B, H]
    h^n   = sigmoid(W_h s^n + b_h)                halting probability                [B]
    y^n   = softmax(W_y s^n + b_y)                the step's output distribution     [B, C]

    N     = min{ n' : sum_{n<=n'} h^n >= 1 - eps }, capped at max_steps (M)
    R     = 1 - sum_{n<N} h^n                     the remainder
    p^n   = h^n for n < N,  R for n = N,  0 after N   (sums to exactly 1)
    s, y  = sum_n p^n s^n,  sum_n p^n y^n         mean-field state and output
    rho   = N + R                                 ponder cost; loss = task loss + tau * rho

N is discrete, so the gradient of rho flows through R only (Graves, section 2.3): it pushes the
halting probabilities of the steps before N up, i.e. towards stopping sooner.

The task is Graves' parity: a vector of L entries, a random number 1..L of them (at random
positions) set to +1 or -1, the rest 0; the target is 1 when the number of +1 entries is odd.
Inputs with more non-zero entries are harder, so the number of ponder steps should grow with the
string's "length" (its number of non-zero entries); the halting page shows whether it does.

``halting_distribution`` is the halting math on its own (numpy), so the page can re-evaluate any
eps from stored halting scores without the model: the scores h^n do not depend on eps (each
ponder step feeds s^{n-1}, not the mean-field state), only N, R and the weights p^n do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from engine.core.costs import count_flops


@dataclass
class Config:
    num_bits: int = 8  # L, the longest string
    hidden: int = 128
    cell: str = "rnn"  # "gru", "rnn" (Graves' tanh units) or "mlp" (shared residual block)
    num_classes: int = 2
    max_steps: int = 12  # M
    eps: float = 0.01  # halt when cumulative halting >= 1 - eps
    halt_bias_init: float = -1.0  # sigmoid(-1) ~ 0.27: a few steps at the start

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


# --- the halting math ------------------------------------------------------------------------


def halting_distribution(h: np.ndarray, eps: float, max_steps: int | None = None):
    """ACT's halting rule on halting scores h [..., M] (numpy); returns (steps, remainder, p).

    steps [...] int64 in 1..M (N), remainder [...] (R), p [..., M] with p^n = h^n before N,
    R at N, 0 after; p sums to 1 over the last axis. ``max_steps`` (<= M) caps N earlier.
    """
    h = np.asarray(h, dtype=np.float64)
    m = h.shape[-1] if max_steps is None else min(int(max_steps), h.shape[-1])
    h = h[..., :m]
    cum = np.cumsum(h, axis=-1)
    before = np.concatenate([np.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    # step n runs iff the cumulative halting before it is still below 1 - eps
    runs = before < 1.0 - eps
    steps = np.minimum(runs.sum(axis=-1), m).astype(np.int64)
    n_idx = np.arange(m)
    last = n_idx == (steps[..., None] - 1)
    remainder = 1.0 - np.take_along_axis(before, steps[..., None] - 1, axis=-1)[..., 0]
    p = np.where(n_idx < steps[..., None] - 1, h, 0.0)
    p = np.where(last, remainder[..., None], p)
    return steps, remainder, p


def halting_torch(h: torch.Tensor, eps: float):
    """The same rule in torch, differentiable through R and the h^n before N (training)."""
    m = h.shape[1]
    cum = torch.cumsum(h, 1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], 1)
    runs = before.detach() < 1.0 - eps
    steps = runs.sum(1).clamp(max=m)  # [B] in 1..M
    n_idx = torch.arange(m)
    last = n_idx[None] == (steps[:, None] - 1)
    remainder = 1.0 - before.gather(1, (steps - 1)[:, None])[:, 0]
    p = torch.where(n_idx[None] < steps[:, None] - 1, h, torch.zeros_like(h))
    p = torch.where(last, remainder[:, None].expand_as(p), p)
    return steps, remainder, p


# --- the network -----------------------------------------------------------------------------


class ResidualMLPCell(nn.Module):
    """A weight-shared residual block: s' = s + W2 relu(W1 [x, s])  (the "mlp" cell)."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in + hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s + self.fc2(torch.relu(self.fc1(torch.cat([x, s], 1))))


def make_cell(kind: str, d_in: int, hidden: int) -> nn.Module:
    """The recurrent cell a ponder step applies: "gru", "rnn" (tanh) or "mlp"."""
    if kind == "gru":
        return nn.GRUCell(d_in, hidden)
    if kind == "rnn":
        return nn.RNNCell(d_in, hidden, nonlinearity="tanh")
    if kind == "mlp":
        return ResidualMLPCell(d_in, hidden)
    raise ValueError(f"unknown cell {kind!r}; use 'gru', 'rnn' or 'mlp'")


class ParityRecurrence(nn.Module):
    """The tanh/GRU/MLP recurrence over a parity string that ACT and PonderNet both ponder with:
    a cell, a halting unit and an output layer (registered in this order, as the shipped
    weights expect); each model's ``step`` reads the halting unit its own way."""

    def __init__(self, config):  # Config, or PonderNet's config: the same five fields read here
        super().__init__()
        self.config = config
        d_in = config.num_bits + 1  # L + the first-step flag
        self.cell = make_cell(config.cell, d_in, config.hidden)  # [B, L+1], [B, H] -> [B, H]
        self.halt = nn.Linear(config.hidden, 1)  # [B, H] -> [B, 1]
        nn.init.constant_(self.halt.bias, config.halt_bias_init)
        self.out = nn.Linear(config.hidden, config.num_classes)  # [B, H] -> [B, C]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.config.num_bits,)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """What every ponder step sees; for bit strings the input itself (no cost)."""
        return x

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return e.new_zeros(len(e), self.config.hidden)  # s^0 = 0

    def next_state(self, x: torch.Tensor, s: torch.Tensor, first: bool) -> torch.Tensor:
        """s^n = S([x, delta(n == 1)], s^{n-1})  [B, H]."""
        flag = torch.full((len(x), 1), 1.0 if first else 0.0)
        return self.cell(torch.cat([x, flag], 1), s)


class ACTNet(ParityRecurrence):
    """Graves' ACT on parity: the recurrence with a sigmoid halting unit h^n."""

    def step(self, x: torch.Tensor, s: torch.Tensor, first: bool):
        """One ponder step: (new state [B, H], halting score [B], class logits [B, C])."""
        s = self.next_state(x, s, first)
        return s, torch.sigmoid(self.halt(s))[:, 0], self.out(s)

    def forward(self, x: torch.Tensor, eps: float | None = None) -> dict[str, torch.Tensor]:
        return mean_field(self, x, eps)


def unroll(model: nn.Module, x: torch.Tensor, steps: int | None = None):
    """All M steps for every input: (h [B, M], logits [B, M, C], states [B, M, *state]).

    Any ACT model with ``encode``, ``initial_state`` and ``step`` (this file's ``ACTNet``,
    ``engine.families.act_cnn.model.ACTConvNet``).
    """
    steps = steps or model.config.max_steps
    e = model.encode(x)
    s = model.initial_state(e)
    hs, zs, ss = [], [], []
    for n in range(steps):
        s, h, z = model.step(e, s, n == 0)
        hs.append(h)
        zs.append(z)
        ss.append(s)
    return torch.stack(hs, 1), torch.stack(zs, 1), torch.stack(ss, 1)


def mean_field(model: nn.Module, x: torch.Tensor, eps: float | None = None) -> dict:
    """Training pass: mean-field output probabilities and the ponder cost per input.

    Every input is unrolled M steps and the steps after N get weight 0 (simple to batch);
    ``run_act`` is the inference path that really stops.
    """
    eps = model.config.eps if eps is None else eps
    h, logits, states = unroll(model, x)
    steps, remainder, p = halting_torch(h, eps)
    probs = (p[:, :, None] * torch.softmax(logits, 2)).sum(1)  # y = sum_n p^n y^n
    weights = p.reshape(*p.shape, *([1] * (states.ndim - 2)))
    return {
        "probs": probs,
        "state": (weights * states).sum(1),  # s = sum_n p^n s^n
        "steps": steps,
        "remainder": remainder,
        "ponder_cost": steps.to(remainder.dtype) + remainder,  # rho = N + R
        "p": p,
        "h": h,
    }


def build(config: dict) -> ACTNet:
    return ACTNet(Config.from_dict(config))


def act_loss(out: dict, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Graves' objective on a ``mean_field`` output: (loss, task nll) with
    loss = -log(sum_n p^n y^n[target]) + tau * (N + R)."""
    nll = -torch.log(out["probs"].gather(1, y[:, None])[:, 0].clamp_min(1e-8)).mean()
    return nll + tau * out["ponder_cost"].mean(), nll


# --- data -----------------------------------------------------------------------------------


def parity_data(n: int, num_bits: int, seed: int, min_len: int = 1, max_len: int | None = None):
    """Graves' parity inputs: (x float32 [n, L] in {-1, 0, +1}, y int64 [n], length [n]).

    ``length`` (1..L, uniform) entries at random positions are +-1; y = (number of +1) mod 2.
    """
    rng = np.random.default_rng(seed)
    max_len = max_len or num_bits
    length = rng.integers(min_len, max_len + 1, size=n)
    keys = rng.random((n, num_bits))
    rank = keys.argsort(1).argsort(1)  # a random permutation per row
    nonzero = rank < length[:, None]
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n, num_bits))
    x = np.where(nonzero, signs, 0.0).astype(np.float32)
    y = ((x == 1).sum(1) % 2).astype(np.int64)
    return x, y, length.astype(np.int64)


def parse_bits(text: str, num_bits: int) -> np.ndarray:
    """A typed string of '+', '-' and '0' (spaces ignored) -> one input [1, L]; ValueError says
    what is wrong, so a page can show it."""
    chars = "".join(str(text).split())
    bad = sorted(set(chars) - set("+-0"))
    if bad:
        raise ValueError(f"use only '+', '-' and '0' (found {', '.join(map(repr, bad))})")
    if len(chars) != num_bits:
        raise ValueError(f"the model reads exactly {num_bits} entries; this has {len(chars)}")
    table = {"+": 1.0, "-": -1.0, "0": 0.0}
    return np.array([[table[c] for c in chars]], dtype=np.float32)


# --- inference that really stops -------------------------------------------------------------


def step_flops(model: nn.Module) -> float:
    """FLOPs per input of one ponder step (cell + halting unit + output layer), counted by torch."""
    e = model.encode(torch.zeros(1, *model.input_shape))
    return float(count_flops(model.step, e, model.initial_state(e), True)[0])


def encode_flops(model: nn.Module) -> float:
    """FLOPs per input of the part that runs once before pondering (0 for bit strings)."""
    return float(count_flops(model.encode, torch.zeros(1, *model.input_shape))[0])


@torch.no_grad()
def run_act(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    eps: float | None = None,
    max_steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Ponder each input until it halts; halted inputs are dropped from the batch.

    Works for any ACT model with ``encode``, ``initial_state`` and ``step`` (``ACTNet`` here,
    ``engine.families.act_cnn.model.ACTConvNet`` for images). Per-input record: ``steps`` (N),
    ``remainder`` (R), ``ponder_cost`` (N + R), ``h`` [n, M] (halting scores of the steps that
    ran, NaN after), ``cum_halt`` [n, M] (cumulative p, ends at exactly 1), ``probs`` [n, C]
    (mean-field output), ``pred``, ``flops`` (counted by torch on what ran: the encoder once,
    then only the steps taken).
    """
    model.eval()
    cfg = model.config
    eps = cfg.eps if eps is None else float(eps)
    m = cfg.max_steps if max_steps is None else int(max_steps)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    b = len(x)
    enc, e = count_flops(model.encode, x)
    s = model.initial_state(e)
    cum = torch.zeros(b, dtype=torch.float64)
    h_all = torch.full((b, m), float("nan"), dtype=torch.float64)
    p_all = torch.zeros(b, m, dtype=torch.float64)
    probs = torch.zeros(b, cfg.num_classes, dtype=torch.float64)
    steps = torch.zeros(b, dtype=torch.int64)
    remainder = torch.zeros(b, dtype=torch.float64)
    flops = torch.full((b,), enc / max(b, 1), dtype=torch.float64)
    active = torch.arange(b)
    for n in range(m):
        total, (s_new, h, z) = count_flops(model.step, e[active], s[active], n == 0)
        flops[active] += total / len(active)
        s[active] = s_new
        h = h.double()
        h_all[active, n] = h
        halt = (cum[active] + h >= 1.0 - eps) | (n == m - 1)
        p = torch.where(halt, 1.0 - cum[active], h)
        p_all[active, n] = p
        probs[active] += p[:, None] * torch.softmax(z.double(), 1)
        cum[active] += p
        done = active[halt]
        steps[done] = n + 1
        remainder[done] = p[halt]
        active = active[~halt]
        if len(active) == 0:
            break
    return {
        "steps": steps.numpy(),
        "remainder": remainder.numpy(),
        "ponder_cost": (steps.double() + remainder).numpy(),
        "h": h_all.numpy(),
        "p": p_all.numpy(),
        "cum_halt": torch.cumsum(p_all, 1).numpy(),
        "probs": probs.numpy(),
        "pred": probs.argmax(1).numpy(),
        "flops": flops.numpy(),
    }


@torch.no_grad()
def halting_scores(model: nn.Module, x: np.ndarray | torch.Tensor, chunk: int = 1000):
    """Every input unrolled all M steps: (h [n, M], step probabilities [n, M, C]), numpy.

    With these, ``halting_distribution`` evaluates ACT at any eps without the model.
    """
    model.eval()
    return unrolled_scores(lambda xb: unroll(model, xb)[:2], x, chunk)


def unrolled_scores(unroll_chunk, x: np.ndarray | torch.Tensor, chunk: int = 1000):
    """``unroll_chunk(x [B, ...]) -> (halting scores [B, M], step logits [B, M, C])`` over ``x``
    in chunks: (scores [n, M], step probabilities [n, M, C]) in float64 numpy (ACT, PonderNet)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    hs, qs = [], []
    for i in range(0, len(x), chunk):
        h, logits = unroll_chunk(x[i : i + chunk])
        hs.append(h.double().numpy())
        qs.append(torch.softmax(logits.double(), 2).numpy())
    return np.concatenate(hs), np.concatenate(qs)


def outputs_at(h: np.ndarray, step_probs: np.ndarray, eps: float, max_steps: int | None = None):
    """ACT's answer at ``eps`` from stored scores: (steps, remainder, ponder cost, probs [n, C])."""
    steps, remainder, p = halting_distribution(h, eps, max_steps)
    m = p.shape[-1]
    probs = (p[..., None] * step_probs[..., :m, :]).sum(-2)
    return steps, remainder, steps + remainder, probs


@torch.no_grad()
def infer(model: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``run_act``'s ponder loop with nothing counted or recorded (what a deployment runs, for
    the profiler): halted inputs leave the batch; returns the mean-field class probabilities."""
    m = model.config.max_steps
    e = model.encode(x)
    s = model.initial_state(e)
    b = len(x)
    cum = torch.zeros(b, dtype=torch.float64)
    probs = torch.zeros(b, model.config.num_classes, dtype=torch.float64)
    active = torch.arange(b)
    for n in range(m):
        s_new, h, z = model.step(e[active], s[active], n == 0)
        s[active] = s_new
        h = h.double()
        halt = (cum[active] + h >= 1.0 - eps) | (n == m - 1)
        p = torch.where(halt, 1.0 - cum[active], h)
        probs[active] += p[:, None] * torch.softmax(z.double(), 1)
        cum[active] += p
        active = active[~halt]
        if len(active) == 0:
            break
    return probs
