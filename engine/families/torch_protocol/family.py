"""A user's own multi-exit PyTorch model, from their Python file (``python -m engine.byo torch``).

The card records the file's path and SHA-256, the input shape, the classes and the evaluation
data (path and SHA-256); the weights are copied beside the card. Its results are the trace
over the user's data; the runtime, the ONNX export and the inspector run it like a bundled
model, at its own input shape.
"""

from __future__ import annotations

from engine.core.trace import Trace
from engine.families.common import TraceFamily
from engine.families.torch_protocol import model as protocol
from engine.registry import ModelCard, verified_weights
from engine.run.trace_build import TraceInputs, trace_of_inputs

FAMILY_NAME = "torch_protocol"


class TorchProtocol(TraceFamily):
    name = FAMILY_NAME
    title = "your PyTorch model"
    about = (
        "A multi-exit network from your own Python file: an ordered list of stages and one "
        "exit head per stage; an input leaves at the first exit the policy trusts."
    )
    trainer = None  # trained by its owner; registered with python -m engine.byo torch

    def build(self, config: dict):
        return protocol.build(config)

    def load(self, card: ModelCard):
        model = protocol.build(card.config)
        protocol.load_weights(model.network, verified_weights(card), card.weights_path.name)
        return model.eval()

    def timing_inputs(self, card: ModelCard, batch: int):
        """The first ``batch`` rows of the evaluation data the card was registered with."""
        import torch

        from engine.families.common import tile

        x = protocol.read_card_data(card.config).x[:batch]
        return tile(torch.as_tensor(x, dtype=torch.float32), batch)

    def trace(
        self, card: ModelCard, split: str = "test", dataset: str | None = None, progress=None
    ) -> Trace:
        """The trace over the evaluation data the card was registered with."""
        data = protocol.read_card_data(card.config)
        return trace_of_model(self.load(card), data, card.model_id, card.dataset, split, progress)

    def trace_inputs(
        self, card: ModelCard, split: str = "test", dataset: str | None = None
    ) -> TraceInputs:
        """What ``trace`` runs the model on: the registered evaluation data."""
        return inputs_of_data(protocol.read_card_data(card.config), card, split)

    def inputs(self, card: ModelCard) -> protocol.Data:
        """The registered evaluation data: the inspector's test samples, by row."""
        return protocol.read_card_data(card.config)

    def live_input(self, card: ModelCard) -> None:
        return None  # its inputs are its own data's rows, not the app's 28×28 images


def trace_of_model(
    model, data: protocol.Data, model_id: str, dataset: str, split: str = "test", progress=None
):
    import torch

    return trace_of_inputs(
        model,
        torch.from_numpy(data.x),
        data.y,
        model.class_names,
        dataset,
        split,
        model_id,
        extra_meta={"family": FAMILY_NAME, "input_shape": list(model.input_shape)},
        progress=progress,
    )


def inputs_of_data(data: protocol.Data, card: ModelCard, split: str = "test") -> TraceInputs:
    """``trace_of_model``'s inputs, read from the card (the model itself is not loaded)."""
    import torch

    return TraceInputs(
        torch.from_numpy(data.x),
        data.y,
        tuple(card.config["classes"]),
        card.dataset,
        split,
        card.model_id,
        extra_meta={"family": FAMILY_NAME, "input_shape": list(card.config["input_shape"])},
    )


FAMILY = TorchProtocol()
