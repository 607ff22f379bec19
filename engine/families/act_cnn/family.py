"""ACT on images (one weight-shared conv block, pondered), as a family; the halting math,
records and live run are the parity ACT's."""

from __future__ import annotations

import numpy as np

from engine.data import images
from engine.data.images import to_model_input
from engine.families.act.family import ACT, live_act
from engine.families.act_cnn import model as act_cnn
from engine.families.common import tile


class ACTImages(ACT):
    name = "act_cnn"
    about = (
        ACT.about + " On images, one weight-shared residual conv block is applied again and "
        "again to the same image; each step sees a wider neighbourhood."
    )

    def build(self, config: dict):
        return act_cnn.build(config)

    def live_input(self, card) -> str:
        return "image"

    def timing_inputs(self, card, batch: int):
        return tile(to_model_input(images.load(card.dataset, "test").images[:batch]), batch)

    def run_one(self, model, card, x: np.ndarray, value: float):
        """x: the prepared uint8 [28, 28] image."""
        return live_act(model, to_model_input(x[None]).numpy(), value)


FAMILY = ACTImages()
