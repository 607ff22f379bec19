"""QuEE's learned choice: exit, continue in int8, or continue in float32 (pure functions).

QuEE (Regol, Chataoui, Coates) adds a third option to early exit: a sample that should not stop
yet may finish its remaining stages in a cheaper, quantised precision. The crux is *predicting
the accuracy gain* further computation would bring. Here, per exit k (all but the last), two
small regressors read the exit's outputs (``engine.core.gates.features``: sorted
probabilities, entropy, margin, agreement with and confidence of the exit before) and predict,
for every later exit j,

- ``gain_float[j]``: correct at exit j in float32 minus correct at exit k;
- ``gain_int8[j]``:  correct at exit j after running stages k+1..j in int8, minus correct at k.

At exit k a sample still in float32 scores "exit" 0, "float" max_j gain_float[j] − λ·cost,
"int8" max_j gain_int8[j] − λ·cost (costs: the extra stages in that precision, as a fraction of
the float32 full model) and takes the best (ties go to the cheaper option, exit first). "Exit"
stops; "float" runs one more stage and decides again; "int8" commits: stages k+1.. run in int8
and the sample exits at the int8 exit j it scored best. λ is solved by bisection so that the
*realised* mean cost meets the budget. The same ``Choice.actions`` / ``Choice.int8_target``
decide in the simulation (over the records, ``simulate``) and in the real runtime
(``engine.run.runtime``, on the running samples' outputs), so both take the same decisions on
the same inputs.

Baselines over the same records: the band rule (the runtime's ``quee_band``: max-prob
threshold t to exit, confident-but-not-enough ≥ band switches to int8 and keeps exiting under
t), float-only and int8-only max-prob early exit, and the oracle of the three-way choice (per
sample the cheapest correct plan among float32 exit k / int8 from stage s ≥ 1 to exit j, with λ
by bisection).

Records (``QueeRecords``): per sample the float32 probabilities at every exit and, per int8
start stage s and exit j ≥ s, the int8 prediction and max probability when stages s..j ran in
int8 from the float32 activation after stage s−1 (s = 0: from the input). Built by
``python -m engine.quee_build MODEL``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.core.gates import features

EXIT, INT8, FLOAT = 0, 1, 2
ACTIONS = ("exit", "int8", "float")


# --- records and costs -------------------------------------------------------------------------


@dataclass(frozen=True)
class QueeRecords:
    """What every plan would give, per sample: float32 exits and int8 continuations."""

    label: np.ndarray  # [N] int64
    probs: np.ndarray  # [N, K, C] float32, float32 chain
    int8_pred: np.ndarray  # [N, K, K] int64: [s, j] prediction at exit j, int8 from stage s; -1 j<s
    int8_conf: np.ndarray  # [N, K, K] float32: [s, j] max probability there; nan where j < s

    @property
    def num_samples(self) -> int:
        return len(self.label)

    @property
    def num_exits(self) -> int:
        return self.probs.shape[1]

    @property
    def correct(self) -> np.ndarray:
        """[N, K] bool: float32 exit k is right."""
        return self.probs.argmax(axis=-1) == self.label[:, None]

    @property
    def int8_correct(self) -> np.ndarray:
        """[N, K, K] bool: int8 from stage s, exit j is right (False where j < s)."""
        return self.int8_pred == self.label[:, None, None]

    def subset(self, rows) -> QueeRecords:
        return QueeRecords(
            self.label[rows], self.probs[rows], self.int8_pred[rows], self.int8_conf[rows]
        )


@dataclass(frozen=True)
class Costs:
    """Cost of every stage (its head included) in float32 and int8, in one unit (FLOPs)."""

    float_stage: np.ndarray  # [K]
    int8_stage: np.ndarray  # [K]

    @property
    def full(self) -> float:
        return float(self.float_stage.sum())

    def float_exit(self) -> np.ndarray:
        """[K] cost of float32 exit k, as a fraction of the float32 full model."""
        return np.cumsum(self.float_stage) / self.full

    def int8_path(self) -> np.ndarray:
        """[K, K] fraction: float32 stages < s, then int8 stages s..j (inf where j < s)."""
        k = len(self.float_stage)
        f = np.concatenate([[0.0], np.cumsum(self.float_stage)])
        q = np.concatenate([[0.0], np.cumsum(self.int8_stage)])
        out = np.full((k, k), np.inf)
        for s in range(k):
            out[s, s:] = f[s] + q[s + 1 :] - q[s]
        return out / self.full


def costs_from(flops_stage, flops_head, int8_ratio) -> Costs:
    """Stage+head FLOPs, int8 stages discounted by ``int8_ratio`` (per stage or one number)."""
    f = np.asarray(flops_stage, dtype=np.float64) + np.asarray(flops_head, dtype=np.float64)
    r = np.broadcast_to(np.asarray(int8_ratio, dtype=np.float64), f.shape)
    return Costs(f, f * r)


# --- the gain regressors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Regressor:
    """Standardisation, then a one-hidden-layer tanh MLP (or linear) with linear outputs."""

    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]  # (W1, b1, W2, b2) or (W, b)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[m, outputs] from features [m, F]."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        if len(self.weights) == 4:
            w1, b1, w2, b2 = self.weights
            return np.tanh(z @ w1 + b1) @ w2 + b2
        w, b = self.weights
        return z @ w + b


def fit_regressor(
    x: np.ndarray, y: np.ndarray, hidden: int = 8, l2: float = 1e-3, seed: int = 0
) -> Regressor:
    """Least squares on targets y [N, outputs], L-BFGS in float64 from a fixed seed: the same
    data give the same weights, bit for bit."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(len(x), -1)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    gen = torch.Generator().manual_seed(seed)
    z = torch.from_numpy((x - mean) / scale)
    t = torch.from_numpy(y)
    f, m = x.shape[1], y.shape[1]
    if hidden:
        params = [
            torch.randn(f, hidden, generator=gen, dtype=torch.float64) / np.sqrt(f),
            torch.zeros(hidden, dtype=torch.float64),
            torch.randn(hidden, m, generator=gen, dtype=torch.float64) / np.sqrt(hidden),
            t.mean(dim=0).clone(),
        ]
    else:
        params = [torch.zeros(f, m, dtype=torch.float64), t.mean(dim=0).clone()]
    for p in params:
        p.requires_grad_(True)

    def forward() -> torch.Tensor:
        if hidden:
            return torch.tanh(z @ params[0] + params[1]) @ params[2] + params[3]
        return z @ params[0] + params[1]

    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=100, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((forward() - t) ** 2).mean() + l2 * sum((p**2).sum() for p in params[::2])
        loss.backward()
        return loss

    opt.step(closure)
    return Regressor(mean, scale, tuple(p.detach().numpy().copy() for p in params))


