"""Build a trace on Ray: the model held once per worker, the split sharded in index-ordered blocks.

``python -m engine.build MODEL --ray`` starts a local Ray instance on this machine (``--workers``
actors); ``--ray ADDRESS`` joins a running cluster. Ray Data maps the blocks over an actor pool
(``map_batches`` with ``ActorPoolStrategy``): each actor loads the model once, SHA-checked, as
the single-process build does (``families.load_model``), runs ``run_exits`` on its blocks and
writes every block as one Parquet shard; the driver gathers the shards in sample order and
writes the trace with the single-process code (``trace_from_outputs``, ``Trace.write_parquet``).

What is identical to ``python -m engine.build MODEL``, and what is not:

- every column but the latency, byte for byte: blocks are whole multiples of the batch size
  starting at sample 0, so every batch holds the same samples as in one process; the workers
  run torch with the same thread count (``--threads``); the costs are counted on the same model;
- ``latency_e{k}`` (wall-clock) is measured per batch by the worker that ran the batch, as one
  process measures its batches. It is the one thing that differs: two single-process builds
  differ there too, and workers sharing a machine's cores slow each other down. For latency
  you quote, build in one process on a quiet machine.

A worker that dies mid-run is restarted by Ray and its block run again (``max_restarts``,
``max_task_retries``); a shard is written atomically, so a re-run block replaces it whole.
Families whose build is not ``run_exits`` over prepared inputs are refused in one line
(``Family.not_on_ray`` says why).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from engine.core.family import FamilyError
from engine.core.trace import Trace
from engine.run.exits import ExitCosts
from engine.run.trace_build import TraceInputs, trace_from_outputs

SHARD_KEY = "aie.shard"  # Parquet metadata of a shard: block, rows, pid, host
INSTALL_HINT = "pip install '.[distributed]' (Ray Data, ray[data]==2.60.0)"
RETRIES = 3  # restarts of a dead worker and re-runs of its block before the build gives up


class RayBuildError(RuntimeError):
    """The distributed build cannot run (no Ray, no cluster, a lost shard); one line."""


@dataclass(frozen=True)
class RayBuild:
    """A finished distributed build: the trace, where its shards went and who wrote them."""

    trace: Trace
    shard_dir: Path  # removed after the gather unless the caller chose it
    blocks: int
    pids: tuple[int, ...]  # per block, the worker process that wrote its shard


def import_ray():
    """Ray and Ray Data, or a one-line RayBuildError saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayBuildError(f"Ray is not installed: {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``host:port`` (``ray.init`` would
    retry for long); ``auto`` and other forms are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayBuildError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with "
            "`ray start --head` and give the address it prints"
        ) from None


def blocks_of(n: int, batch_size: int, batches_per_block: int) -> list[tuple[int, int]]:
    """Index ranges [start, stop) covering 0..n, each a whole number of batches: the batches
    inside are those of a single-process build."""
    size = batch_size * batches_per_block
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class ShardWorker:
    """One Ray actor: the model loaded once; each call runs one block and writes its shard."""

    def __init__(self, model_id: str, x_ref: list, batch_size: int, threads: int, shard_dir: str):
        import ray
        import torch

        from engine.families import load_model
        from engine.run.exits import exit_costs

        torch.set_num_threads(threads)
        self.model = load_model(model_id)
        self.x = ray.get(x_ref[0])  # shared by the actors of a node (object store, no copy)
        self.batch_size = batch_size
        self.shard_dir = Path(shard_dir)
        costs = exit_costs(self.model, tuple(self.x.shape[1:]))
        self.costs = (costs.stage.tolist(), costs.head.tolist())

    def __call__(self, batch: dict) -> dict:
        import torch

        from engine.run.exits import run_exits

        out = {k: [] for k in ("block", "start", "stop", "path", "pid")}
        for block, start, stop in zip(batch["block"], batch["start"], batch["stop"], strict=True):
            probs, latency = run_exits(
                self.model, torch.tensor(self.x[start:stop]), self.batch_size
            )
            path = self.shard_dir / f"block-{int(block):06d}.parquet"
            write_shard(path, int(block), int(start), probs, latency)
            for k, v in zip(out, (block, start, stop, str(path), os.getpid()), strict=True):
                out[k].append(v)
        out["flops_stage"] = [self.costs[0]] * len(out["block"])
        out["flops_head"] = [self.costs[1]] * len(out["block"])
        return {k: np.asarray(v) for k, v in out.items()}


