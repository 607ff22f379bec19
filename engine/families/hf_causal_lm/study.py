"""Layer skipping versus early exit on one pretrained decoder (Glavas et al. 2024, "Dynamic
layer selection in decoder-only transformers"), and the cached per-layer records the language
page's threshold slider reads.

What is built (``build_study``), once, by ``python -m engine.families.hf_causal_lm.study``:

- **records**: one teacher-forced full-depth pass per held-out BBC passage; per position and
  layer the logit-lens top-1, whether it is the full model's top-1, the three CALM confidences,
  the log-probability of the text's next token and a learned gate's score. ``simulate_exits``
  turns them into per-token exits for any measure and threshold in milliseconds.
- **curves**: teacher-forced quality (next-token agreement with the full model, perplexity)
  versus layers per token for early exit at a fixed layer, CALM thresholds per measure, the
  gate, and static skipping (a middle block, evenly spaced, a greedy least-harm order found on
  separate calibration text).
- **oracle**: per evaluation passage, the fewest layers among those plans whose greedy
  continuation equals the full model's (or whose perplexity is within a tolerance of it).

Files, all under ``assets/traces/records/`` (``study_files``): ``<id>__study.json`` (the card:
command, wall time, seed, settings, skip order, gate metrics, summary), ``<id>__study_records
.parquet``, ``<id>__study_curves.parquet``, ``<id>__study_oracle.parquet``. ``load_study`` reads
them back as a ``Study``. Everything after the builders is numpy/polars on those tables.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from engine.core.policies import first_true
from engine.core.progress import Progress, terminal, track
from engine.families.hf_causal_lm import analysis as A
from engine.families.hf_causal_lm.model import CausalLM, LayerCache, encode, walk
from engine.paths import RECORDS_DIR, user_traces_dir

MODEL_ID = "smollm2_135m"
GLAVAS_ORACLE_FRACTION = 0.233  # Glavas et al. 2024: per-sequence oracle, fraction of layers
MEASURES = (*A.MEASURES, "gate")  # per-token exit scores held in the records
SKIP_FAMILIES = ("skip_middle", "skip_even", "skip_greedy")
PLAN_FAMILIES = ("exit_fixed", *SKIP_FAMILIES)  # the oracle's family of static plans
METHOD_LABELS = {
    "exit_fixed": "early exit at a fixed layer",
    "calm_max_prob": "CALM early exit: max probability",
    "calm_margin": "CALM early exit: top-2 margin",
    "calm_saturation": "CALM early exit: state saturation",
    "calm_gate": "early exit: learned gate on hidden states",
    "skip_middle": "skip a contiguous middle block",
    "skip_even": "skip evenly spaced layers",
    "skip_greedy": "skip the least harmful layers (greedy order)",
}
ORACLE_CRITERIA = ("greedy", "perplexity")


@dataclass(frozen=True)
class StudyConfig:
    """Sizes chosen for a shared 2-core CPU (SmolLM2: see the card's wall time)."""

    n_eval: int = 16  # held-out BBC passages (the test split)
    n_tokens: int = 64  # tokens per passage
    n_calib: int = 8  # calibration passages (train split) for the gate
    n_order: int = 2  # of them, the ones the greedy skip order is found on (joined)
    order_tokens: int = 16  # tokens of each of those
    max_order: int = 24  # layers the greedy order ranks (at least 6 kept)
    kept_grid: tuple[int, ...] = (30, 27, 24, 21, 18, 15, 12, 6)  # skip curves
    prompt_tokens: int = 32  # oracle: the passage's first tokens as the prompt ...
    gen_tokens: int = 16  # ... and this many greedy tokens to match
    ppl_tolerance: float = 0.10  # oracle: perplexity within 10 % of the full model's
    gate_hidden: int = 32
    gate_epochs: int = 200
    seed: int = 0

    @classmethod
    def for_depth(cls, n_layer: int, **kw) -> StudyConfig:
        """SmolLM2's sizes with the layer grids scaled to another decoder's depth (a user's)."""
        if n_layer == 30:
            return cls(**kw)
        grid = sorted({max(2, round(n_layer * f)) for f in (1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2)})
        order = max(1, min(n_layer - 2, round(n_layer * 0.8)))
        return cls(kept_grid=tuple(reversed(grid)), max_order=order, **kw)


# --- data ----------------------------------------------------------------------------------


def passages(lm: CausalLM, split: str, n: int, n_tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` BBC News articles of the split (test: every 10th, as ``bbc_text``), each cut to its
    first ``n_tokens`` tokens; test articles in corpus order, train ones shuffled by ``seed``."""
    from engine.data.text import bbc_articles

    arts = [
        a.strip() for i, (_, a) in enumerate(bbc_articles()) if (i % 10 == 9) == (split == "test")
    ]
    order = np.arange(len(arts))
    if split != "test":
        order = np.random.default_rng(seed).permutation(len(arts))
    out = []
    for i in order:
        ids = encode(lm, arts[i])
        if len(ids) >= n_tokens:
            out.append(ids[:n_tokens])
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} {split} articles have {n_tokens} tokens")


# --- per-token, per-layer records ----------------------------------------------------------


@dataclass
class Records:
    """Per token n (N of them, every position of every passage) and layer l (L): one
    teacher-forced full-depth pass. ``logp_next`` is NaN at a passage's last position."""

    n_layer: int
    seq: np.ndarray  # [N] passage index
    pos: np.ndarray  # [N] position in the passage
    token: np.ndarray  # [N] the input token there
    top1: np.ndarray  # [N, L] logit-lens top-1
    max_prob: np.ndarray  # [N, L]
    margin: np.ndarray  # [N, L]
    saturation: np.ndarray  # [N, L] cosine of the state and the layer's input
    logp_next: np.ndarray  # [N, L] log-probability of the text's next token
    gate: np.ndarray | None = None  # [N, L] learned gate's P(top-1 is final)

    @property
    def agree(self) -> np.ndarray:
        """[N, L] the layer's top-1 is the full model's."""
        return self.top1 == self.top1[:, -1:]

    @property
    def n_sequences(self) -> int:
        return int(self.seq.max()) + 1 if self.seq.size else 0

    def scores(self, measure: str) -> np.ndarray:
        if measure not in MEASURES:
            raise ValueError(f"unknown measure {measure!r}; one of {MEASURES}")
        s = getattr(self, measure)
        if s is None:
            raise ValueError("these records have no gate scores")
        return s

    def sequence(self, i: int) -> Records:
        return self.take(self.seq == i)

    def take(self, rows: np.ndarray) -> Records:
        def sub(a):
            return None if a is None else a[rows]

        return Records(
            self.n_layer,
            *(sub(getattr(self, f)) for f in ("seq", "pos", "token", "top1", "max_prob")),
            *(sub(getattr(self, f)) for f in ("margin", "saturation", "logp_next", "gate")),
        )

    def tokens(self, i: int) -> list[int]:
        return self.token[self.seq == i].tolist()

    def to_frame(self) -> pl.DataFrame:
        """Long table, one row per (token, layer)."""
        n, layers = self.top1.shape
        cols = {
            "seq": np.repeat(self.seq, layers).astype(np.uint16),
            "pos": np.repeat(self.pos, layers).astype(np.uint16),
            "layer": np.tile(np.arange(layers), n).astype(np.uint8),
            "token": np.repeat(self.token, layers).astype(np.uint32),
            "top1": self.top1.ravel().astype(np.uint32),
        }
        for f in ("max_prob", "margin", "saturation", "logp_next", "gate"):
            a = getattr(self, f)
            if a is not None:
                cols[f] = a.ravel().astype(np.float32)
        return pl.DataFrame(cols)

    @classmethod
    def from_frame(cls, df: pl.DataFrame) -> Records:
        df = df.sort("seq", "pos", "layer")
        layers = int(df["layer"].max()) + 1
        first = df.filter(pl.col("layer") == 0)

        def grid(c):
            if c not in df.columns:
                return None
            return df[c].to_numpy().reshape(-1, layers)

        return cls(
            layers,
            first["seq"].to_numpy().astype(np.int64),
            first["pos"].to_numpy().astype(np.int64),
            first["token"].to_numpy().astype(np.int64),
            grid("top1").astype(np.int64),
            *(grid(c) for c in ("max_prob", "margin", "saturation", "logp_next", "gate")),
        )

    @classmethod
    def concat(cls, parts: Sequence[Records]) -> Records:
        def cat(f):
            a = [getattr(p, f) for p in parts]
            return None if any(x is None for x in a) else np.concatenate(a)

        fields = ("seq", "pos", "token", "top1", "max_prob", "margin", "saturation")
        return cls(parts[0].n_layer, *(cat(f) for f in (*fields, "logp_next", "gate")))


@torch.no_grad()
def sequence_records(
    lm: CausalLM, ids: Sequence[int], seq: int = 0
) -> tuple[Records, torch.Tensor]:
    """One full-depth teacher-forced pass over ``ids``: its records (no gate scores) and the
    normed states [T, L, D] (what the head reads at every layer; the gate's input)."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    n, t = lm.n_layer, len(ids_t)
    w = walk(lm, LayerCache(n), ids_t, keep_states=True)
    prev = lm.hf.model.embed_tokens(ids_t[None])[0]
    cols = {k: [] for k in ("top1", "max_prob", "margin", "saturation", "logp_next")}
    normed = []
    nxt = torch.cat([ids_t[1:], ids_t[:1]])
    for h in w.states:
        logp = torch.log_softmax(lm.logits(h), -1)
        top2 = logp.topk(2)
        p2 = top2.values.exp()
        cols["top1"].append(top2.indices[:, 0])
        cols["max_prob"].append(p2[:, 0])
        cols["margin"].append(p2[:, 0] - p2[:, 1])
        cols["saturation"].append(F.cosine_similarity(h, prev, dim=-1))
        lp = logp.gather(1, nxt[:, None])[:, 0].clone()
        lp[-1] = math.nan
        cols["logp_next"].append(lp)
        normed.append(lm.hf.model.norm(h))
        prev = h
    arr = {k: torch.stack(v, 1).numpy() for k, v in cols.items()}
    rec = Records(
        n,
        np.full(t, seq, dtype=np.int64),
        np.arange(t),
        ids_t.numpy().astype(np.int64),
        arr["top1"].astype(np.int64),
        arr["max_prob"].astype(np.float32),
        arr["margin"].astype(np.float32),
        arr["saturation"].astype(np.float32),
        arr["logp_next"].astype(np.float32),
    )
    return rec, torch.stack(normed, 1)


# --- simulated per-token early exit ---------------------------------------------------------


@dataclass(frozen=True)
class ExitOutcome:
    """Per-token exits of one (measure, threshold) over the records, and their quality."""

    measure: str
    threshold: float
    exit_layer: np.ndarray  # [N] last layer run per token (L - 1: full depth)
    n_layer: int
    agreement: float  # top-1 at the exit equal to the full model's
    perplexity: float  # of the texts' next tokens, read at each token's exit
    lazy_layers: float = math.nan  # layer runs per token that a "lazy" fill really spends

    @property
    def mean_layers(self) -> float:
        """Depth per token (the decision's cost, as CALM counts it). A "lazy" fill runs the
        layers a token skipped later, when a deeper token catches it up: ``lazy_layers``."""
        return float(self.exit_layer.mean() + 1)

    @property
    def fraction(self) -> float:
        return self.mean_layers / self.n_layer


def exit_layers(records: Records, measure: str, threshold: float, min_layer: int = 0) -> np.ndarray:
    """[N] the first layer >= ``min_layer`` whose score >= ``threshold``, else the last."""
    stop = records.scores(measure) >= threshold
    stop[:, :min_layer] = False
    return first_true(stop).astype(np.int64)


def outcome_at(
    records: Records, exits: np.ndarray, measure: str = "", threshold: float = math.nan
) -> ExitOutcome:
    """Quality of per-token exits ``exits`` [N] read from the records."""
    rows = np.arange(len(exits))
    agree = float(records.agree[rows, exits].mean())
    lp = records.logp_next[rows, exits]
    ppl = float(np.exp(-np.nanmean(lp)))
    lazy = float(lazy_computed(exits, records.seq, records.n_layer).sum(1).mean())
    return ExitOutcome(measure, float(threshold), exits, records.n_layer, agree, ppl, lazy)


def lazy_computed(exits: np.ndarray, seq: np.ndarray, n_layer: int) -> np.ndarray:
    """[N, L] bool: does layer l run at token n under a "lazy" fill by the end of its text?
    Yes if the token reached l, or any later token of the same text did (its catch-up runs
    every parked position below it). Rows of a text must be in position order."""
    reached = exits[:, None] >= np.arange(n_layer)[None, :]
    out = np.empty_like(reached)
    for s in np.unique(seq):
        r = reached[seq == s]
        out[seq == s] = np.logical_or.accumulate(r[::-1], axis=0)[::-1]
    return out


def token_oracle(records: Records) -> ExitOutcome:
    """Per token, the first layer whose top-1 is the full model's (the per-token oracle: the
    least any exit rule can spend at agreement 1; perplexity read there)."""
    return outcome_at(records, first_true(records.agree).astype(np.int64), "oracle")


def simulate_exits(
    records: Records, measure: str, threshold: float, min_layer: int = 0
) -> ExitOutcome:
    """CALM per-token early exit, simulated on the records (vectorised; ~1 ms per call).

    Why this equals a real run: with ``fill="lazy"`` (``analysis.generate(..., fill="lazy")``)
    a token that exits at layer e parks its state, and the next token that goes deeper first
    runs the parked positions through the layers it missed, so every layer's K/V cache is the
    full model's on that prefix. A token's state at layer j therefore depends only on the
    prefix, never on earlier exits, and is exactly the one the full-depth teacher-forced pass
    records; its confidence at j, the exit rule's decision and the token read at the exit are
    the records' too. (With CALM's ``"propagate"`` fill the cache above an exit is an
    approximation and a real run drifts from this simulation.) Exits here and in
    ``analysis.ExitRule`` are the same rule: first layer >= min_layer with score >= threshold.
    """
    exits = exit_layers(records, measure, threshold, min_layer)
    return outcome_at(records, exits, measure, threshold)


def thresholds_for(records: Records, measure: str, n: int = 120) -> np.ndarray:
    """A sweep dense where exits are decided: quantiles of the measure's scores below the last
    layer, packed towards the top (most scores are low; the high ones set the deep exits),
    plus one above 1 (full depth)."""
    s = records.scores(measure)[:, :-1].ravel()
    q = np.quantile(s[np.isfinite(s)], 1.0 - (1.0 - np.linspace(0.0, 1.0, n)) ** 3)
    return np.unique(np.append(q, 1.01))


# --- static plans: fixed exits and skip sets ------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A static plan: layers ``skip`` never run, and every token stops after ``exit_layer``."""

    family: str
    kept: int  # layers each token runs
    skip: tuple[int, ...] = ()
    exit_layer: int | None = None


def min_kept(family: str, n_layer: int, order: Sequence[int] = ()) -> int:
    if family == "exit_fixed":
        return 1
    if family == "skip_greedy":
        return n_layer - len(order)
    if family in SKIP_FAMILIES:
        return 2  # middle_block / evenly_spaced keep the first and the last layer
    raise ValueError(f"unknown plan family {family!r}; one of {PLAN_FAMILIES}")


def make_plan(family: str, kept: int, n_layer: int, order: Sequence[int] = ()) -> Plan:
    """The family's plan that runs ``kept`` of ``n_layer`` layers per token."""
    lo = min_kept(family, n_layer, order)
    if not lo <= kept <= n_layer:
        raise ValueError(f"{family}: keep {lo} .. {n_layer} layers, not {kept}")
    n_skip = n_layer - kept
    if family == "exit_fixed":
        return Plan(family, kept, (), None if kept == n_layer else kept - 1)
    if family == "skip_middle":
        return Plan(family, kept, A.middle_block(n_layer, n_skip))
    if family == "skip_even":
        return Plan(family, kept, A.evenly_spaced(n_layer, n_skip))
    return Plan(family, kept, tuple(sorted(int(j) for j in order[:n_skip])))


def skip_order(lm: CausalLM, ids: Sequence[int], max_order: int) -> list[int]:
    """Layers in the order ``analysis.greedy_skip_order`` removes them (least harm first)."""
    plans = A.greedy_skip_order(lm, ids, max_order)
    order: list[int] = []
    for p in plans:
        order.extend(j for j in p.skip if j not in order)
    return order


@torch.no_grad()
def plan_greedy(
    lm: CausalLM, prompt: Sequence[int], n_new: int, plan: Plan, reference: Sequence[int] = ()
) -> list[int]:
    """Greedy decoding of the truncated/skipping model the plan describes (prompt included:
    a layer the plan drops is never run, so a fixed exit is a shallower model throughout).
    With ``reference``, stops at the first token that differs from it (the oracle only asks
    whether they are equal)."""
    cache = LayerCache(lm.n_layer)
    kw = {"skip": frozenset(plan.skip), "stop_after": plan.exit_layer, "fill": "lazy"}
    w = walk(lm, cache, list(prompt), **kw)
    out = [int(w.logits[-1].argmax())]
    while len(out) < n_new:
        if reference and out[-1] != reference[len(out) - 1]:
            break
        w = walk(lm, cache, out[-1:], **kw)
        out.append(int(w.logits[-1].argmax()))
    return out


def plan_nll(
    lm: CausalLM, ids: Sequence[int], plan: Plan, reference: np.ndarray
) -> tuple[float, float]:
    """Teacher-forced (agreement with ``reference`` top-1, mean NLL) of a plan on one text."""
    q = A.evaluate_plan(lm, ids, plan.skip, plan.exit_layer, torch.as_tensor(reference))
    return q.agreement, q.nll


def fewest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """Smallest k in lo..hi with ok(k), by bisection; ok(hi) is taken as true and ok assumed
    monotone (more layers never hurt), which is why only ~log2(hi - lo) calls are made."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


# --- the per-token gate ---------------------------------------------------------------------


@dataclass
class Gate:
    """One small MLP shared by all layers (input: the normed state, the three confidences and a
    one-hot layer), predicting "this layer's top-1 is the final one"."""

    mean: np.ndarray  # [F] feature standardisation
    std: np.ndarray
    w1: np.ndarray  # [F, H]
    b1: np.ndarray
    w2: np.ndarray  # [H]
    b2: float

    def score(self, x: np.ndarray) -> np.ndarray:
        """P(top-1 is final) for features [..., F]."""
        z = (np.asarray(x, dtype=np.float32) - self.mean) / self.std
        h = np.maximum(z @ self.w1 + self.b1, 0.0)
        return 1.0 / (1.0 + np.exp(-(h @ self.w2 + self.b2)))


def gate_features(normed: torch.Tensor | np.ndarray, records: Records) -> np.ndarray:
    """[T, L, D + 3 + L]: normed state, max_prob, margin, saturation, one-hot layer."""
    x = np.asarray(normed, dtype=np.float32)
    t, layers = x.shape[:2]
    conf = np.stack([records.max_prob, records.margin, records.saturation], -1)
    onehot = np.broadcast_to(np.eye(layers, dtype=np.float32), (t, layers, layers))
    return np.concatenate([x, conf.astype(np.float32), onehot], -1)


def train_gate(
    x: np.ndarray, y: np.ndarray, hidden: int = 32, epochs: int = 300, seed: int = 0
) -> Gate:
    """Full-batch Adam on the binary cross-entropy, weight decay against the few passages."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    y = np.asarray(y, dtype=np.float32).ravel()
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
    )
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    xt, yt = torch.from_numpy((x - mean) / std), torch.from_numpy(y)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(net(xt)[:, 0], yt)
            loss.backward()
            opt.step()
    p = [t.detach().numpy().copy() for t in net.parameters()]
    return Gate(mean, std, p[0].T, p[1], p[2][0], float(p[3][0]))


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic; ties count one half)."""
    s, y = np.ravel(score), np.ravel(label).astype(bool)
    ranks = pl.Series(s).rank("average").to_numpy()
    n1, n0 = y.sum(), (~y).sum()
    if n1 == 0 or n0 == 0:
        return math.nan
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# --- curves ---------------------------------------------------------------------------------


def exit_curves(records: Records) -> pl.DataFrame:
    """Every per-token exit method, straight from the records."""
    rows = []
    n = records.n_layer
    for k in range(1, n + 1):
        o = outcome_at(records, np.full(len(records.seq), k - 1))
        rows.append(("exit_fixed", float(k), o.mean_layers, o.agreement, o.perplexity, k))
    for m in MEASURES:
        if m == "gate" and records.gate is None:
            continue
        for t in thresholds_for(records, m):
            o = simulate_exits(records, m, float(t))
            row = (f"calm_{m}", float(t), o.mean_layers, o.agreement, o.perplexity, o.lazy_layers)
            rows.append(row)
    return _curve_frame(rows, n)


CURVE_COLUMNS = ("method", "setting", "layers", "fraction", "agreement", "perplexity")


def _curve_frame(rows, n_layer: int) -> pl.DataFrame:
    """Rows (method, setting, layers, agreement, perplexity[, lazy_layers]); ``lazy_layers``
    (layer runs per token under a lazy fill, catch-ups included) equals ``layers`` for static
    plans."""
    schema = ["method", "setting", "layers", "agreement", "perplexity", "lazy_layers"]
    rows = [(*r, r[2]) if len(r) == 5 else r for r in rows]
    df = pl.DataFrame(rows, schema=schema, orient="row")
    df = df.with_columns(pl.col("lazy_layers").cast(pl.Float64))
    return df.with_columns(fraction=pl.col("layers") / n_layer).select(
        *CURVE_COLUMNS, "lazy_layers"
    )


def skip_curves(
    lm: CausalLM,
    texts: Sequence[Sequence[int]],
    records: Records,
    order: Sequence[int],
    kept_grid: Sequence[int],
    progress: Progress | None = None,
    families: Sequence[str] = SKIP_FAMILIES,
    label: str = "skip curves",
) -> tuple[pl.DataFrame, dict]:
    """Teacher-forced skip plans on every text, a step of bar ``label`` each; the
    per-(family, kept, text) NLLs are returned too (the perplexity oracle reuses them)."""
    n = lm.n_layer
    plans = [(f, k) for f in families for k in kept_grid if k >= min_kept(f, n, order)]
    work = [(f, k, i) for f, k in plans for i in range(len(texts))]
    cache = {}
    for fam, kept, i in track(work, label, progress):
        rec = records.sequence(i)
        if kept == n:  # nothing skipped: the full model, already in the records
            cache[(fam, kept, i)] = (1.0, float(-np.nanmean(rec.logp_next[:, -1])))
        else:
            plan = make_plan(fam, kept, n, order)
            cache[(fam, kept, i)] = plan_nll(lm, texts[i], plan, rec.top1[:, -1])
    rows = []
    for fam, kept in plans:
        agree, nll = zip(*(cache[(fam, kept, i)] for i in range(len(texts))), strict=True)
        # equal-length texts: the pooled means are the means of the per-text means
        rows.append((fam, float(kept), float(kept), float(np.mean(agree)), math.exp(np.mean(nll))))
    return _curve_frame(rows, n), {key: nll for key, (_, nll) in cache.items()}


def layers_for_agreement(curves: pl.DataFrame, method: str, target: float) -> float:
    """Fewest mean layers at which the method's curve reaches ``target`` agreement (NaN: never)."""
    c = curves.filter((pl.col("method") == method) & (pl.col("agreement") >= target))
    return float(c["layers"].min()) if c.height else math.nan


# --- the per-sequence oracle ----------------------------------------------------------------


def sequence_oracle(
    lm: CausalLM,
    ids: Sequence[int],
    order: Sequence[int],
    cfg: StudyConfig,
    full_nll: float,
    nll_cache: dict | None = None,
) -> dict[tuple[str, str], int]:
    """(criterion, family) -> fewest layers kept, for one passage. Greedy: the plan's greedy
    continuation of the passage's first ``prompt_tokens`` equals the full model's
    ``gen_tokens``; perplexity: the passage's teacher-forced perplexity is within
    ``ppl_tolerance`` of the full model's."""
    n = lm.n_layer
    prompt = list(ids[: cfg.prompt_tokens])
    ref = plan_greedy(lm, prompt, cfg.gen_tokens, Plan("exit_fixed", n))
    limit = full_nll + math.log1p(cfg.ppl_tolerance)
    zero = np.zeros(len(ids), dtype=np.int64)  # agreement unused here
    out = {}
    for fam in PLAN_FAMILIES:
        lo = min_kept(fam, n, order)

        def same(k, fam=fam):
            plan = make_plan(fam, k, n, order)
            return plan_greedy(lm, prompt, cfg.gen_tokens, plan, ref) == ref

        def close(k, fam=fam):
            if nll_cache is not None and (fam, k) in nll_cache:
                return nll_cache[(fam, k)] <= limit
            return plan_nll(lm, ids, make_plan(fam, k, n, order), zero)[1] <= limit

        out[("greedy", fam)] = fewest(same, lo, n)
        out[("perplexity", fam)] = fewest(close, lo, n)
    return out


@dataclass(frozen=True)
class OracleSummary:
    """Mean over passages of the fewest layers (as a fraction of all) that suffice."""

    n_layer: int
    n_sequences: int
    greedy_fraction: float  # best plan per passage, greedy continuation identical
    perplexity_fraction: float  # best plan per passage, perplexity within tolerance
    per_family: dict[str, dict[str, float]]  # criterion -> family -> mean fraction
    reference_fraction: float = GLAVAS_ORACLE_FRACTION


def summarise_oracle(table: pl.DataFrame, n_layer: int) -> OracleSummary:
    """``table``: seq, criterion, family, kept (one row per passage, criterion and family)."""
    best = table.group_by("seq", "criterion").agg(pl.col("kept").min())
    frac = {
        c: float(best.filter(pl.col("criterion") == c)["kept"].mean()) / n_layer
        for c in ORACLE_CRITERIA
    }
    means = table.group_by("criterion", "family", maintain_order=True).agg(pl.col("kept").mean())
    per: dict[str, dict[str, float]] = {c: {} for c in ORACLE_CRITERIA}
    for c, f, k in means.iter_rows():
        per[c][f] = k / n_layer
    return OracleSummary(
        n_layer, int(best["seq"].n_unique()), frac["greedy"], frac["perplexity"], per
    )


# --- building -------------------------------------------------------------------------------


def study_files(model_id: str = MODEL_ID, root: Path | None = None) -> dict[str, Path]:
    d = Path(root) if root is not None else RECORDS_DIR
    base = f"{model_id}__study"
    return {
        "card": d / f"{base}.json",
        "records": d / f"{base}_records.parquet",
        "curves": d / f"{base}_curves.parquet",
        "oracle": d / f"{base}_oracle.parquet",
    }


@dataclass
class Built:
    records: Records
    curves: pl.DataFrame
    oracle: pl.DataFrame
    order: list[int]
    gate_metrics: dict
    timings: dict = field(default_factory=dict)


def _publish(path: Path, write) -> None:
    """Write beside ``path`` and rename: the other process never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _write_skips(ck: Path, name: str, curves: pl.DataFrame, nll: dict) -> None:
    _publish(ck / f"{name}_curves.parquet", curves.write_parquet)
    rows = [(f, k, s, v) for (f, k, s), v in nll.items()]
    frame = pl.DataFrame(rows, schema=["family", "kept", "seq", "nll"], orient="row")
    _publish(ck / f"{name}_nll.parquet", frame.write_parquet)  # last: the stage is complete


def _read_skips(ck: Path, name: str) -> tuple[pl.DataFrame, dict]:
    nll = pl.read_parquet(ck / f"{name}_nll.parquet")
    return pl.read_parquet(ck / f"{name}_curves.parquet"), {
        (f, k, s): v for f, k, s, v in nll.iter_rows()
    }


def _oracle_rows(lm, cfg, evals, records, order, nll_cache, i) -> list[tuple]:
    n = lm.n_layer
    rec = records.sequence(i)
    full_nll = float(-np.nanmean(rec.logp_next[:, -1]))
    cached = {(f, k): v for (f, k, s), v in nll_cache.items() if s == i}
    for k in range(1, n + 1):  # fixed exits: every layer's NLL is in the records
        cached[("exit_fixed", k)] = float(-np.nanmean(rec.logp_next[:, k - 1]))
    got = sequence_oracle(lm, evals[i], order, cfg, full_nll, cached)
    return [(i, crit, fam, kept) for (crit, fam), kept in got.items()]


def build_study(
    lm: CausalLM,
    cfg: StudyConfig,
    evals: Sequence[Sequence[int]] | None = None,
    calib: Sequence[Sequence[int]] | None = None,
    checkpoint: Path | None = None,
    oracle_helper: bool = False,
    progress: Progress | None = None,
) -> Built | None:
    """Every measurement of the study (see the module docstring), a bar per stage to
    ``progress``. The texts default to BBC passages (``passages``); all of one length, so
    pooled means are means of per-text means.

    ``checkpoint``: a folder where each finished stage is kept (records, skip order, skip
    curves, each passage's oracle), so a stopped build resumes there. ``oracle_helper``: a
    second process on the same checkpoint that waits for the skip order and works through the
    oracle from the last passage down (the two skip each other's finished passages)."""
    n = lm.n_layer
    t0 = time.perf_counter()
    if evals is None:
        evals = passages(lm, "test", cfg.n_eval, cfg.n_tokens)
    if calib is None:
        calib = passages(lm, "train", cfg.n_calib, cfg.n_tokens, cfg.seed)
    if len({len(t) for t in evals}) != 1:
        raise ValueError("the evaluation texts must all have one length")
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        ck.mkdir(parents=True, exist_ok=True)
    cfg_n = len(evals)
    if oracle_helper:
        if ck is None:
            raise ValueError("an oracle helper needs the checkpoint folder")
        while not (ck / "stage.json").is_file():
            time.sleep(10)
        records = Records.from_frame(pl.read_parquet(ck / "records.parquet"))
        if not (ck / "skip_part.started").is_file():  # while the main process ranks layers
            (ck / "skip_part.started").touch()
            part, nll = skip_curves(lm, evals, records, (), cfg.kept_grid, None, SKIP_FAMILIES[:2])
            _write_skips(ck, "skip_part", part, nll)
        while not (ck / "order.json").is_file():
            time.sleep(10)
        order = json.loads((ck / "order.json").read_text())["order"]
        for i in track(range(cfg_n - 1, -1, -1), "oracle helper (passages)", progress):
            f = ck / f"oracle_{i}.json"
            if not f.is_file() and not (ck / f"oracle_{i}.started").is_file():
                (ck / f"oracle_{i}.started").touch()
                got = _oracle_rows(lm, cfg, evals, records, order, {}, i)
                _publish(f, lambda p, got=got: p.write_text(json.dumps(got)))
        return None
    order_ids = [t for c in calib[: cfg.n_order] for t in c[: cfg.order_tokens]]
    order_steps = sum(n - i for i in range(cfg.max_order))
    timings: dict = {}

    if ck is not None and (ck / "stage.json").is_file():
        stage = json.loads((ck / "stage.json").read_text())
        records = Records.from_frame(pl.read_parquet(ck / "records.parquet"))
        gate_metrics, timings = stage["gate"], stage["timings"]
    else:
        # calibration: records + states -> the gate
        feats, labels, cal_recs = [], [], []
        for i, ids in enumerate(track(calib, "study: calibration passages", progress)):
            r, normed = sequence_records(lm, ids, i)
            feats.append(gate_features(normed, r))
            labels.append(r.agree)
            cal_recs.append(r)
        x, y = np.concatenate(feats), np.concatenate(labels)
        del feats
        gate = train_gate(x, y, cfg.gate_hidden, cfg.gate_epochs, cfg.seed)
        train_auc = auc(gate.score(x), y)
        del x
        timings["calibration_s"] = time.perf_counter() - t0

        # evaluation records, gate scored
        parts = []
        for i, ids in enumerate(track(evals, "study: evaluation passages", progress)):
            r, normed = sequence_records(lm, ids, i)
            r.gate = gate.score(gate_features(normed, r)).astype(np.float32)
            parts.append(r)
        records = Records.concat(parts)
        timings["records_s"] = time.perf_counter() - t0 - timings["calibration_s"]
        cal = Records.concat(cal_recs)
        ev_auc = {m: auc(records.scores(m)[:, :-1], records.agree[:, :-1]) for m in MEASURES}
        gate_metrics = {
            "train_auc": train_auc,
            "eval_auc": ev_auc,
            "calibration_auc": {
                m: auc(cal.scores(m)[:, :-1], cal.agree[:, :-1]) for m in A.MEASURES
            },
        }
        if ck is not None:
            records.to_frame().write_parquet(ck / "records.parquet")
            stage = json.dumps({"gate": gate_metrics, "timings": timings})
            _publish(ck / "stage.json", lambda p: p.write_text(stage))

    # the greedy skip order, on two calibration passages joined
    if ck is not None and (ck / "order.json").is_file():
        order = json.loads((ck / "order.json").read_text())["order"]
        timings["skip_order_s"] = json.loads((ck / "order.json").read_text())["seconds"]
    else:
        t = time.perf_counter()
        label = f"study: greedy skip order ({order_steps} plan evaluations)"
        for _ in track([None], label, progress):  # one step: the time it took, not a rate
            order = skip_order(lm, order_ids, cfg.max_order)
        timings["skip_order_s"] = time.perf_counter() - t
        if ck is not None:
            done = json.dumps({"order": order, "seconds": timings["skip_order_s"]})
            _publish(ck / "order.json", lambda p: p.write_text(done))

    if ck is not None and (ck / "skip_nll.parquet").is_file():
        skips, nll_cache = _read_skips(ck, "skip")
    else:
        t = time.perf_counter()
        label = "study: skip curves (plans x passages)"
        if ck is not None and (ck / "skip_part.started").is_file():  # a helper runs two
            skips, nll_cache = skip_curves(
                lm, evals, records, order, cfg.kept_grid, progress, SKIP_FAMILIES[2:], label
            )
            while not (ck / "skip_part_nll.parquet").is_file():
                time.sleep(5)
            part, nll = _read_skips(ck, "skip_part")
            skips, nll_cache = pl.concat([part, skips]), {**nll, **nll_cache}
        else:
            skips, nll_cache = skip_curves(
                lm, evals, records, order, cfg.kept_grid, progress, label=label
            )
        timings["skip_curves_s"] = time.perf_counter() - t
        if ck is not None:
            _write_skips(ck, "skip", skips, nll_cache)
    curves = pl.concat([exit_curves(records), skips])

    t = time.perf_counter()
    rows = []
    for i in track(range(cfg_n), "study: oracle (passages)", progress):
        f = None if ck is None else ck / f"oracle_{i}.json"
        if f is not None and (ck / f"oracle_{i}.started").is_file():
            while not f.is_file():  # the helper has it
                time.sleep(5)
        if f is not None and f.is_file():
            got = [tuple(r) for r in json.loads(f.read_text())]
        else:
            if f is not None:
                (ck / f"oracle_{i}.started").touch()
            got = _oracle_rows(lm, cfg, evals, records, order, nll_cache, i)
            if f is not None:
                _publish(f, lambda p, got=got: p.write_text(json.dumps(got)))
        rows.extend(got)
    oracle = pl.DataFrame(rows, schema=["seq", "criterion", "family", "kept"], orient="row")
    timings["oracle_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return Built(records, curves, oracle, order, gate_metrics, timings)


def interpolate_at(curves: pl.DataFrame, method: str, layers: float) -> dict:
    """The method's agreement and perplexity at ``layers`` mean layers, interpolated linearly
    between its two nearest points (perplexity in log space)."""
    c = curves.filter(pl.col("method") == method).sort("layers")
    x = c["layers"].to_numpy()
    agree = np.interp(layers, x, c["agreement"].to_numpy())
    ppl = np.exp(np.interp(layers, x, np.log(c["perplexity"].to_numpy())))
    return {"layers": float(layers), "agreement": float(agree), "perplexity": float(ppl)}


def summary_numbers(curves: pl.DataFrame, oracle: OracleSummary, n_layer: int) -> dict:
    """The headline numbers: every method's quality at 27 / 24 / 18 layers (interpolated on
    its curve), layers needed for 90 / 95 / 99 % agreement, and the oracle."""
    methods = curves["method"].unique(maintain_order=True).to_list()
    at = {
        m: {
            str(k): {x: round(v, 4) for x, v in interpolate_at(curves, m, k).items()}
            for k in (27, 24, 18)
        }
        for m in methods
    }
    need = {
        m: {str(t): layers_for_agreement(curves, m, t) for t in (0.9, 0.95, 0.99)} for m in methods
    }
    return {"at_layers": at, "layers_for_agreement": need, "oracle": asdict(oracle)}


def refresh_study(root: Path | None = None, model_id: str = MODEL_ID) -> dict:
    """Re-derive the exit curves and the summary from the stored records (no model): the skip
    curves and the oracle are kept; the card says when and how."""
    files = study_files(model_id, root)
    card = json.loads(files["card"].read_text())
    records = Records.from_frame(pl.read_parquet(files["records"]))
    old = pl.read_parquet(files["curves"])
    skips = old.filter(pl.col("method").is_in(SKIP_FAMILIES))
    if "lazy_layers" not in skips.columns:  # built before the column existed
        skips = skips.with_columns(lazy_layers=pl.col("layers"))
    curves = pl.concat([exit_curves(records), skips])
    curves.write_parquet(files["curves"])
    oracle = summarise_oracle(pl.read_parquet(files["oracle"]), records.n_layer)
    card["summary"] = summary_numbers(curves, oracle, records.n_layer)
    card["refreshed"] = {
        "command": "python -m engine.families.hf_causal_lm.study --refresh",
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    files["card"].write_text(json.dumps(card, indent=2, allow_nan=True) + "\n")
    return card


def save_study(
    built: Built, cfg: StudyConfig, meta: dict, model_id: str = MODEL_ID, root: Path | None = None
) -> dict:
    files = study_files(model_id, root)
    files["card"].parent.mkdir(parents=True, exist_ok=True)
    built.records.to_frame().write_parquet(
        files["records"], compression="zstd", compression_level=19
    )
    built.curves.write_parquet(files["curves"])
    built.oracle.write_parquet(files["oracle"])
    n = built.records.n_layer
    oracle = summarise_oracle(built.oracle, n)
    card = {
        "model_id": model_id,
        "study": "layer skipping versus early exit (Glavas et al. 2024)",
        **meta,
        "config": asdict(cfg),
        "n_layer": n,
        "skip_order": built.order,
        "gate": built.gate_metrics,
        "timings_s": {k: round(v, 1) for k, v in built.timings.items()},
        "summary": summary_numbers(built.curves, oracle, n),
        "files": {k: p.name for k, p in files.items() if k != "card"},
    }
    files["card"].write_text(json.dumps(card, indent=2, allow_nan=True) + "\n")
    return card


# --- loading (the page's entry point) -------------------------------------------------------


@dataclass
class Study:
    """The stored study. ``curves``: method, setting (exit layer + 1 / threshold / layers kept),
    layers (mean layers per token), fraction (of ``n_layer``), agreement, perplexity,
    lazy_layers (what a lazy fill really runs per token, catch-ups included);
    ``records`` for the slider (``simulate``); ``oracle`` summary and its per-passage table."""

    card: dict
    curves: pl.DataFrame
    records: Records
    oracle: OracleSummary
    oracle_table: pl.DataFrame

    @property
    def n_layer(self) -> int:
        return self.records.n_layer

    @property
    def config(self) -> StudyConfig:
        c = dict(self.card["config"])
        c["kept_grid"] = tuple(c["kept_grid"])
        return StudyConfig(**c)

    @property
    def skip_order(self) -> list[int]:
        return list(self.card["skip_order"])

    def simulate(self, measure: str, threshold: float) -> ExitOutcome:
        """Per-token exits for a slider position (milliseconds)."""
        return simulate_exits(self.records, measure, threshold)

    def curve(self, method: str) -> pl.DataFrame:
        if method not in METHOD_LABELS:
            raise ValueError(f"unknown method {method!r}; one of {tuple(METHOD_LABELS)}")
        return self.curves.filter(pl.col("method") == method).sort("layers")


def study_card(model_id: str) -> Path:
    """A bundled model's study (assets), else a user model's (beside its traces)."""
    bundled = study_files(model_id)["card"]
    user = study_files(model_id, user_traces_dir())["card"]
    return user if not bundled.is_file() and user.is_file() else bundled


def load_study(card_or_path=None) -> Study:
    """A model card (its ``model_id``), a model id, the study's JSON card or a folder holding
    it; default: SmolLM2's shipped study."""
    if card_or_path is None:
        path = study_files()["card"]
    elif hasattr(card_or_path, "model_id"):
        path = study_card(card_or_path.model_id)
    else:
        p = Path(card_or_path)
        if p.is_dir():
            path = study_files(root=p)["card"]
        elif p.suffix == ".json":
            path = p
        else:
            path = study_card(str(card_or_path))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no study; build it with python -m engine.families.hf_causal_lm.study"
        )
    card = json.loads(path.read_text())
    d = path.parent
    records = Records.from_frame(pl.read_parquet(d / card["files"]["records"]))
    table = pl.read_parquet(d / card["files"]["oracle"])
    return Study(
        card,
        pl.read_parquet(d / card["files"]["curves"]),
        records,
        summarise_oracle(table, records.n_layer),
        table,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=StudyConfig.n_eval, help="evaluation passages")
    ap.add_argument("--tokens", type=int, default=StudyConfig.n_tokens, help="tokens per passage")
    ap.add_argument("--calibration", type=int, default=StudyConfig.n_calib)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=StudyConfig.seed)
    ap.add_argument(
        "--model",
        default=MODEL_ID,
        help="a decoder's model id (default: the bundled SmolLM2; or one added with "
        "python -m engine.byo hf, whose study is kept beside its traces)",
    )
    ap.add_argument("--out", type=Path, help="folder for the four files (default: see --model)")
    ap.add_argument("--checkpoint", type=Path, help="keep finished stages here (resumable)")
    ap.add_argument(
        "--oracle-helper", action="store_true", help="second process: oracle passages only"
    )
    ap.add_argument(
        "--refresh", action="store_true", help="re-derive exit curves + summary from the records"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    from engine import families
    from engine.registry import get_card

    card = get_card(args.model)
    out = args.out or (user_traces_dir() if card.user else RECORDS_DIR)
    if args.refresh:
        print(json.dumps(refresh_study(out, args.model)["summary"]["at_layers"], indent=1))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    lm = families.load_model(args.model)
    load_s = time.perf_counter() - t
    cfg = StudyConfig.for_depth(
        lm.n_layer,
        n_eval=args.sequences,
        n_tokens=args.tokens,
        n_calib=args.calibration,
        seed=args.seed,
    )
    built = build_study(
        lm,
        cfg,
        checkpoint=args.checkpoint,
        oracle_helper=args.oracle_helper,
        progress=terminal(args.quiet),
    )
    if built is None:
        return 0
    built.timings["load_s"] = load_s
    meta = {
        "command": "python -m engine.families.hf_causal_lm.study "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_time_s": round(time.perf_counter() - t, 1),
        "seed": args.seed,
        "threads": args.threads,
        "source": lm.source.rsplit("/", 1)[-1],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card = save_study(built, cfg, meta, args.model, root=out)
    print(json.dumps({k: card[k] for k in ("wall_time_s", "gate", "timings_s")}, indent=1))
    print(json.dumps(card["summary"]["oracle"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
