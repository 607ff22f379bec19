"""``python -m engine.quee_build MODEL``: QuEE records, gain regressors and their card.

For a bundled multi-exit model, on ``--fit`` images of the *train* split (its last ones; the
first 512 calibrate the int8 graphs, as everywhere in the runtime's tests) and the first
``--test`` images of the test split, run the float32 ONNX chain (what the "quee" backend runs)
and, from the float32 activation after every stage (and from the input), the int8 chain to every
later exit (``engine.core.quee.QueeRecords``). Fit the gain regressors on the train records,
solve λ for a few budgets and score every rule on the test records (simulated), then run the
learned choice, the band rule, float-only and int8-only for real on the test images
(``engine.run.runtime``, batch 256) and record their wall-clock, accuracy and whether the real
decisions are the simulated ones.

Cost of int8 stages: the measured time ratio of each int8 stage (its head included) to its
float32 twin in ONNX Runtime, 1 thread, batch 256, on this CPU (median of interleaved repeats),
applied to the stage's FLOPs. With the runtime's int8 scheme (``onnx_export.Int8Scheme``:
QOperator, uint8 activations) int8 pays at batch 256 except on the first stage (the 28×28 stem:
0.8–0.95× float32 across builds; the later stages 0.35–0.5×; the card's ``int8_cost``). These
are batch-256 ratios: at batch 1 int8 is about as fast as float32 (per-call overhead
dominates), so the measured cost model holds for batched runs only. The card also scores a
*nominal* cost model where an int8 stage costs 1/4 of its float32 FLOPs (the ideal 8-bit
speed-up).

Writes ``assets/traces/records/<model>__quee.npz`` (records, regressor weights; numpy arrays
only, loaded with ``allow_pickle=False``) and ``<model>__quee.json`` (the card).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.core import quee
from engine.paths import RECORDS_DIR

BUDGETS = (0.4, 0.5, 0.6, 0.8)  # fractions of the float32 full model's cost
REAL_BUDGETS = (0.5, 0.8)
NOMINAL_INT8 = 0.25
HIDDEN = 8
CALIB = 512


def records_file(model_id: str) -> Path:
    return RECORDS_DIR / f"{model_id}__quee.npz"


def card_file(model_id: str) -> Path:
    return RECORDS_DIR / f"{model_id}__quee.json"


# --- records ---------------------------------------------------------------------------------


def chains(model, model_id: str, calib: torch.Tensor, threads: int = 1):
    """(float32 sessions, int8 sessions), the runtime's own exports (same cache, same keys)."""
    from engine.run.exits import model_input_shape
    from engine.run.onnx_export import OnnxSessions, export_chain, quantize_chain

    chain = export_chain(model, model_input_shape(model), model_id)
    q = quantize_chain(model, chain, calib.detach().cpu().float())
    return OnnxSessions(chain, threads), OnnxSessions(q, threads)


def records_of(fsess, qsess, x: torch.Tensor, labels: np.ndarray, k: int, batch: int = 256):
    """``QueeRecords`` of inputs ``x``: float32 exits, and int8 from every start stage."""
    from engine.run.runtime import softmax32

    n = len(x)
    probs, pred8, conf8 = None, np.full((n, k, k), -1, np.int64), np.full((n, k, k), np.nan)
    conf8 = conf8.astype(np.float32)
    xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    for b0 in range(0, n, batch):
        h = xs[b0 : b0 + batch]
        acts = [h]
        for e in range(k):
            h = fsess.stage(e, h)
            p = softmax32(torch.from_numpy(fsess.head(e, h)))
            if probs is None:
                probs = np.zeros((n, k, p.shape[1]), np.float32)
            probs[b0 : b0 + len(p), e] = p
            acts.append(h)
        for s in range(k):
            h8 = acts[s]
            for j in range(s, k):
                h8 = qsess.stage(j, h8)
                p = softmax32(torch.from_numpy(qsess.head(j, h8)))
                pred8[b0 : b0 + len(p), s, j] = p.argmax(axis=1)
                conf8[b0 : b0 + len(p), s, j] = p.max(axis=1)
    return quee.QueeRecords(np.asarray(labels, np.int64), probs, pred8, conf8)


