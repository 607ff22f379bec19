"""Trace building on Ray (``engine.run.ray_build``, ``python -m engine.build MODEL --ray``).

The trace gathered from the workers' Parquet shards is the single-process trace: the same
samples in the same order and the same bytes in every column but ``latency_e{k}``, the measured
wall-clock (see the module's docstring). A worker killed mid-run is restarted by Ray and the
trace is still complete and identical. The command line says in one line when Ray is missing or
the cluster cannot be reached.

One local Ray instance per test process (2 CPUs, no dashboard, its own short temp dir), so that
pytest-xdist workers never share one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from engine import families
from engine.core import trace as trace_io
from engine.core.family import FamilyError
from engine.registry import get_card
from engine.run import ray_build

ROOT = Path(__file__).resolve().parent.parent

try:
    import ray  # noqa: F401 - only whether it is installed
except ImportError:  # installed by `make test` (the `distributed` extra)
    if os.environ.get("CI"):
        raise
    pytest.skip("Ray is not installed: pip install '.[distributed]'", allow_module_level=True)


@pytest.fixture(scope="module")
def local_ray():
    """A local instance started as ``--ray`` starts one (``ray_build.connect``)."""
    with ray_build.connect(None, num_cpus=2) as r:
        yield r


@pytest.fixture
def one_thread():
    """The single-process build's torch threads (``--threads 1``), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def single_process(model_id: str) -> trace_io.Trace:
    card = get_card(model_id)
    return families.get(card.family).checked_trace(card)


def without_latency(t: trace_io.Trace) -> bytes:
    """The Parquet bytes of a trace with its measured latency zeroed: everything else."""
    return replace(t, latency_ms=np.zeros_like(t.latency_ms)).to_parquet_bytes()


def assert_same_trace(ray_trace: trace_io.Trace, one: trace_io.Trace) -> None:
    assert np.array_equal(ray_trace.sample_id, one.sample_id)  # same samples, same order
    assert without_latency(ray_trace) == without_latency(one)
    assert ray_trace.meta.to_json() == one.meta.to_json()
    for t in (ray_trace, one):  # measured, per batch of 256, as in one process
        lat = t.latency_ms
        assert (lat > 0).all() and (np.diff(lat, axis=1) >= 0).all()
        for start in range(0, len(lat), 256):
            assert (lat[start : start + 256] == lat[start]).all()


def test_the_ray_trace_is_the_single_process_trace(local_ray, one_thread, tmp_path):
    one = single_process("digits_multi_exit_cnn")
    done = ray_build.build_on_ray(
        "digits_multi_exit_cnn", workers=2, shard_dir=tmp_path, batches_per_block=1
    )
    assert done.blocks == 2  # 450 samples: batches of 256, one block each
    shards = sorted(tmp_path.glob("block-*.parquet"))
    assert [p.name for p in shards] == ["block-000000.parquet", "block-000001.parquet"]
    rows = [pl.read_parquet(p)["row"].to_numpy() for p in shards]
    assert rows[0].tolist() == list(range(256)) and rows[1].tolist() == list(range(256, 450))
    assert_same_trace(done.trace, one)
    # and the file written is the single-process file, but for the latency columns
    a, b = tmp_path / "ray.parquet", tmp_path / "one.parquet"
    done.trace.write_parquet(a)
    one.write_parquet(b)
    lat = [c for c in pl.read_parquet(b).columns if c.startswith("latency_")]
    assert len(lat) == 4
    assert pl.read_parquet(a).drop(lat).equals(pl.read_parquet(b).drop(lat))
    assert pl.read_parquet_metadata(a) == pl.read_parquet_metadata(b)


def test_a_worker_killed_mid_run_is_restarted_and_the_trace_is_complete(
    local_ray, one_thread, tmp_path
):
    one = single_process("mnist_multi_exit_cnn")
    shards = tmp_path / "shards"
    result: dict = {}

    def build():
        try:
            result["done"] = ray_build.build_on_ray(
                "mnist_multi_exit_cnn", workers=2, shard_dir=shards, batches_per_block=1
            )
        except Exception as e:  # re-raised below, in the test's thread
            result["error"] = e

    runner = threading.Thread(target=build)
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        first = sorted(shards.glob("block-*.parquet"))
        if first:  # one shard written, the rest still to come: kill the worker that wrote it
            meta = json.loads(pl.read_parquet_metadata(first[0])[ray_build.SHARD_KEY])
            os.kill(meta["pid"], signal.SIGKILL)
            killed = meta["pid"]
        time.sleep(0.005)
    runner.join(timeout=180)
    assert killed is not None, "the build finished before a worker could be killed"
    if "error" in result:
        raise result["error"]
    done = result["done"]
    assert done.blocks == 40
    # the blocks the killed worker held (Ray also re-runs those whose output died with it) were
    # run by a restarted worker: besides the surviving one, a process that did not exist before
    assert len(set(done.pids) - {killed}) >= 2, (killed, done.pids)
    assert_same_trace(done.trace, one)


