"""Mixture of experts (top-k softmax routing, and D2DMoE's dynamic-k) in a small ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine.core.family import Family, FamilyError, LiveRun, Timed
from engine.core.progress import track
from engine.core.results import Results
from engine.data import images
from engine.families import load_model
from engine.families.moe import analysis
from engine.families.moe import model as moe


class MoE(Family):
    name = "moe"
    kind = "route"
    title = "dynamic-k MoE (D2DMoE)"
    paper = "Shazeer 2017; Fedus 2021 (Switch); Szatkowski 2024 (D2DMoE)"
    setting = "tau"
    step_name = "expert"
    about = "A router picks experts per token; D2DMoE runs the experts above a fraction τ."
    setting_help = "τ: run the experts whose predicted norm ≥ τ × the largest"
    not_on_ray = (
        "its τ sweep re-runs the model once per τ on a seeded subset; not ported to Ray yet"
    )

    def build(self, config: dict):
        return moe.build(config)

    def results(self, card) -> Results | None:
        """The dynamic-k sweep over τ (re-run per τ, so built once and shipped); a top-k model
        has no setting to sweep."""
        path = analysis.compare_file(card.model_id)
        if not path.exists():
            if card.raw.get("variant") != "dynamic":
                return None
            raise FileNotFoundError(
                f"{path.name} missing: run python -m engine.compare_sources build"
            )
        df = pl.read_parquet(path).sort(["tau", "sample_id"])
        taus = np.unique(df["tau"].to_numpy())
        t = len(taus)
        n = df.height // t

        def grid(col):
            return df[col].to_numpy().reshape(t, n)

        flops = grid("flops").astype(np.float64)
        return Results(
            self.label(card),
            "tau",
            taus.astype(np.float64),
            grid("sample_id")[0],
            grid("label")[0].astype(np.int64),
            flops,
            flops[np.argmin(taus)],  # tau = 0 runs every expert: the full model
            grid("correct").astype(bool),
            meta={
                "model_id": card.model_id,
                "family": self.name,
                "dataset": card.dataset,
                "split": "test",
                "cost_unit": "FLOPs",
            },
        )

    def live_input(self, card) -> str:
        return "image"

    def run_one(self, model, card, x: np.ndarray, value: float) -> LiveRun:
        """One prepared uint8 [28, 28] image, routed at tau ``value`` (dynamic-k) or the
        model's own top-k; only the experts that are picked run."""
        tau = value if card.raw.get("variant") == "dynamic" else None
        rec = analysis.run(
            model, np.asarray(x, dtype=np.uint8)[None], analysis.routing_setting(tau=tau)
        )
        per_layer = rec.experts_per_token[0].mean(axis=-1)  # [layers] mean experts per token
        dense = analysis.dense_flops(model)
        return LiveRun(
            prediction=int(rec.pred[0]),
            confidence=float(rec.probs[0].max()),
            cost=float(rec.flops[0]),
            full_cost=float(dense),
            decision=f"{per_layer.mean():.2f} experts per token on average",
            steps=per_layer,
            ran=per_layer > 0,
            detail={"experts_per_token": rec.experts_per_token[0]},
        )

    def timed(self, card, model, batch: int) -> Timed:
        """A sparse run (only the picked experts computed) at each tau of the results."""
        if card.raw.get("variant") != "dynamic":
            raise FamilyError(f"{card.model_id} routes top-k: it has no setting to time")
        from engine.families.common import tile

        x = tile(images.to_model_input(images.load(card.dataset, "test").images[:batch]), batch)
        taus = np.asarray(analysis.TAU_GRID, dtype=np.float64)
        return Timed(
            "setting", taus, lambda i: model(x, moe.Routing(tau=float(taus[i]))).logits, batch
        )

    def rebuilt_for_compare(self, card) -> bool:
        return card.raw.get("variant") == "dynamic"

    def build_results(self, card, progress=None) -> Path:
        """Re-run the dynamic-k model at every tau on the seeded test subset; write the file
        ``results`` reads."""
        if card.raw.get("variant") != "dynamic":
            raise FamilyError(f"{card.model_id} routes top-k: it has no setting to sweep")
        model = load_model(card.model_id)
        test = images.load(card.dataset, "test")
        ids = analysis.sweep_subset(len(test))
        rows = []
        with torch.no_grad():
            for tau in track(analysis.TAU_GRID, "routing sweep (tau)", progress):
                rec = analysis.run(model, test.images[ids], moe.Routing(tau=tau))
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
        path = analysis.compare_file(card.model_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.concat(rows).write_parquet(path)
        return path


FAMILY = MoE()