def stage_ms(fsess, qsess, x: torch.Tensor, k: int, repeats: int = 5, batch: int = 256):
    """([K], [K]) median ms of every stage+head in float32 and int8 (interleaved repeats)."""
    xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    out = {"float": [], "int8": []}
    for _ in range(repeats):
        for name, sess in (("float", fsess), ("int8", qsess)):
            ms = np.zeros(k)
            for b0 in range(0, len(xs), batch):
                h = xs[b0 : b0 + batch]
                for e in range(k):
                    t0 = time.perf_counter()
                    h = sess.stage(e, h)
                    sess.head(e, h)
                    ms[e] += (time.perf_counter() - t0) * 1e3
            out[name].append(ms)
    return np.median(out["float"], axis=0), np.median(out["int8"], axis=0)


# --- storage ---------------------------------------------------------------------------------


def half(rec: quee.QueeRecords) -> quee.QueeRecords:
    """The fit records as stored (float16 probabilities, half the bytes): the regressors are
    fitted on exactly what the file holds, so refitting from it gives the same weights."""
    return quee.QueeRecords(
        rec.label,
        rec.probs.astype(np.float16).astype(np.float32),
        rec.int8_pred,
        rec.int8_conf.astype(np.float16).astype(np.float32),
    )


def _reg_arrays(prefix: str, r: quee.Regressor) -> dict:
    d = {f"{prefix}_mean": r.mean, f"{prefix}_scale": r.scale}
    for i, w in enumerate(r.weights):
        d[f"{prefix}_w{i}"] = w
    return d


def save(path: Path, fit_rec, test_rec, gains: quee.GainModel, costs: dict) -> None:
    arrays = {}
    for tag, r, dtype in (("fit", fit_rec, np.float16), ("test", test_rec, np.float32)):
        arrays |= {
            f"{tag}_label": r.label,
            f"{tag}_probs": r.probs.astype(dtype),
            f"{tag}_int8_pred": r.int8_pred.astype(np.int8),
            f"{tag}_int8_conf": r.int8_conf.astype(dtype),
        }
    for k, (rf, r8) in enumerate(zip(gains.gain_float, gains.gain_int8, strict=True)):
        arrays |= _reg_arrays(f"gf{k}", rf) | _reg_arrays(f"g8{k}", r8)
    for name, c in costs.items():
        arrays[f"cost_{name}_float"] = c.float_stage
        arrays[f"cost_{name}_int8"] = c.int8_stage
    arrays["hidden_seed"] = np.array([gains.hidden, gains.seed])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _records(z, tag: str) -> quee.QueeRecords:
    return quee.QueeRecords(
        z[f"{tag}_label"].astype(np.int64),
        z[f"{tag}_probs"].astype(np.float32),
        z[f"{tag}_int8_pred"].astype(np.int64),
        z[f"{tag}_int8_conf"].astype(np.float32),
    )


def _reg(z, prefix: str) -> quee.Regressor:
    ws = []
    while f"{prefix}_w{len(ws)}" in z:
        ws.append(z[f"{prefix}_w{len(ws)}"])
    return quee.Regressor(z[f"{prefix}_mean"], z[f"{prefix}_scale"], tuple(ws))


def load(path: Path) -> dict:
    """{"fit", "test": QueeRecords, "gains": GainModel, "costs": {"measured", "nominal": Costs}}."""
    with np.load(path, allow_pickle=False) as z:
        k = z["test_probs"].shape[1]
        hidden, seed = (int(v) for v in z["hidden_seed"])
        gains = quee.GainModel(
            tuple(_reg(z, f"gf{e}") for e in range(k - 1)),
            tuple(_reg(z, f"g8{e}") for e in range(k - 1)),
            hidden,
            seed,
        )
        costs = {
            name: quee.Costs(z[f"cost_{name}_float"], z[f"cost_{name}_int8"])
            for name in ("measured", "nominal")
        }
        return {
            "fit": _records(z, "fit"),
            "test": _records(z, "test"),
            "gains": gains,
            "costs": costs,
        }


# --- scoring -----------------------------------------------------------------------------------


