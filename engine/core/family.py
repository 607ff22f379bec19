"""The one interface every family of dynamic network implements.

The app, the compare page, the results CLI, the trainer dispatch and the registry see families
only through this class, as llm-transparency-tool's app sees only its ``TransparentLlm``: adding
a family is one folder ``engine/families/<name>/`` whose ``family.py`` defines ``FAMILY``, plus
one test file. Nothing outside that folder names it.

A family says what it is (name, kind, title, the knob it sweeps), how to build a network from a
model card's config, where its trainer is, how to run one input live and say what it decided and
spent, and how to produce its per-sample results (``engine.core.results.Results``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from torch import nn

if TYPE_CHECKING:
    from engine.core.progress import Progress
    from engine.core.results import Results
    from engine.registry import ModelCard

# exit: multi-exit classifier (a Trace); cascade: a chain of models (a Trace); skip: per-input
# layer skipping; halt: adaptive computation time; route: mixture of experts; lm: token-level
# early exit in a language model
Kind = Literal["exit", "cascade", "skip", "halt", "route", "lm"]
KINDS: tuple[str, ...] = ("exit", "cascade", "skip", "halt", "route", "lm")


class FamilyError(RuntimeError):
    """A family cannot do what was asked (no results for this model, unknown family...)."""


@dataclass(frozen=True)
class LiveRun:
    """What one input made the model decide and spend, from a real (early-terminating) run."""

    prediction: int
    confidence: float  # probability of the prediction
    cost: float  # compute actually spent (FLOPs, counted by torch)
    full_cost: float  # compute of the full model on this input
    decision: str  # in words: "exit 2 of 4", "ran 3 of 8 blocks", "halted after 5 steps"
    steps: np.ndarray  # [M] per exit / block / step: the family's score (confidence, halting)
    ran: np.ndarray  # [M] bool: was that exit / block / step really computed
    probs: np.ndarray | None = None  # [M, C] class probabilities after each step, where known
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """A piece of work the profiler times as the difference of two runs of the model's own
    code (``run`` does it ``units`` times more than ``baseline``), so what it measures is what
    the real decoding pays, bookkeeping included."""

    run: Callable[[], object]
    baseline: Callable[[], object]
    units: int


@dataclass(frozen=True)
class Timed:
    """What the profiler (``engine.run.profile``) times for one model at one batch size:
    ``run(i)`` does point i's real work on one prepared batch of ``batch`` inputs.

    ``axis`` "exit": point k runs stages and heads 0..k (the cumulative cost of deciding at exit
    k, as a trace counts it); "setting": point i runs the model at setting ``points[i]``;
    "layers" (a decoder): point i is one KV-cached decode step of the batch's next token that
    runs ``points[i]`` layers. ``parts``: named pieces of work timed beside the points (a
    decoder's confidence read, its K/V fill), each kept per sample and unit.
    """

    axis: str
    points: np.ndarray  # [M] exit index, setting value or layer count
    run: Callable[[int], object]
    batch: int
    parts: dict[str, Part] = field(default_factory=dict)


class Family:
    """Base class of a family; each ``engine/families/<name>/family.py`` defines ``FAMILY``."""

    name: str = ""  # the cards' "family" field and the folder's name
    kind: Kind = "exit"
    title: str = ""  # the method as the app names it: "pondering (ACT)"
    paper: str = ""  # defining work, for the app's help text
    setting: str = "threshold"  # the knob its results sweep
    step_name: str = "exit"  # what one unit of its compute is called (exit, block, step, expert)
    trainer: str | None = "train"  # engine.families.<name>.<trainer>.main(argv), None if none
    about: str = ""  # how the method works, in two or three sentences, for its page
    setting_help: str = ""  # what the knob does
    untimed: str = ""  # why timing its settings is not meaningful, in one line (the profiler)
    profile_batch: int = 256  # the profiler's batch size besides 1 (a decoder: sequences)
    traces: bool = False  # results are a multi-exit Trace (``TraceFamily``: trace(card, ...))
    # why ``python -m engine.build MODEL --ray`` cannot build this family (None: it can)
    not_on_ray: str | None = (
        "its results come from the per-step records its trainer stored; there is no "
        "per-sample model run to shard"
    )

    def build(self, config: dict) -> nn.Module:
        """An untrained network of this family with the card's config."""
        raise NotImplementedError

    def load(self, card: ModelCard) -> nn.Module:
        """The card's network ready to run (eval mode): by default built from its config with
        the card's SHA-checked weights; a pretrained family loads its own files instead."""
        from engine.registry import verified_weights

        model = self.build(card.config)
        model.load_state_dict(verified_weights(card))
        return model.eval()

    def results(self, card: ModelCard) -> Results | None:
        """Per-sample results over the family's setting, from shipped or cached files (no model
        run); None when this model has no setting to sweep. Raises FileNotFoundError when they
        must be built first (the message says how)."""
        return None

    def build_results(self, card: ModelCard, progress: Progress | None = None) -> Path:
        """Run the model on its test split and write the file ``results`` reads; returns
        its path. ``progress`` (``engine.core.progress``) hears how far it has got."""
        raise FamilyError(
            f"{card.model_id}: the {self.title or self.name} family writes its results when it "
            f"is trained ({card.raw.get('training_command', 'python -m engine.train')})"
        )

    def trace_inputs(self, card: ModelCard, split: str = "test", dataset: str | None = None):
        """What ``trace`` runs the model on (``run_exits`` over prepared inputs, batch by
        batch): an ``engine.run.trace_build.TraceInputs`` (not imported here: that module
        loads families), so that other processes can run it (``engine.run.ray_build``)."""
        raise FamilyError(f"{card.model_id} cannot be built on Ray: {self.not_on_ray}")

    def rebuilt_for_compare(self, card: ModelCard) -> bool:
        """Whether ``python -m engine.compare_sources build`` re-runs this model (its results
        need a model run per setting, too slow for the page)."""
        return False

    def run_one(
        self, model: nn.Module, card: ModelCard, x: np.ndarray | str, value: float
    ) -> LiveRun:
        """Run one input for real at setting ``value``; ``x`` is what ``live_input`` names (an
        image, a ``parse_live`` result, a text)."""
        raise FamilyError(f"{self.title or self.name}: no live run")

    def record(self, card: ModelCard, i: int, value: float) -> LiveRun:
        """Stored sample ``i`` of the results at setting ``value``, in the form of a live run."""
        raise FamilyError(f"{self.title or self.name}: no stored per-step records")

    def parse_live(self, card: ModelCard, text: str) -> np.ndarray:
        """A typed input (``live_input() == "bits"``) as the model's input; ValueError says what
        is wrong."""
        raise ValueError("this model takes no typed input")

    def timed(self, card: ModelCard, model: nn.Module, batch: int) -> Timed:
        """The real work per exit or setting on ``batch`` of the model's inputs, for the
        profiler; a family where timing a setting is not meaningful raises ``FamilyError``
        saying why, in one line."""
        raise FamilyError(self.untimed or f"{self.title or self.name}: no timing of its settings")

    def sort_key(self, card: ModelCard) -> float:
        """Order of a data set's models of this family (e.g. by ponder cost)."""
        return 0.0

    def live_input(self, card: ModelCard) -> str | None:
        """What ``run_one`` takes, for the app: "image" (uint8 [28, 28]), "bits" ("+-0"
        string), "text", or None when the family has no live run."""
        return None

    def inputs(self, card: ModelCard):
        """The model's own evaluation inputs when they come with its card (a user's model:
        ``x`` [N, *input_shape] float32 and labels ``y`` [N], row i = sample id i), for the
        inspector; None when its inputs are one of the app's data sets."""
        return None

    def default_setting(self, card: ModelCard) -> float:
        """The setting the model was trained or shipped at."""
        return 0.5

    def label(self, card: ModelCard, siblings: int = 1) -> str:
        """The method's name for one model; the model id is added when a data set has several
        models of one family (e.g. ACT at three ponder costs)."""
        return self.title if siblings <= 1 else f"{self.title} · {card.model_id}"