@dataclass(frozen=True)
class GainModel:
    """Per exit k but the last: predicted gains at every later exit j, in float32 and int8."""

    gain_float: tuple[Regressor, ...]  # [k] -> outputs for j = k+1 .. K-1
    gain_int8: tuple[Regressor, ...]
    hidden: int
    seed: int

    @property
    def num_exits(self) -> int:
        return len(self.gain_float) + 1

    def predict(self, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """([m, K-1-k], [m, K-1-k]) predicted gains at exits k+1.. from probabilities
        [m, >k, C] of exits 0..k (later columns are not read)."""
        x = features(probs[:, : k + 1])[:, k]
        return self.gain_float[k].predict(x), self.gain_int8[k].predict(x)


def gain_targets(rec: QueeRecords, k: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, K-1-k], [N, K-1-k]) realised gains at exits j > k: float32 exit j / int8 from
    stage k+1 at exit j, minus float32 exit k."""
    c = rec.correct.astype(np.float64)
    q = rec.int8_correct[:, k + 1, k + 1 :].astype(np.float64)
    return c[:, k + 1 :] - c[:, k : k + 1], q - c[:, k : k + 1]


def fit(rec: QueeRecords, hidden: int = 8, l2: float = 1e-3, seed: int = 0) -> GainModel:
    """The regressors of every exit but the last, deterministic for a seed."""
    x = features(rec.probs)
    gf, g8 = [], []
    for e in range(rec.num_exits - 1):
        tf, t8 = gain_targets(rec, e)
        gf.append(fit_regressor(x[:, e], tf, hidden, l2, seed + e))
        g8.append(fit_regressor(x[:, e], t8, hidden, l2, seed + 100 + e))
    return GainModel(tuple(gf), tuple(g8), hidden, seed)


# --- the choice ------------------------------------------------------------------------------


def decide(
    gain_float: np.ndarray,
    gain_int8: np.ndarray,
    cost_float: np.ndarray,
    cost_int8: np.ndarray,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """([m] action, [m] best int8 target offset): gains [m, J] at the J later exits, extra
    costs [J]; the action is the argmax of (exit 0, best int8 gain − λ·cost, best float gain −
    λ·cost); ties go to the first (cheapest-first order EXIT, INT8, FLOAT)."""
    vf = gain_float - lam * np.asarray(cost_float)[None, :]
    v8 = gain_int8 - lam * np.asarray(cost_int8)[None, :]
    target = v8.argmax(axis=1)
    score = np.stack([np.zeros(len(vf)), v8.max(axis=1), vf.max(axis=1)], axis=1)
    return score.argmax(axis=1), target


@dataclass(frozen=True)
class Choice:
    """A gain model, a cost model and λ: everything a decision needs."""

    gains: GainModel
    costs: Costs
    lam: float

    def _decide(self, probs: np.ndarray, k: int, predicted=None) -> tuple[np.ndarray, np.ndarray]:
        f = self.costs.float_exit()
        gf, g8 = self.gains.predict(probs, k) if predicted is None else predicted
        act, off = decide(
            gf, g8, f[k + 1 :] - f[k], self.costs.int8_path()[k + 1, k + 1 :] - f[k], self.lam
        )
        return act.astype(np.int64), (k + 1 + off).astype(np.int64)

    def actions(self, probs: np.ndarray, k: int) -> np.ndarray:
        """[m] action at exit k for samples in float32 with probabilities [m, >k, C] at 0..k."""
        if k >= self.gains.num_exits - 1:
            return np.full(probs.shape[0], EXIT, dtype=np.int64)
        return self._decide(probs, k)[0]

    def int8_target(self, probs: np.ndarray, k: int) -> np.ndarray:
        """[m] exit an int8 sample that switched after float32 exit k stops at (> k)."""
        return self._decide(probs, k)[1]


@dataclass(frozen=True)
class Outcome:
    """Per sample what a rule did: exit taken, first int8 stage (K = none), right?, cost."""

    exit: np.ndarray
    int8_from: np.ndarray
    correct: np.ndarray
    cost: np.ndarray  # fraction of the float32 full model
    actions: np.ndarray | None = None  # [N, K] action at each float32 exit reached (-1 after)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    def fractions(self) -> np.ndarray:
        """[K, 3] share of all samples that took each action at each exit (reached in float)."""
        return np.stack([(self.actions == a).mean(axis=0) for a in range(3)], axis=1)


def predicted(rec: QueeRecords, gains: GainModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """The gains predicted at every exit but the last, for every sample: they do not depend
    on λ, so a λ search computes them once."""
    return [gains.predict(rec.probs, e) for e in range(rec.num_exits - 1)]


def simulate(rec: QueeRecords, choice: Choice, pred=None) -> Outcome:
    """The learned choice over the records, vectorised over samples (a loop over K exits);
    ``pred``: ``predicted(rec, choice.gains)`` when already computed."""
    n, k = rec.num_samples, rec.num_exits
    pred = predicted(rec, choice.gains) if pred is None else pred
    acts = np.full((n, k), EXIT, dtype=np.int64)
    targets = np.full((n, k), k - 1, dtype=np.int64)
    for e in range(k - 1):
        acts[:, e], targets[:, e] = choice._decide(rec.probs, e, pred[e])
    rows = np.arange(n)
    at = (acts != FLOAT).argmax(axis=1)  # first exit not continuing in float32 (last: EXIT)
    int8 = acts[rows, at] == INT8
    s = np.minimum(at + 1, k - 1)
    j = targets[rows, at]
    correct = np.where(int8, rec.int8_correct[rows, s, j], rec.correct[rows, at])
    cost = np.where(int8, choice.costs.int8_path()[s, j], choice.costs.float_exit()[at])
    shown = np.where(np.arange(k)[None, :] <= at[:, None], acts, -1)
    return Outcome(np.where(int8, j, at), np.where(int8, at + 1, k), correct, cost, shown)


def _bisect(spent, budget: float, iters: int) -> float:
    """The smallest λ (to bisection precision) whose spending is at most ``budget``."""
    lo, hi = 0.0, 1.0
    if spent(lo) <= budget:
        return lo
    while spent(hi) > budget and hi < 1e9:
        lo, hi = hi, hi * 4
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if spent(mid) <= budget else (mid, hi)
    return hi


def solve(
    rec: QueeRecords,
    gains: GainModel,
    costs: Costs,
    budget: float,
    iters: int = 50,
    pred=None,
) -> Choice:
    """The choice whose realised mean cost on ``rec`` is at most ``budget`` (a fraction of the
    full float32 model), as close to it as bisection in λ gets.

    λ = 0 spends wherever a gain is predicted; a large λ exits everything at the first exit.
    A budget below that floor gets the floor (the cheapest the choice can be). ``pred``:
    ``predicted(rec, gains)`` when already computed.
    """
    pred = predicted(rec, gains) if pred is None else pred

    def spent(lam: float) -> float:
        return simulate(rec, Choice(gains, costs, lam), pred).mean_cost

    return Choice(gains, costs, _bisect(spent, budget, iters))


# --- baselines ---------------------------------------------------------------------------------


def float_only(rec: QueeRecords, costs: Costs, threshold: float) -> Outcome:
    """Max-prob early exit, everything in float32 (the "onnx" backend)."""
    mp = rec.probs.max(axis=-1)
    stop = mp >= threshold
    stop[:, -1] = True
    at = stop.argmax(axis=1)
    rows = np.arange(rec.num_samples)
    k = rec.num_exits
    return Outcome(
        at, np.full(rec.num_samples, k), rec.correct[rows, at], costs.float_exit()[at], None
    )


def int8_only(rec: QueeRecords, costs: Costs, threshold: float) -> Outcome:
    """Max-prob early exit, every stage in int8 (the "onnx_int8" backend)."""
    stop = rec.int8_conf[:, 0] >= threshold
    stop[:, -1] = True
    at = stop.argmax(axis=1)
    rows = np.arange(rec.num_samples)
    return Outcome(
        at,
        np.zeros(rec.num_samples, dtype=np.int64),
        rec.int8_correct[rows, 0, at],
        costs.int8_path()[0, at],
        None,
    )


def band_rule(rec: QueeRecords, costs: Costs, threshold: float, band: float) -> Outcome:
    """The runtime's fixed band: exit at max-prob ≥ threshold; not stopping but ≥ band switches
    to int8 for the rest (and keeps exiting at ≥ threshold); below the band stays in float32."""
    n, k = rec.num_samples, rec.num_exits
    mp = rec.probs.max(axis=-1)
    rows = np.arange(n)
    stop = mp >= threshold
    stop[:, -1] = True
    switch = ~stop & (mp >= band)
    switch[:, -1] = False
    first = (stop | switch).argmax(axis=1)
    went = switch[rows, first]
    s = np.minimum(first + 1, k - 1)
    q_stop = rec.int8_conf[rows, s] >= threshold  # [n, K] over exits j
    q_stop[:, -1] = True
    q_stop &= np.arange(k)[None, :] >= s[:, None]
    j = q_stop.argmax(axis=1)
    exit_ = np.where(went, j, first)
    correct = np.where(went, rec.int8_correct[rows, s, j], rec.correct[rows, first])
    cost = np.where(went, costs.int8_path()[s, j], costs.float_exit()[first])
    return Outcome(exit_, np.where(went, first + 1, k), correct, cost, None)


def oracle(rec: QueeRecords, costs: Costs, budget: float) -> Outcome:
    """Per sample the best plan of the three-way choice knowing the label (float32 exit k, or
    int8 from stage s ≥ 1 to exit j ≥ s), within the budget on the mean cost.

    Being right is worth 1 for every sample, so the optimum is greedy: every sample starts at
    the cheapest plan (exit 0), and the upgrades to a sample's cheapest *right* plan are bought
    cheapest first while the budget lasts (a 0/1 knapsack with equal values).
    """
    n, k = rec.num_samples, rec.num_exits
    pairs = [(s, j) for s in range(1, k) for j in range(s, k)]
    ok = np.concatenate(
        [rec.correct, np.stack([rec.int8_correct[:, s, j] for s, j in pairs], axis=1)], axis=1
    )
    path = costs.int8_path()
    cost = np.concatenate([costs.float_exit(), [path[s, j] for s, j in pairs]])
    right_cost = np.where(ok, cost[None, :], np.inf)
    best = right_cost.argmin(axis=1)  # the cheapest right plan (any plan when none is right)
    extra = right_cost[np.arange(n), best] - cost[0]
    plan = np.zeros(n, dtype=np.int64)
    order = np.argsort(extra, kind="stable")
    spend = np.cumsum(extra[order])
    fits = np.isfinite(spend) & (spend <= (budget - cost[0]) * n + 1e-9)
    plan[order[fits]] = best[order[fits]]
    int8 = plan >= k
    pj = np.array([(k, e) for e in range(k)] + pairs)[plan]
    return Outcome(
        np.where(int8, pj[:, 1], plan),
        np.where(int8, pj[:, 0], k),
        ok[np.arange(n), plan],
        cost[plan],
        None,
    )


# --- curves ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Accuracy against mean cost (fraction of the float32 full model) of one rule."""

    name: str
    cost: np.ndarray
    accuracy: np.ndarray
    setting: np.ndarray  # the budget or threshold of each point