MLP = """
from torch import nn

INPUT_SHAPE = (12,)
CLASSES = ["a", "b", "c"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(12, 16), nn.ReLU()), nn.Linear(16, 16)])
        self.heads = nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])


def build_model():
    return MLP()
"""


def test_a_users_own_pytorch_model_builds_on_ray(local_ray, one_thread, tmp_path, monkeypatch):
    """Registered with ``python -m engine.byo torch`` in a user folder the workers are told of."""
    from safetensors.torch import save_file

    from engine.byo.__main__ import main as byo
    from engine.families.torch_protocol import model as protocol

    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "mlp.py").write_text(MLP)
    torch.manual_seed(0)
    net = protocol.read_spec(protocol.import_file(tmp_path / "mlp.py")).network
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 12)).astype(np.float32), rng.integers(0, 3, 600)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    argv = ["torch", str(tmp_path / "mlp.py"), "--weights", str(tmp_path / "w.safetensors")]
    assert byo([*argv, "--data", str(tmp_path / "eval.npz"), "--name", "ray_mlp"]) == 0
    done = ray_build.build_on_ray("ray_mlp", workers=2, batches_per_block=1)
    assert done.blocks == 3  # 600 samples: 256 + 256 + 88
    assert_same_trace(done.trace, single_process("ray_mlp"))


def cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in a fresh process; RAY_AUTH_MODE, which starting this process's Ray
    set, is not passed on (a user joining a cluster has not set it)."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    return subprocess.run(
        [sys.executable, "-m", "engine.build", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**base, **(env or {})},
    )


def test_the_readme_states_the_block_size():
    import inspect

    from engine.run.trace_build import TraceInputs

    readme = (ROOT / "README.md").read_text()
    per_block = inspect.signature(ray_build.build_on_ray).parameters["batches_per_block"].default
    batch = TraceInputs.__dataclass_fields__["batch_size"].default
    assert f"blocks of whole batches ({per_block} × {batch} samples)" in readme


def test_the_cli_builds_on_a_local_ray_instance(one_thread, tmp_path):
    out = tmp_path / "t.parquet"
    res = cli("digits_multi_exit_cnn", "--ray", "--workers", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "(Ray: 1 blocks, 1 worker(s))" in res.stdout
    assert_same_trace(trace_io.read_parquet(out), single_process("digits_multi_exit_cnn"))


def test_the_cli_joins_a_running_cluster_by_its_address(local_ray, one_thread, tmp_path):
    address = local_ray.get_runtime_context().gcs_address  # this process's instance, joined
    out, shards = tmp_path / "t.parquet", tmp_path / "shards"
    res = cli("digits_multi_exit_cnn", "--ray", address, "--shards", str(shards), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert f"shards in {shards}" in res.stdout and (shards / "block-000000.parquet").exists()
    assert_same_trace(trace_io.read_parquet(out), single_process("digits_multi_exit_cnn"))


def test_the_cli_says_in_one_line_what_stops_a_ray_build(tmp_path):
    no_ray = tmp_path / "no_ray" / "ray"
    no_ray.mkdir(parents=True)
    (no_ray / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    cases = [
        (("--ray",), {"PYTHONPATH": f"{no_ray.parent}:{ROOT}"}, "pip install '.[distributed]'"),
        (("--ray", "127.0.0.1:1"), None, "cannot reach the Ray cluster at 127.0.0.1:1"),
    ]
    for flags, env, says in cases:
        res = cli("digits_multi_exit_cnn", *flags, "--out", str(tmp_path / "x.parquet"), env=env)
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert says in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("model_id", "why"),
    [
        ("mnist_skipnet", "records its trainer stored"),
        ("tweets_multi_exit_minilm", "length-sorted batches"),
        ("bbc_char_early_exit_lm", "exits per token"),
        ("fashion_d2dmoe_vit", "not ported to Ray yet"),
    ],
)
def test_families_that_cannot_shard_say_why_in_one_line(model_id, why):
    with pytest.raises(FamilyError, match=why) as e:
        ray_build.build_on_ray(model_id)
    assert "\n" not in str(e.value) and model_id in str(e.value)


def test_a_jei_models_ray_trace_carries_its_own_gates(local_ray, one_thread):
    """The JEI model's gates score the gathered probabilities: the same gate columns as in one
    process (without them the gate policy could not be chosen on a Ray-built trace)."""
    one = single_process("mnist_multi_exit_cnn_jei")
    done = ray_build.build_on_ray("mnist_multi_exit_cnn_jei", workers=2)
    assert one.gate is not None
    assert_same_trace(done.trace, one)
