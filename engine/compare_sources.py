"""The methods the comparison page puts side by side, per data set, as ``MethodSweep``s.

Early exit and cascades come from their traces; layer skipping from its skip records (the
network re-run at every gate threshold); ACT from its halting records (any eps, from one unroll); dynamic-k MoE from per-sample FLOPs at every tau, which
needs the model to be re-run and is therefore built once and shipped:

    python -m engine.compare_sources build        # writes assets/traces/records/*__compare*.parquet

Activation sparsity (exactly-zero ReLU outputs per layer and input) is built the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from engine import halting, skipping
from engine.compare import MethodSweep, oracle_fraction, relu_zero_fraction, sweep_from_trace
from engine.data import images
from engine.registry import load_model
from engine.trace_store import TRACES_DIR, load_trace

RECORDS = TRACES_DIR / "records"
SUBSET = 2000  # test images (seeded subset) for what must be re-run: MoE sweep, ReLU sparsity
SEED = 0

# data set -> (method name, source kind, model id); the order is the display order
METHODS = {
    "mnist": [
        ("early exit (CNN)", "trace", "mnist_multi_exit_cnn"),
        ("cascade", "trace", "mnist_cascade"),
        ("skip gates (SkipNet)", "skip", "mnist_skipnet"),
        ("pondering (ACT)", "act", "mnist_act"),
    ],
    "fashion_mnist": [
        ("early exit (CNN)", "trace", "fashion_multi_exit_cnn"),
        ("dynamic-k MoE (D2DMoE)", "moe", "fashion_d2dmoe_vit"),
    ],
}
ORACLE_MODEL = {"mnist": "mnist_multi_exit_cnn", "fashion_mnist": "fashion_multi_exit_cnn"}
SPARSITY_MODELS = {"mnist": "mnist_multi_exit_cnn", "fashion_mnist": "fashion_multi_exit_cnn"}


def subset_ids(n_total: int, n: int = SUBSET, seed: int = SEED) -> np.ndarray:
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def moe_file(model_id: str):
    return RECORDS / f"{model_id}__compare__test.parquet"


def sparsity_file(model_id: str):
    return RECORDS / f"{model_id}__relu_zeros__test.parquet"


# --- loading (pure numpy on shipped files) ------------------------------------------------------


def _skip_sweep(name: str, model_id: str) -> MethodSweep:
    rec = skipping.load_records(model_id)
    full = float(rec.meta.get("full_flops", rec.flops.max()))
    return MethodSweep(
        name,
        "gate threshold",
        rec.sample_id,
        rec.label,
        rec.thresholds,
        rec.flops / full,
        rec.correct,
    )


def _act_sweep(name: str, model_id: str) -> MethodSweep:
    """ACT as a sweep over eps, from its halting records; the full model is all M steps."""
    rec = halting.load_records(model_id)
    if rec.image_index is None:
        raise FileNotFoundError(f"{model_id} is not an image model")
    full = float(rec.meta.get("encode_flops", 0.0)) + rec.max_steps * float(
        rec.meta["flops_per_step"]
    )
    runs = [halting.at_eps(rec, e) for e in halting.EPS_GRID]
    return MethodSweep(
        name,
        "eps",
        rec.image_index,
        rec.label,
        halting.EPS_GRID.astype(np.float64),
        np.stack([r.flops for r in runs]) / full,
        np.stack([r.correct for r in runs]),
    )


def _moe_sweep(name: str, model_id: str) -> MethodSweep:
    path = moe_file(model_id)
    if not path.exists():
        raise FileNotFoundError(f"{path.name} missing: run python -m engine.compare_sources build")
    df = pl.read_parquet(path).sort(["tau", "sample_id"])
    taus = np.unique(df["tau"].to_numpy())
    t = len(taus)
    n = df.height // t

    def grid(col):
        return df[col].to_numpy().reshape(t, n)

    flops = grid("flops").astype(np.float64)
    full = flops[np.argmin(taus)]  # tau = 0 runs every expert: the full model
    return MethodSweep(
        name,
        "tau",
        grid("sample_id")[0],
        grid("label")[0],
        taus,
        flops / full[None, :],
        grid("correct").astype(bool),
    )


def load_sweeps(dataset: str) -> tuple[list[MethodSweep], list[str]]:
    """The methods available for a data set, and a note for each one that is missing."""
    sweeps, missing = [], []
    for name, kind, model_id in METHODS.get(dataset, []):
        try:
            if kind == "trace":
                sweeps.append(sweep_from_trace(load_trace(model_id, build_if_missing=False), name))
            elif kind == "skip":
                sweeps.append(_skip_sweep(name, model_id))
            elif kind == "act":
                sweeps.append(_act_sweep(name, model_id))
            else:
                sweeps.append(_moe_sweep(name, model_id))
        except FileNotFoundError as e:
            missing.append(f"{name}: {e}")
    return sweeps, missing


@dataclass(frozen=True)
class Oracle:
    sample_id: np.ndarray
    fraction: np.ndarray  # [N] oracle exit's cost fraction (never-correct: 1)


def load_oracle(dataset: str) -> Oracle:
    trace = load_trace(ORACLE_MODEL[dataset], build_if_missing=False)
    return Oracle(trace.sample_id, oracle_fraction(trace))


def load_sparsity(dataset: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(sample_id [N], layer names, zero fraction [N, L]) for the data set's ReLU model."""
    path = sparsity_file(SPARSITY_MODELS[dataset])
    if not path.exists():
        raise FileNotFoundError(f"{path.name} missing: run python -m engine.compare_sources build")
    df = pl.read_parquet(path).sort("sample_id")
    layers = [c for c in df.columns if c.startswith("ReLU ")]
    return df["sample_id"].to_numpy(), layers, df.select(layers).to_numpy()


# --- building (runs models; needs the data sets installed) --------------------------------------


@torch.no_grad()
def build_moe(model_id: str, dataset: str) -> None:
    from engine.models.moe import Routing
    from engine.moe_analysis import TAU_GRID, run

    model = load_model(model_id)
    test = images.load(dataset, "test")
    ids = subset_ids(len(test))
    rows = []
    for tau in TAU_GRID:
        rec = run(model, test.images[ids], Routing(tau=tau))
        rows.append(
            pl.DataFrame(
                {
                    "tau": np.full(len(ids), tau),
                    "sample_id": ids,
                    "label": test.labels[ids],
                    "flops": rec.flops.astype(np.float64),
                    "correct": rec.pred == test.labels[ids],
                }
            )
        )
        print(f"{model_id} tau={tau}: mean FLOPs {rec.flops.mean():,.0f}", flush=True)
    path = moe_file(model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.concat(rows).write_parquet(path)


def build_sparsity(model_id: str, dataset: str) -> None:
    model = load_model(model_id)
    test = images.load(dataset, "test")
    ids = subset_ids(len(test))
    names, z = relu_zero_fraction(model, images.to_model_input(test.images[ids]))
    df = pl.DataFrame(
        {"sample_id": ids, **{n: z[:, i].astype(np.float32) for i, n in enumerate(names)}}
    )
    df.write_parquet(sparsity_file(model_id))
    print(f"{model_id}: mean zero fraction per ReLU {np.round(z.mean(0), 3).tolist()}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: python -m engine.compare_sources build")
        sys.exit(2)
    for dataset, methods in METHODS.items():
        for _, kind, model_id in methods:
            if kind == "moe":
                build_moe(model_id, dataset)
        build_sparsity(SPARSITY_MODELS[dataset], dataset)


if __name__ == "__main__":
    main()
