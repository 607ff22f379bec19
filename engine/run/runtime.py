"""Real early exit: run a multi-exit model under a policy and stop computing for inputs that exit.

The policies in ``engine.core.policies`` are evaluated on cached traces, where every sample went
through every exit. This module runs the model for real: after each exit the samples the policy
lets go are written to the output and only the rest continue (*batch compaction*), so later
stages never see them and their FLOPs are never spent.

Model contract (``engine.families.multi_exit_cnn.model``, ``engine.families.cascade.model``): ``model.stages``
and ``model.heads`` are ``nn.ModuleList`` of equal length K; stage k maps h_{k-1} -> h_k
(h_{-1} = the input x [B, *input_shape]: 1×28×28 for the bundled image models, the model's
``input_shape`` attribute otherwise, see ``engine.run.exits.model_input_shape``), head k maps
h_k -> logits [B, C].

Backends:
- ``"torch"``: PyTorch eager on ``device`` (CUDA when present, else CPU).
- ``"torch_opt"``: the same with batch norm folded into the convolutions, channels_last
  (``engine.run.optimize.RUNTIME_VARIANT``): the same decisions up to float rounding, not
  bit-for-bit (agreement with the traces measured in bench/README.md and tests/test_optimize.py).
- ``"onnx"``: every stage and head exported to ONNX (``engine.run.onnx_export``) and run as a chain of
  ONNX Runtime sessions, float32.
- ``"onnx_int8"``: the same chain statically quantised to int8 (``onnx_export.Int8Scheme``, calibrated).
- ``"quee"``: QuEE-style three-way choice at every exit (Regol, Chataoui, Coates): a sample the
  policy stops *exits*; one it does not stop but whose max softmax probability is at least
  ``quee_band`` (confident, not confident enough) *continues in int8* for all remaining stages;
  the rest *continue in float32*. Float and int8 samples run as two compacted groups through the
  float and int8 ONNX chains. ``RuntimeResult.int8_from`` says where each sample switched.
  With ``quee_choice`` (``engine.core.quee.Choice``) the learned choice replaces the policy
  and the band: predicted accuracy gains decide exit / int8 / float per sample, exactly as in
  the simulation over the QuEE records.

Decisions are bit-for-bit those of the cached trace: probabilities are the float32 softmax of
the logits (computed by torch on the CPU whatever the backend, as the trace builders do), and
the decision is ``engine.core.policies.stop_mask`` itself, the function the traces use. Every
running sample carries its probabilities at the exits it has passed (``_Group.seen``, rows
moved along with its activations through compaction), so history-dependent rules (PABEE's
patience) see what they would see in the trace. The FLOP table is ``engine.run.exits``'.

Batch-size invariance. Compacted batches shrink, and BLAS picks different kernels (a different
summation order) for matrix products with few rows: measured here, ``nn.Linear`` on fewer than 16
rows and a convolution on 1 row differ from the batch-256 result by ~1e-7, enough to flip a
decision whose confidence sits on the threshold. So any compacted batch with fewer than
``min_rows`` rows (default 16) is padded with copies of its first row before each stage and
head, and the padding is dropped after; with it every sample is computed with the same kernels
as in the trace (built in batches of 256; its last batch has 16 rows). The padding's FLOPs are
reported separately (``padded_flops``), not hidden. ``min_rows=1`` turns it off (what
``bench/early_exit_speedup.py`` does at batch size 1, where padding would multiply the work).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine.core.costs import default_device
from engine.core.policies import Policy, PolicyError, stop_mask
from engine.core.trace import max_prob_of
from engine.run.exits import check_contract, exit_costs, model_input_shape

BACKENDS = ("torch", "onnx", "onnx_int8", "quee", "torch_opt")
DEFAULT_MIN_ROWS = 16
DEFAULT_QUEE_BAND = 0.5


# --- result ----------------------------------------------------------------------------------


@dataclass
class RuntimeResult:
    """What a real early-exit run produced, per sample (N) and per batch."""

    pred: np.ndarray  # [N] int64 class predicted at the exit taken
    exit: np.ndarray  # [N] int64 exit taken
    probs: np.ndarray  # [N, C] float32 probabilities at the exit taken
    flops: (
        np.ndarray
    )  # [N] float64 FLOPs actually spent on the sample (cumulative cost of its exit)
    batch_ms: list[float]  # wall-clock of each batch, decisions and bookkeeping included
    backend: str
    int8_from: np.ndarray  # [N] int64 first stage run in int8; K = never (all float32)
    batch_size: int = 256
    min_rows: int = DEFAULT_MIN_ROWS
    padded_flops: float = 0.0  # FLOPs spent on padding rows (see module docstring)
    stage_rows: list[int] = field(default_factory=list)  # real rows each stage processed

    @property
    def total_ms(self) -> float:
        return float(sum(self.batch_ms))

    @property
    def num_exits(self) -> int:
        return len(self.stage_rows)

    def precision(self) -> np.ndarray:
        """[N] str: "float32", "int8", or "float32→int8@k" (switched to int8 at stage k)."""
        k = self.num_exits
        out = np.empty(len(self.pred), dtype=object)
        for i, (s, e) in enumerate(zip(self.int8_from, self.exit, strict=True)):
            if s >= k or s > e:
                out[i] = "float32"
            elif s == 0:
                out[i] = "int8"
            else:
                out[i] = f"float32→int8@{s}"
        return out


# --- per-backend execution ----------------------------------------------------------------------


class _TorchChain:
    """Stages and heads as torch modules; activations are tensors on ``device``."""

    precision = "float32"

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.stages, self.heads = model.stages, model.heads
        self.channels_last = getattr(model, "channels_last", False)  # optimize.TorchStages

    def start(self, x: torch.Tensor):
        x = x.to(self.device, torch.float32)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def stage(self, k: int, h):
        return self.stages[k](h)

    def head(self, k: int, h) -> torch.Tensor:
        return self.heads[k](h).float().cpu()

    def rows(self, h) -> int:
        return h.shape[0]

    def take(self, h, idx: np.ndarray):
        idx = torch.as_tensor(idx, device=h.device)
        if self.channels_last and h.dim() == 4:  # rows of the NHWC view: stays channels_last
            return h.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
        return h.index_select(0, idx)

    def pad(self, h, n: int):
        return torch.cat([h, h[:1].expand(n - h.shape[0], *h.shape[1:])])

    def concat(self, a, b):
        return torch.cat([a, b])

    def to_numpy(self, h) -> np.ndarray:
        return h.cpu().numpy()


class _OnnxChain:
    """A chain of ONNX Runtime sessions; activations are float32 numpy arrays."""

    def __init__(self, sessions, precision: str):
        self.sessions = sessions
        self.precision = precision

    def start(self, x: torch.Tensor):
        return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)

    def stage(self, k: int, h):
        return self.sessions.stage(k, h)

    def head(self, k: int, h) -> torch.Tensor:
        return torch.from_numpy(self.sessions.head(k, h))

    def rows(self, h) -> int:
        return h.shape[0]

    def take(self, h, idx: np.ndarray):
        return np.ascontiguousarray(h[idx])

    def pad(self, h, n: int):
        return np.concatenate([h, np.repeat(h[:1], n - h.shape[0], axis=0)])

    def concat(self, a, b):
        return np.concatenate([a, b])

    def to_numpy(self, h) -> np.ndarray:
        return h


@dataclass
class _Group:
    """Samples of one batch still running, in one precision: activations and exits seen so far."""

    chain: object
    h: object
    idx: np.ndarray  # positions in the batch
    seen: np.ndarray | None  # [m, K, C] float32 probabilities at the exits passed, zeros after

    def rows(self, sel: np.ndarray, h) -> _Group:
        """The samples ``sel`` of this group, with activations ``h`` (already taken)."""
        return _Group(self.chain, h, self.idx[sel], self.seen[sel])


def _quee_actions(
    choice, g: _Group, int8_chain, k: int, int8_from: np.ndarray
) -> np.ndarray | None:
    """The learned QuEE choice's actions (0 exit, 1 int8, 2 float) for group ``g`` at exit k,
    or None without one. Float32 samples are decided by ``choice.actions`` on the exits they
    have passed, as in the simulation; an int8 sample exits at the target the choice gave it
    when it switched (recomputed from the float32 exits it had passed then)."""
    if choice is None:
        return None
    if g.chain is not int8_chain:
        return choice.actions(g.seen[:, : k + 1], k)
    act = np.full(g.idx.size, 2, dtype=np.int64)
    start = int8_from  # [m] first int8 stage of each sample of the group
    for s in np.unique(start):
        rows = np.flatnonzero(start == s)
        act[rows[choice.int8_target(g.seen[rows][:, :s], s - 1) == k]] = 0
    return act


def softmax32(logits: torch.Tensor) -> np.ndarray:
    """float32 probabilities, computed on the CPU exactly as the trace builders do."""
    return torch.softmax(logits.float().cpu(), dim=-1).numpy()


# --- the runner --------------------------------------------------------------------------------


class EarlyExitRunner:
    """Holds what a backend needs (model on device, ONNX sessions, FLOP table) across runs.

    Build once and call ``run`` many times; ``engine.run.runtime.run`` is the one-shot form.
    ``calibration`` (float input batch) calibrates the int8 graphs; by default the first 256
    rows of the first batch run are used.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: str = "torch",
        device: torch.device | str | None = None,
        threads: int | None = None,
        model_id: str | None = None,
        calibration: torch.Tensor | None = None,
        input_shape: tuple[int, ...] | None = None,
        progress=None,  # engine.core.progress: the first ONNX export / int8 quantisation
    ):
        self.progress = progress
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        check_contract(model)
        if model.training:
            raise ValueError("put the model in eval mode (model.eval()) before running it")
        self.model = model
        self.backend = backend
        self.threads = threads
        self.model_id = model_id
        self.calibration = calibration
        self.input_shape = tuple(input_shape or model_input_shape(model))
        self.costs = exit_costs(model, self.input_shape)
        self.num_exits = len(model.stages)
        self.device = torch.device(device) if device is not None else default_device()
        if backend not in ("torch", "torch_opt"):
            self.device = torch.device("cpu")
        self._float: object | None = None
        self._int8: object | None = None
        if backend == "torch":
            self._float = _TorchChain(self._model_on(self.device), self.device)
        elif backend == "torch_opt":
            from engine.run.optimize import RUNTIME_VARIANT, torch_stages

            stages = torch_stages(self._model_on(self.device), RUNTIME_VARIANT)
            self._float = _TorchChain(stages, self.device)

    def _model_on(self, device: torch.device) -> nn.Module:
        """The model on ``device``; a moved copy, so a cached (shared) model is never mutated."""
        p = next(self.model.parameters(), None)
        if p is None or p.device == device:
            return self.model
        return copy.deepcopy(self.model).to(device)

    def _onnx(self, int8: bool, x: torch.Tensor):
        from engine.run.onnx_export import OnnxSessions, export_chain, quantize_chain

        chain = export_chain(self.model, self.input_shape, self.model_id, progress=self.progress)
        if not int8:
            if self._float is None:
                self._float = _OnnxChain(OnnxSessions(chain, self.threads), "float32")
            return self._float
        if self._int8 is None:
            calib = self.calibration if self.calibration is not None else x[:256]
            q = quantize_chain(
                self.model, chain, calib.detach().cpu().float(), progress=self.progress
            )
            self._int8 = _OnnxChain(OnnxSessions(q, self.threads), "int8")
        return self._int8

    def _chains(self, x: torch.Tensor):
        """(chain new samples start in, int8 chain or None)."""
        if self.backend in ("torch", "torch_opt"):
            return self._float, None
        if self.backend == "onnx":
            return self._onnx(False, x), None
        if self.backend == "onnx_int8":
            return self._onnx(True, x), None
        return self._onnx(False, x), self._onnx(True, x)

    def _gates(self, policy: Policy):
        """The model's jointly trained gates when ``policy`` is a gate policy, else None.

        Exit k's score is computed live from the probabilities of exits k-1 and k
        (``JointGates.score_at``, what the trace's column k is), so the decision is the trace's."""
        if policy.kind != "gate":
            return None
        gates = getattr(self.model, "gates", None)
        if gates is None or not hasattr(gates, "score_at"):
            raise PolicyError(
                "this model carries no learned gates (only a JEI model does, e.g. "
                "fashion_multi_exit_cnn_jei); use a confidence policy"
            )
        return gates

    # ---------------------------------------------------------------------------------------
    def run(
        self,
        x: torch.Tensor,
        policy: Policy,
        batch_size: int = 256,
        min_rows: int = DEFAULT_MIN_ROWS,
        quee_band: float = DEFAULT_QUEE_BAND,
        quee_choice=None,
    ) -> RuntimeResult:
        """Run ``x`` [N, *input_shape] under ``policy``, with batch compaction after every exit.

        ``quee_choice`` (backend "quee"; an ``engine.core.quee.Choice``) replaces the policy and
        the band by the learned three-way choice: ``quee_choice.actions(seen, k)`` decides exit /
        int8 / float for the float32 samples, and an int8 sample exits at the int8 exit the
        choice picked for it (``quee_choice.int8_target``); ``policy`` is not consulted.
        """
        if quee_choice is not None and self.backend != "quee":
            raise ValueError("a learned QuEE choice runs on the 'quee' backend")
        if batch_size < 1 or min_rows < 1:
            raise ValueError("batch_size and min_rows must be at least 1")
        gates = self._gates(policy)
        x = torch.as_tensor(x)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"inputs of shape {tuple(x.shape[1:])}; this model takes {self.input_shape}"
            )
        n, k_count = x.shape[0], self.num_exits
        start_chain, int8_chain = self._chains(x)
        if self.backend == "onnx_int8":
            int8_from = np.zeros(n, dtype=np.int64)
        else:
            int8_from = np.full(n, k_count, dtype=np.int64)
        pred = np.zeros(n, dtype=np.int64)
        exits = np.zeros(n, dtype=np.int64)
        probs_out: np.ndarray | None = None
        batch_ms: list[float] = []
        stage_rows = [0] * k_count
        padded = 0.0
        cum = self.costs.cumulative

        with torch.inference_mode():
            for b0 in range(0, n, batch_size):
                t0 = time.perf_counter()
                xb = x[b0 : b0 + batch_size]
                rows = xb.shape[0]
                groups = [_Group(start_chain, start_chain.start(xb), np.arange(rows), None)]
                for k in range(k_count):
                    next_groups: list[_Group] = []
                    moved: list[_Group] = []
                    for g in groups:
                        m = g.idx.size
                        if m == 0:
                            continue
                        stage_rows[k] += m
                        h = g.h
                        if m < min_rows:
                            h = g.chain.pad(h, min_rows)
                            padded += (min_rows - m) * (self.costs.stage[k] + self.costs.head[k])
                        h = g.chain.stage(k, h)
                        p = softmax32(g.chain.head(k, h))[:m]
                        h_real = h if m == g.chain.rows(h) else g.chain.take(h, np.arange(m))
                        if probs_out is None:
                            probs_out = np.zeros((n, p.shape[1]), dtype=np.float32)
                        if g.seen is None:
                            g.seen = np.zeros((m, k_count, p.shape[1]), dtype=np.float32)
                        g.seen[:, k] = p
                        # the decision: the traces' own rule, on exits 0..k (the rest are zeros)
                        act = _quee_actions(quee_choice, g, int8_chain, k, int8_from[b0 + g.idx])
                        if act is None:
                            live = None
                            if gates is not None:  # column k is all stop_mask reads at exit k
                                live = np.zeros(g.seen.shape[:2], dtype=np.float32)
                                live[:, k] = gates.score_at(g.seen, k)
                            stop = stop_mask(policy, g.seen, live)[:, k] | (k == k_count - 1)
                        else:
                            stop = (act == 0) | (k == k_count - 1)
                        cur = p.argmax(axis=-1)
                        done = b0 + g.idx[stop]
                        pred[done] = cur[stop]
                        exits[done] = k
                        probs_out[done] = p[stop]
                        if stop.all():
                            continue
                        keep = np.flatnonzero(~stop)
                        to_int8 = np.zeros(keep.size, dtype=bool)
                        if act is not None:
                            to_int8 = act[keep] == 1
                        elif int8_chain is not None and g.chain is not int8_chain:
                            to_int8 = max_prob_of(p[keep]) >= quee_band
                        stay = keep[~to_int8]
                        if stay.size:
                            hs = h_real if stay.size == m else g.chain.take(h_real, stay)
                            next_groups.append(g.rows(stay, hs))
                        go = keep[to_int8]
                        if go.size:
                            int8_from[b0 + g.idx[go]] = k + 1
                            moved.append(g.rows(go, g.chain.take(h_real, go)))
                    if moved:
                        # samples switching precision join the int8 group for the next stage
                        parts = [g for g in next_groups if g.chain is int8_chain] + moved
                        next_groups = [g for g in next_groups if g.chain is not int8_chain]
                        hs = parts[0].h
                        for part in parts[1:]:
                            hs = int8_chain.concat(hs, part.h)
                        next_groups.append(
                            _Group(
                                int8_chain,
                                hs,
                                np.concatenate([q.idx for q in parts]),
                                np.concatenate([q.seen for q in parts]),
                            )
                        )
                    groups = next_groups
                    if not groups:
                        break
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                batch_ms.append((time.perf_counter() - t0) * 1e3)

        assert probs_out is not None
        return RuntimeResult(
            pred=pred,
            exit=exits,
            probs=probs_out,
            flops=cum[exits].astype(np.float64),
            batch_ms=batch_ms,
            backend=self.backend,
            int8_from=int8_from,
            batch_size=batch_size,
            min_rows=min_rows,
            padded_flops=float(padded),
            stage_rows=stage_rows,
        )

    def run_full(self, x: torch.Tensor, batch_size: int = 256) -> FullRun:
        """The baseline: every stage and head on every sample, no decisions, no compaction.

        For "quee" the float chain runs (QuEE's full model is the float one).
        """
        x = torch.as_tensor(x)
        chain = self._chains(x)[0]
        outs, batch_ms = [], []
        stage_ms = np.zeros(self.num_exits)
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            for b0 in range(0, x.shape[0], batch_size):
                t0 = time.perf_counter()
                h = chain.start(x[b0 : b0 + batch_size])
                for k in range(self.num_exits):
                    ts = time.perf_counter()
                    h = chain.stage(k, h)
                    logits = chain.head(k, h)
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    stage_ms[k] += (time.perf_counter() - ts) * 1e3
                batch_ms.append((time.perf_counter() - t0) * 1e3)
                outs.append(logits.numpy())
        return FullRun(np.concatenate(outs), batch_ms, stage_ms)


@dataclass
class FullRun:
    """The full model on every sample: last-exit logits, per-batch and per-stage milliseconds."""

    logits: np.ndarray  # [N, C]
    batch_ms: list[float]
    stage_ms: np.ndarray  # [K] total over batches, stage k plus head k

    @property
    def total_ms(self) -> float:
        return float(sum(self.batch_ms))


def run(
    model: nn.Module,
    x: torch.Tensor,
    policy: Policy,
    backend: str = "torch",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    **kwargs,
) -> RuntimeResult:
    """One-shot early-exit run; see ``EarlyExitRunner`` for the keyword arguments
    (threads, model_id, calibration, input_shape; and min_rows, quee_band for the run)."""
    run_kw = {k: kwargs.pop(k) for k in ("min_rows", "quee_band", "quee_choice") if k in kwargs}
    runner = EarlyExitRunner(model, backend, device, **kwargs)
    return runner.run(x, policy, batch_size=batch_size, **run_kw)
