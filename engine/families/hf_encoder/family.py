"""A user's Hugging Face encoder with an exit head after every layer (``python -m engine.byo hf``)."""

from __future__ import annotations

import numpy as np
import torch

from engine.core.family import FamilyError, LiveRun
from engine.core.policies import Policy
from engine.families.common import TraceFamily
from engine.families.hf_encoder import model as hfe
from engine.families.hf_encoder import train
from engine.run.runtime import EarlyExitRunner


class HFEncoder(TraceFamily):
    name = "hf_encoder"
    title = "early exit (your encoder)"
    paper = "Xin 2020 (DeeBERT)"
    about = (
        "Your own pretrained encoder, run one layer at a time, with a small classifier after "
        "every layer trained on your labelled texts."
    )
    trainer = None  # trained by python -m engine.byo hf, from the user's files
    not_on_ray = (
        "its trace is assembled by its trainer (texts, checkpoint path); not ported to Ray yet"
    )

    def build(self, config: dict) -> hfe.HFEncoderExits:
        return hfe.build(config)

    def load(self, card) -> hfe.HFEncoderExits:
        """The checkpoint from the user's folder, then the card's SHA-checked exit weights (and
        the fine-tuned backbone, for a jointly trained model)."""
        from engine.registry import verified_weights

        model = self.build(card.config)
        model.load_state_dict(verified_weights(card))
        model.tokenizer = hfe.load_tokenizer(card.config["path"])
        return model.eval()

    def trace(self, card, split: str = "test", dataset: str | None = None, progress=None):
        """Rebuild the trace from the CSV the card was trained on (same seed, same split)."""
        if dataset not in (None, card.dataset):
            raise FamilyError(f"{card.model_id}: this model reads its own CSV only")
        if split not in ("train", "test"):
            raise FamilyError(f"{card.model_id}: splits are train and test, not {split!r}")
        data = train.read_labelled(card.raw["data"]["csv"], tuple(card.raw["class_names"]))
        rows = train.split(len(data.texts), int(card.raw["seed"]))[split == "test"]
        model = self.load(card)
        x = hfe.encode(model.tokenizer, [data.texts[i] for i in rows], model.config.seq_length)
        return train.make_trace(card.model_id, model, x, data, rows, split, progress)

    def live_input(self, card) -> str:
        return "text"

    @torch.no_grad()
    def run_one(self, model, card, x: str, value: float) -> LiveRun:
        """One text through the real early-exit runtime at max-prob threshold ``value``."""
        policy = Policy("max_prob", threshold=float(value))
        runner = EarlyExitRunner(
            model, backend="torch", device="cpu", input_shape=(2, model.config.seq_length)
        )
        out = runner.run(hfe.encode(model.tokenizer, [str(x)], model.config.seq_length), policy)
        k, n = int(out.exit[0]), model.num_exits
        return LiveRun(
            prediction=int(out.pred[0]),
            confidence=float(out.probs[0].max()),
            cost=float(out.flops[0]),
            full_cost=float(runner.costs.full),
            decision=f"left at layer {k + 1} of {n}",
            steps=np.arange(n) == k,
            ran=np.arange(n) <= k,
            detail={"exit": k},
        )


FAMILY = HFEncoder()