def simulated(test, fit_rec, gains, costs, band: float) -> dict:
    """Accuracy and cost of every rule within each budget (λ solved on the train records)."""
    cv = quee.curves(test, gains, costs, band, budgets=())
    p_fit, p_test = quee.predicted(fit_rec, gains), quee.predicted(test, gains)
    out = {}
    for b in BUDGETS:
        ch = quee.solve(fit_rec, gains, costs, b, pred=p_fit)
        o = quee.simulate(test, ch, p_test)
        row = {
            "learned": {
                "lambda": ch.lam,
                "accuracy": round(o.accuracy, 4),
                "cost": round(o.mean_cost, 4),
                "fractions": np.round(o.fractions(), 4).tolist(),
            }
        }
        for name in ("band", "float", "int8"):
            best = quee.best_within(cv[name], b)
            row[name] = (
                None if best is None else {"accuracy": round(best[0], 4), "cost": round(best[1], 4)}
            )
        orc = quee.oracle(test, costs, b)
        row["oracle"] = {"accuracy": round(orc.accuracy, 4), "cost": round(orc.mean_cost, 4)}
        out[f"{b:g}"] = row
    return out


def matched_threshold(curve: quee.Curve, budget: float) -> float:
    """The threshold of the most accurate point of a threshold curve within ``budget``; the
    cheapest point when none fits (int8-only can cost more than a low budget here)."""
    ok = curve.cost <= budget + 1e-12
    if not ok.any():
        return float(curve.setting[np.argmin(curve.cost)])
    i = np.flatnonzero(ok)[np.argmax(curve.accuracy[ok])]
    return float(curve.setting[i])