def worker_error(e: Exception) -> str:
    """The worker's own error from Ray's report (its last ``SomeError: message`` line, e.g.
    the registry's "unknown model"), else the report's first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception): ", ln)]
    return raised[-1] if raised else (lines or [type(e).__name__])[0]


def write_shard(path: Path, block: int, start: int, probs: np.ndarray, latency: np.ndarray):
    """One block's rows (global index, probabilities, latency), atomically: temp + rename."""
    n, k, c = probs.shape
    cols = {"row": np.arange(start, start + n, dtype=np.int64)}
    cols |= {f"prob_e{e}_c{j}": probs[:, e, j] for e in range(k) for j in range(c)}
    cols |= {f"latency_e{e}": latency[:, e] for e in range(k)}
    meta = {"block": block, "rows": n, "pid": os.getpid(), "host": socket.gethostname()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pl.DataFrame(cols).write_parquet(tmp, metadata={SHARD_KEY: json.dumps(meta)})
    tmp.replace(path)


def read_shards(paths: list[Path], starts: list[int], n: int, k: int):
    """The shards' probabilities [N, K, C] and latency [N, K], in sample order; a shard that is
    missing (written on another node's disk) or out of place is a RayBuildError."""
    probs = latency = None
    at = 0
    for path, start in zip(paths, starts, strict=True):
        if not path.exists():
            raise RayBuildError(
                f"shard {path} is not on this machine (a worker on another node wrote it); give "
                "--shards a directory that every node and this one share"
            )
        df = pl.read_parquet(path)
        rows = df["row"].to_numpy()
        if start != at or not np.array_equal(rows, np.arange(at, at + len(rows))):
            raise RayBuildError(f"shard {path.name} holds rows {rows[0]}.. where {at}.. belong")
        if probs is None:
            c = sum(1 for col in df.columns if col.startswith("prob_e0_"))
            probs = np.empty((n, k, c), dtype=np.float32)
            latency = np.empty((n, k), dtype=np.float64)
        for e in range(k):
            for j in range(probs.shape[2]):
                probs[at : at + len(rows), e, j] = df[f"prob_e{e}_c{j}"].to_numpy()
            latency[at : at + len(rows), e] = df[f"latency_e{e}"].to_numpy()
        at += len(rows)
    if at != n:
        raise RayBuildError(f"the shards hold {at} of the {n} samples")
    return probs, latency


def run_on_ray(
    model_id: str,
    inputs: TraceInputs,
    workers: int = 2,
    threads: int = 1,
    shard_dir: Path | None = None,
    batches_per_block: int = 4,
) -> RayBuild:
    """Trace ``model_id`` on ``inputs`` with ``workers`` actors on the Ray instance this process
    is connected to (``connect``)."""
    ray = import_ray()
    keep = shard_dir is not None
    shard_dir = Path(shard_dir) if keep else Path(tempfile.mkdtemp(prefix="aie-shards-"))
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_dir.glob("block-*.parquet"):
        old.unlink()  # a stale shard must never be gathered into this trace
    x = inputs.x.numpy()
    blocks = blocks_of(len(x), inputs.batch_size, batches_per_block)
    items = [{"block": i, "start": s, "stop": e} for i, (s, e) in enumerate(blocks)]
    x_ref = [ray.put(x)]  # held here: a restarted worker reads it again
    try:
        with warnings.catch_warnings():  # Ray 2.60 names no retry parameters of map_batches
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardWorker,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))),
                num_cpus=threads,
                fn_constructor_kwargs={
                    "model_id": model_id,
                    "x_ref": x_ref,
                    "batch_size": inputs.batch_size,
                    "threads": threads,
                    "shard_dir": str(shard_dir),
                },
                # the driver's user model and cache folders (AIE_DATA_DIR, AIE_CACHE_DIR)
                runtime_env={
                    "env_vars": {k: v for k, v in os.environ.items() if k.startswith("AIE_")}
                },
                max_restarts=RETRIES,
                max_task_retries=RETRIES,
            )
        try:
            done = ds.take_all()  # in completion order: the gather below restores sample order
        except ray.exceptions.RayError as e:  # a worker died more often than it is retried
            raise RayBuildError(
                f"the Ray build failed ({RETRIES} retries per block): {worker_error(e)}"
            ) from None
        by_block = {int(r["block"]): r for r in done}
        if sorted(by_block) != list(range(len(blocks))):
            missing = sorted(set(range(len(blocks))) - set(by_block))
            raise RayBuildError(f"blocks {missing} never finished")
        ordered = [by_block[i] for i in range(len(blocks))]
        first = ordered[0]
        costs = ExitCosts(
            np.asarray(first["flops_stage"], dtype=np.float64),
            np.asarray(first["flops_head"], dtype=np.float64),
        )
        probs, latency = read_shards(
            [Path(r["path"]) for r in ordered],
            [int(r["start"]) for r in ordered],
            len(x),
            len(costs.stage),
        )
        trace = trace_from_outputs(inputs, probs, latency, costs, threads)
        return RayBuild(trace, shard_dir, len(blocks), tuple(int(r["pid"]) for r in ordered))
    finally:
        if not keep:
            shutil.rmtree(shard_dir, ignore_errors=True)


