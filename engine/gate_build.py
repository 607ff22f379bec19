"""``python -m engine.gate_build MODEL``: train post hoc exit gates and bundle their scores.

The gates (``engine.core.gates``) are fitted on the model's *train* split trace (built and
cached on first use, ``engine.trace_store``), or, with ``--cross-fit``, on the test split in
two seeded folds, each half scored by the gates fitted on the other half (for a model whose
heads fit the train split far better than the test split, where a train-split gate would learn
the wrong thing). The bundled test trace is rewritten with its ``gate_e{k}`` columns filled;
every other column keeps its values. A JSON card beside it (``<model>__gate.json``) says how
the gates were trained and how they compare with the thresholds at equal cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engine.core import gates, tradeoff
from engine.core.progress import Progress, terminal
from engine.core.trace import Trace, read_parquet
from engine.paths import TRACES_DIR

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.8)  # fractions of the full model's mean cost
COMPARED = ("max_prob", "entropy", "patience", "gate")


def card_file(model_id: str) -> Path:
    return TRACES_DIR / f"{model_id}__gate.json"


def columns_digest(trace: Trace) -> str:
    """SHA-256 of everything but the gate (labels, probabilities, cost, latency): the card
    records it so a test can check that adding the gate changed nothing else."""
    h = hashlib.sha256()
    for arr in (trace.label, trace.probs, trace.cost, trace.latency_ms):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def build(
    model_id: str,
    cross_fit: bool,
    hidden: int,
    seed: int,
    out: Path | None,
    progress: Progress | None = None,
) -> dict:
    from engine.trace_store import load_trace, trace_file

    src = trace_file(model_id, "test")
    test = read_parquet(src, model_id)
    if (test.meta.extra.get("gate") or {}).get("joint"):
        raise ValueError(
            f"{model_id} carries jointly trained gates; post hoc ones would replace them"
        )
    t0 = time.perf_counter()
    if cross_fit:
        scores = gates.cross_fit_scores(test, folds=2, hidden=hidden, seed=seed, progress=progress)
        data = {"fitted_on": "test split, 2 seeded folds (each half scored by the other's gates)"}
        data["samples"] = test.num_samples
    else:
        train = load_trace(model_id, "train", progress=progress)
        fitted = gates.fit(train, hidden=hidden, seed=seed, progress=progress)
        scores = fitted.score(test.probs)
        data = {"fitted_on": "train split", "samples": train.num_samples}
        data["train_target_agreement"] = [
            round(float(a), 4) for a in gates.target_accuracy(train, fitted.score(train.probs))
        ]
    seconds = time.perf_counter() - t0
    meta = replace(
        test.meta,
        extra={
            **test.meta.extra,
            "gate": {"fitted_on": data["fitted_on"], "card": card_file(model_id).name},
        },
    )
    gated = replace(test, meta=meta, gate=scores)
    card = {
        "model_id": model_id,
        "gate": "logistic regression" if hidden == 0 else f"MLP, {hidden} tanh units",
        "features": "sorted probabilities, normalised entropy, top-2 margin, agreement with the "
        "previous exit, previous exit's max-prob",
        "target": "correct at this exit, or no later exit is correct",
        "joint_training": False,
        "seed": seed,
        "data": data,
        "command": "python -m engine.gate_build "
        + model_id
        + (" --cross-fit" if cross_fit else "")
        + (f" --hidden {hidden}" if hidden else ""),
        "fit_seconds": round(seconds, 1),
        "trace_digest": columns_digest(test),
        "test_target_agreement": [round(float(a), 4) for a in gates.target_accuracy(test, scores)],
        "accuracy_within_budget": tradeoff.accuracy_within_budgets(gated, COMPARED, BUDGETS),
        "oracle": {
            "accuracy": round(tradeoff.oracle_stats(test).accuracy, 4),
            "cost_fraction": round(tradeoff.oracle_stats(test).cost_fraction, 4),
        },
    }
    gated.write_parquet(out or src)
    card_file(model_id).write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m engine.gate_build", description=__doc__.split("\n")[0]
    )
    p.add_argument("model", help="bundled multi-exit model with a trace in assets/traces/")
    p.add_argument("--cross-fit", action="store_true", help="fit on test-split folds")
    p.add_argument("--hidden", type=int, default=0, help="0: logistic gates; else MLP width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: overwrite the bundled trace")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    try:
        card = build(
            args.model, args.cross_fit, args.hidden, args.seed, args.out, terminal(args.quiet)
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(card["accuracy_within_budget"]), np.round(card["test_target_agreement"], 3))


if __name__ == "__main__":
    main()