def real_runs(model, model_id, x, test, fit_rec, gains, costs, calib, band, budgets, repeats=3):
    """Run every rule for real at each budget (batch 256); median ms of repeats interleaved
    with each other and with the float32 full model (whose median at that budget is the
    ``ms_over_full_float`` reference)."""
    from engine.core.policies import Policy
    from engine.run.runtime import EarlyExitRunner

    runners = {
        b: EarlyExitRunner(model, b, model_id=model_id, calibration=calib, threads=1)
        for b in ("onnx", "onnx_int8", "quee")
    }
    cv = quee.curves(test, gains, costs, band, budgets=(), fit_on=fit_rec)
    full: list[float] = []  # the float32 full model, timed in every repeat beside the rules
    rows = []
    for b in budgets:
        ch = quee.solve(fit_rec, gains, costs, b)
        t_f = matched_threshold(cv["float"], b)
        t_8 = matched_threshold(cv["int8"], b)
        t_b = matched_threshold(cv["band"], b)
        plans = {
            "learned": (
                runners["quee"],
                Policy("max_prob", threshold=2.0),
                {"quee_choice": ch},
                quee.simulate(test, ch),
            ),
            "band": (
                runners["quee"],
                Policy("max_prob", threshold=t_b),
                {"quee_band": band},
                quee.band_rule(test, costs, t_b, band),
            ),
            "float": (
                runners["onnx"],
                Policy("max_prob", threshold=t_f),
                {},
                quee.float_only(test, costs, t_f),
            ),
            "int8": (
                runners["onnx_int8"],
                Policy("max_prob", threshold=t_8),
                {},
                quee.int8_only(test, costs, t_8),
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in plans}
        res = {}
        for _ in range(repeats):
            full.append(runners["onnx"].run_full(x).total_ms)
            for name, (runner, pol, kw, _sim) in plans.items():
                r = runner.run(x, pol, **kw)
                times[name].append(r.total_ms)
                res[name] = r
        full_ms = float(np.median(full[-repeats:]))
        for name, (_r, pol, _kw, sim) in plans.items():
            r = res[name]
            agree = (r.exit == sim.exit) & (r.int8_from == sim.int8_from)
            rows.append(
                {
                    "budget": b,
                    "rule": name,
                    "setting": ch.lam if name == "learned" else pol.threshold,
                    "accuracy": round(float((r.pred == test.label).mean()), 4),
                    "simulated_accuracy": round(sim.accuracy, 4),
                    "simulated_cost": round(sim.mean_cost, 4),
                    "decisions_agree": round(float(agree.mean()), 4),
                    "ms": round(float(np.median(times[name])), 1),
                    "ms_over_full_float": round(float(np.median(times[name])) / full_ms, 3),
                }
            )
    return {"full_float_ms": round(float(np.median(full)), 1), "repeats": repeats, "runs": rows}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(model_id: str, n_fit: int, n_test: int, seed: int, real: bool) -> dict:
    from engine.data import images
    from engine.families import load_model
    from engine.registry import get_card
    from engine.run.exits import exit_costs
    from engine.run.onnx_export import Int8Scheme
    from engine.run.runtime import DEFAULT_QUEE_BAND

    card = get_card(model_id)
    from engine.run.exits import check_contract

    model = load_model(model_id).eval()
    k = check_contract(model)
    train = images.load(card.dataset, "train")
    test = images.load(card.dataset, "test")
    calib = images.to_model_input(train.images[:CALIB])
    x_fit = images.to_model_input(train.images[-n_fit:])
    x_test = images.to_model_input(test.images[:n_test])
    t0 = time.perf_counter()
    fsess, qsess = chains(model, model_id, calib)
    fit_rec = half(records_of(fsess, qsess, x_fit, train.labels[-n_fit:], k))
    test_rec = records_of(fsess, qsess, x_test, test.labels[:n_test], k)
    f_ms, q_ms = stage_ms(fsess, qsess, x_test[:2048], k)
    ratio = q_ms / f_ms
    ec = exit_costs(model)
    costs = {
        "measured": quee.costs_from(ec.stage, ec.head, ratio),
        "nominal": quee.costs_from(ec.stage, ec.head, NOMINAL_INT8),
    }
    gains = quee.fit(fit_rec, hidden=HIDDEN, seed=seed)
    fit_s = time.perf_counter() - t0
    path = records_file(model_id)
    save(path, fit_rec, test_rec, gains, costs)
    band = DEFAULT_QUEE_BAND
    out = {
        "model_id": model_id,
        "rule": "QuEE learned three-way choice (exit / continue in int8 / continue in float32)",
        "regressors": f"per exit but the last, two MLPs ({HIDDEN} tanh units, MSE, L-BFGS "
        "float64): gain of finishing in float32 and of finishing in int8",
        "features": "engine.core.gates.features of the exit's outputs",
        "decision": "argmax(0, gain_int8 - lambda*cost_int8, gain_float - lambda*cost_float); "
        "lambda by bisection so the mean cost on the train records meets the budget",
        "seed": seed,
        "data": {
            "dataset": card.dataset,
            "fit": f"train split, last {n_fit} images (probabilities stored as float16)",
            "calibration": f"train split, first {CALIB} images (int8 graphs)",
            "test": f"test split, first {n_test} images",
        },
        "command": f"python -m engine.quee_build {model_id} --fit {n_fit} --test {n_test}"
        + (" --no-real" if not real else ""),
        "int8_cost": {
            "measured": "int8 stage+head time / float32 time, ONNX Runtime 1 thread, batch 256, "
            "this CPU, median of 5 interleaved repeats over 2048 test images, applied to the "
            "FLOPs (batch-256 ratios: at batch 1 int8 is about as fast as float32)",
            "scheme": Int8Scheme().tag,
            "batch": 256,
            "stage_ms_float": np.round(f_ms, 2).tolist(),
            "stage_ms_int8": np.round(q_ms, 2).tolist(),
            "measured_ratio": np.round(ratio, 4).tolist(),
            "nominal_ratio": NOMINAL_INT8,
            "int8_cheaper_here": bool(q_ms.sum() < f_ms.sum()),
        },
        "build_seconds": round(fit_s, 1),
        "records_sha256": digest(path),
        "band": band,
        "test_accuracy": {
            "float_exits": np.round(test_rec.correct.mean(axis=0), 4).tolist(),
            "int8_only_exits": np.round(test_rec.int8_correct[:, 0].mean(axis=0), 4).tolist(),
        },
        "simulated": {
            name: simulated(test_rec, fit_rec, gains, c, band) for name, c in costs.items()
        },
    }
    if real:
        out["real"] = real_runs(
            model,
            model_id,
            x_test,
            test_rec,
            fit_rec,
            gains,
            costs["measured"],
            calib,
            band,
            REAL_BUDGETS,
        )
    card_file(model_id).write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m engine.quee_build", description=__doc__.split("\n")[0]
    )
    p.add_argument("model", help="bundled multi-exit image model")
    p.add_argument("--fit", type=int, default=10000, help="train images the regressors fit on")
    p.add_argument("--test", type=int, default=5000, help="test images scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-real", action="store_true", help="skip the real runs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    try:
        card = build(args.model, args.fit, args.test, args.seed, not args.no_real)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(card["simulated"]["measured"]["0.5"]))
    print(json.dumps(card["int8_cost"]))
    for r in card.get("real", {}).get("runs", []):
        print(r)


if __name__ == "__main__":
    main()
