"""Per-token exit traces from another tool (t5x CALM, a logit lens over every layer).

The model ran elsewhere: a card of this family has no weights and no network, only the trace
``python -m engine.byo trace`` converted (``engine.byo.foreign``) and stored in the user trace
folder, which the tuning page tunes like any other (tokens are the samples, layers the exits).
"""

from __future__ import annotations

from engine.core.family import Family, FamilyError
from engine.core.trace import Trace, read_parquet
from engine.registry import ModelCard
from engine.trace_store import user_trace_file


class ForeignTrace(Family):
    name = "foreign_trace"
    kind = "lm"
    title = "token-level early exit (another tool's trace)"
    paper = "Schuster 2022 (CALM)"
    about = (
        "Each generated token leaves the decoder at the first layer whose confidence passes a "
        "threshold; the trace was recorded by another tool and converted here."
    )
    setting = "confidence threshold"
    setting_help = "A token leaves at the first layer whose confidence is at least this."
    step_name = "layer"
    trainer = None
    traces = True
    not_on_ray = "the trace came from another tool; there is no network to run"

    untimed = "a trace made elsewhere: no model here to time (its latency_e{k} columns, if any)"

    def trace(self, card: ModelCard, split: str = "test", progress=None) -> Trace:
        """The stored conversion (no model run, so nothing to report); the original file is read only by the command line."""
        path = user_trace_file(card.model_id, split)
        if not path.exists():
            raise FileNotFoundError(
                f"the trace of {card.model_id} is gone ({path}); convert the file again with "
                f"python -m engine.byo trace {card.raw.get('source_file', 'FILE')} --name "
                f"{card.model_id} --overwrite"
            )
        return read_parquet(path, card.model_id)

    def load(self, card: ModelCard):
        raise FamilyError(f"{card.model_id}: the trace came from another tool; there is no network")


FAMILY = ForeignTrace()
