"""The methods the comparison page puts side by side, per data set, read from the families.

Every bundled model whose family produces per-sample results (``Family.results``) on a data set
is one method there; nothing here names a family. Early exit and cascades come from their
traces, skipping and halting from their records, dynamic-k MoE from per-sample FLOPs at every
tau, which needs the model to be re-run and is therefore built once and shipped:

    python -m engine.compare_sources build        # writes assets/traces/records/*__compare*.parquet

Activation sparsity (exactly-zero ReLU outputs per layer and input) is built the same way, for
each data set's first early-exit model.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import polars as pl

from engine import families
from engine.compare import oracle_fraction, relu_zero_fraction
from engine.core.family import KINDS
from engine.core.results import Results
from engine.core.stats import seeded_subset
from engine.data import images
from engine.paths import RECORDS_DIR
from engine.registry import ModelCard
from engine.trace_store import load_trace

SUBSET = 2000  # test images (seeded subset) for what must be re-run: MoE sweep, ReLU sparsity
SEED = 0


def sparsity_file(model_id: str):
    return RECORDS_DIR / f"{model_id}__relu_zeros__test.parquet"


def _cards(dataset: str) -> list[tuple[ModelCard, families.Family]]:
    """The data set's models, in display order: by kind, then as ``cards_of_kind`` orders them
    (by family, then the family's own order, e.g. ACT by ponder cost)."""
    found = families.cards_of_kind(*KINDS, dataset=dataset)
    return sorted(found, key=lambda cf: KINDS.index(cf[1].kind))


def datasets() -> list[str]:
    """Data sets with at least two bundled models (language models aside), most models first."""
    seen: dict[str, int] = {}
    # language models exit per token: no per-sample compute to compare
    for card, _ in families.cards_of_kind(*(k for k in KINDS if k != "lm")):
        seen[card.dataset] = seen.get(card.dataset, 0) + 1
    return sorted((d for d, n in seen.items() if n >= 2), key=lambda d: (-seen[d], d))


def load_sweeps(dataset: str) -> tuple[list[Results], list[str]]:
    """The methods available for a data set, and a note for each one that is missing."""
    found, missing = [], []
    for card, fam in _cards(dataset):
        try:
            r = fam.results(card)
        except FileNotFoundError as e:
            missing.append(f"{fam.label(card)}: {e}")
            continue
        if r is not None:
            found.append((card, fam, r))
    per_family: dict[str, int] = {}
    for _, fam, _ in found:
        per_family[fam.name] = per_family.get(fam.name, 0) + 1
    # several models of one family (ACT at three ponder costs): name each by its model id
    sweeps = [replace(r, name=fam.label(card, per_family[fam.name])) for card, fam, r in found]
    return sweeps, missing


def class_names(dataset: str) -> list[str]:
    """The data set's class names, from its models' cards (the image sets' own otherwise)."""
    for card, _ in _cards(dataset):
        if card.raw.get("class_names"):
            return list(card.raw["class_names"])
    return list(images.CLASS_NAMES.get(dataset, []))


def sparsity_model(dataset: str) -> str | None:
    """The data set's first early-exit model: the oracle and ReLU sparsity are measured on it."""
    for card, fam in _cards(dataset):
        if fam.kind == "exit":
            return card.model_id
    return None


def load_oracle(dataset: str) -> Results:
    """The oracle exit of the data set's first early-exit model, as one more method: each
    input's cost fraction at its earliest correct exit (never-correct inputs: 1)."""
    model_id = sparsity_model(dataset)
    if model_id is None:
        raise FileNotFoundError(f"no early-exit model on {dataset} to take the oracle from")
    trace = load_trace(model_id, build_if_missing=False)
    fraction = oracle_fraction(trace)
    return Results.from_fractions(
        "oracle exit",
        "-",
        trace.sample_id,
        np.zeros_like(trace.sample_id),
        np.array([0.0]),
        fraction[None, :],
        np.ones((1, len(fraction)), bool),
    )


def load_sparsity(dataset: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(sample_id [N], layer names, zero fraction [N, L]) for the data set's ReLU model."""
    model_id = sparsity_model(dataset)
    path = sparsity_file(model_id) if model_id else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{'sparsity records' if path is None else path.name} missing: run "
            "python -m engine.compare_sources build"
        )
    df = pl.read_parquet(path).sort("sample_id")
    layers = [c for c in df.columns if c.startswith("ReLU ")]
    return df["sample_id"].to_numpy(), layers, df.select(layers).to_numpy()


# --- building (runs models; needs the data sets installed) --------------------------------------


def build_sparsity(model_id: str, dataset: str) -> None:
    from engine.families import load_model

    model = load_model(model_id)
    test = images.load(dataset, "test")
    ids = seeded_subset(len(test), SUBSET, SEED)
    names, z = relu_zero_fraction(model, images.to_model_input(test.images[ids]))
    df = pl.DataFrame(
        {"sample_id": ids, **{n: z[:, i].astype(np.float32) for i, n in enumerate(names)}}
    )
    df.write_parquet(sparsity_file(model_id))
    print(f"{model_id}: mean zero fraction per ReLU {np.round(z.mean(0), 3).tolist()}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from engine.core.progress import terminal

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: python -m engine.compare_sources build")
        sys.exit(2)
    for dataset in ("mnist", "fashion_mnist"):
        for card, fam in _cards(dataset):
            if fam.rebuilt_for_compare(card):
                print(f"wrote {fam.build_results(card, progress=terminal())}", flush=True)
        model_id = sparsity_model(dataset)
        if model_id:
            build_sparsity(model_id, dataset)


if __name__ == "__main__":
    main()