THRESHOLDS = np.concatenate([[0.0], 1 - np.logspace(0, -5, 40), [1.01]])
BUDGETS = np.round(np.linspace(0.3, 1.0, 15), 4)


def curves(
    test: QueeRecords,
    gains: GainModel,
    costs: Costs,
    band: float = 0.5,
    budgets=BUDGETS,
    fit_on: QueeRecords | None = None,
) -> dict[str, Curve]:
    """Every rule's curve. λ is solved on ``fit_on`` (default: ``test``) for each budget."""
    tune = test if fit_on is None else fit_on
    p_tune = p_test = None
    if len(budgets):
        p_tune = predicted(tune, gains)
        p_test = p_tune if tune is test else predicted(test, gains)

    def curve(name, settings, run) -> Curve:
        outs = [run(v) for v in settings]
        return Curve(
            name,
            np.array([o.mean_cost for o in outs]),
            np.array([o.accuracy for o in outs]),
            np.asarray(settings, dtype=np.float64),
        )

    return {
        "learned": curve(
            "learned",
            budgets,
            lambda b: simulate(test, solve(tune, gains, costs, b, pred=p_tune), p_test),
        ),
        "band": curve("band", THRESHOLDS, lambda t: band_rule(test, costs, t, band)),
        "float": curve("float", THRESHOLDS, lambda t: float_only(test, costs, t)),
        "int8": curve("int8", THRESHOLDS, lambda t: int8_only(test, costs, t)),
        "oracle": curve("oracle", budgets, lambda b: oracle(test, costs, b)),
    }


def best_within(curve: Curve, budget: float) -> tuple[float, float] | None:
    """(accuracy, cost) of the most accurate point of ``curve`` costing at most ``budget``."""
    ok = curve.cost <= budget + 1e-12
    if not ok.any():
        return None
    i = np.flatnonzero(ok)[np.argmax(curve.accuracy[ok])]
    return float(curve.accuracy[i]), float(curve.cost[i])