def token_file() -> Path:
    """Where Ray 2.60 keeps the cluster token it authenticates every connection with."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_token() -> None:
    """Create Ray's token file once, atomically: two local instances starting together (two
    test processes) must not each write their own and lock the other's workers out."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_file()
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(secrets.token_hex(32))
    tmp.chmod(0o600)
    try:
        os.link(tmp, path)  # fails if another process made it first: then theirs is used
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def use_token_to_join() -> None:
    """Ray authenticates with the token only when asked to (``RAY_AUTH_MODE=token``) for an
    explicit address; ask when a token is there and the user said nothing."""
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or token_file().exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


class connect:
    """``with connect(address, num_cpus):`` a Ray instance for the build: ``None`` starts a local
    one in a short private temp dir (never an existing cluster on this machine) and shuts it
    down after; an address joins that cluster. A process already connected keeps its own."""

    def __init__(self, address: str | None, num_cpus: int):
        self.address, self.num_cpus = address, num_cpus
        self.started = False
        self.temp_dir: str | None = None

    def __enter__(self):
        if self.address is not None:
            use_token_to_join()  # before Ray is imported: it reads the mode once, at import
        ray = import_ray()
        if ray.is_initialized():
            return ray
        quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.address is None:
            # short: Ray's AF_UNIX socket paths live under it (108 bytes at most)
            self.temp_dir = tempfile.mkdtemp(prefix="aie-ray-", dir="/tmp")
            ensure_token()
            ray.init(address="local", num_cpus=self.num_cpus, _temp_dir=self.temp_dir, **quiet)
        else:
            check_reachable(self.address)
            try:
                ray.init(address=self.address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RayBuildError(
                    f"cannot join the Ray cluster at {self.address}: {first}"
                ) from None
        self.started = True
        ctx = ray.data.DataContext.get_current()
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return ray

    def __exit__(self, *exc):
        if self.started:
            import ray

            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return False


def build_on_ray(
    model_id: str,
    split: str = "test",
    dataset: str | None = None,
    force: bool = False,
    address: str | None = None,
    workers: int = 2,
    threads: int = 1,
    shard_dir: Path | None = None,
    batches_per_block: int = 4,
) -> RayBuild:
    """``python -m engine.build MODEL --ray [ADDRESS]``: the model's trace, built on Ray."""
    from engine import families
    from engine.registry import get_card

    card = get_card(model_id)
    fam = families.get(card.family)
    if dataset not in (None, card.dataset) and not force:
        raise FamilyError(
            f"{model_id} was trained on {card.dataset}; its exits on {dataset} would measure a "
            "model on data it never saw (add --force to build it anyway)"
        )
    inputs = fam.trace_inputs(card, split, dataset)  # refuses, in one line, what cannot shard
    if workers < 1 or threads < 1 or batches_per_block < 1:
        raise ValueError("--workers, --threads and blocks must be at least 1")
    with connect(address, workers * threads):
        done = run_on_ray(model_id, inputs, workers, threads, shard_dir, batches_per_block)
    if card.config.get("gates"):  # a JEI model's gates score the gathered probabilities here
        from engine.run.trace_build import with_model_gates

        done = replace(done, trace=with_model_gates(done.trace, families.load_model(model_id)))
    return done
