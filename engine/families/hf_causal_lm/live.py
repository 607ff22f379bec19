"""One live generation for the language page: a decoding setting in, everything the page shows
out (the tokens and what each cost, the full model's greedy answer, agreement, the logit lens
over the text), so the page only lays out and the app caches one call per setting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.families.hf_causal_lm import analysis as A
from engine.families.hf_causal_lm.model import (
    CausalLM,
    Fill,
    LoadError,
    chat_ids,
    decode,
    encode,
)

__all__ = ["LoadError", "chat_ids"]  # for the app, which does not import model modules

Mode = Literal["exit", "skip", "speculate"]
MODES: tuple[Mode, ...] = ("exit", "skip", "speculate")
LensName = Literal["logit", "tuned"]
LENSES: tuple[LensName, ...] = ("logit", "tuned")
SKIP_PATTERNS = ("middle", "evenly", "chosen")
# Every live generation also runs the full model's greedy answer and the logit lens over the
# text (one step per token, layer by layer): a longer prompt keeps a CPU busy for too long.
MAX_PROMPT_TOKENS = 384


@dataclass(frozen=True)
class Setting:
    """How to decode: per-token early exit, a static skip set, or self-speculation."""

    mode: Mode = "exit"
    measure: str = "max_prob"
    threshold: float = 0.9
    min_layer: int = 0  # no exit before this layer (0-based)
    fill: Fill = "propagate"
    skip: tuple[int, ...] = ()
    draft_len: int = 4
    draft_exit: int = 8
    max_new_tokens: int = 32
    # early exit: read the confidence and the exiting token through the logit lens or the
    # model's tuned lens (a name, so the setting stays a small cache key; ``run`` gets the lens)
    lens: LensName = "logit"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; one of {MODES}")
        if self.lens not in LENSES:
            raise ValueError(f"unknown lens {self.lens!r}; one of {LENSES}")


def check_prompt(text: str, ids: Sequence[int]) -> None:
    """ValueError with a message for the reader when a prompt cannot be run live."""
    if not text.strip():
        raise ValueError("the prompt is empty: type a question or the start of a text")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise ValueError(
            f"the prompt is {len(ids)} tokens with the chat template; at most "
            f"{MAX_PROMPT_TOKENS} run live here: shorten it"
        )


def skip_set(n_layer: int, pattern: str, n_skip: int, chosen: Sequence[int] = ()) -> tuple:
    """The layers a skip pattern leaves out (analysis.middle_block / evenly_spaced, or a list)."""
    if pattern == "middle":
        return A.middle_block(n_layer, n_skip)
    if pattern == "evenly":
        return A.evenly_spaced(n_layer, n_skip)
    if pattern == "chosen":
        return tuple(sorted({int(j) for j in chosen}))
    raise ValueError(f"unknown skip pattern {pattern!r}; one of {SKIP_PATTERNS}")


@dataclass
class LiveResult:
    setting: Setting
    n_layer: int
    prompt: list[int]
    prompt_pieces: list[str]  # each prompt token's text
    tokens: list[int]
    pieces: list[str]  # each generated token's text
    exit_layer: list[int]  # per token: the layer whose state chose it
    layers_run: list[int]  # per token: layers its step ran (lazy catch-up rows included)
    confidence: list[float]  # the exit rule's score at the exit (NaN: full depth / none)
    prob: list[float]  # the token's probability where it was chosen (NaN: not recorded)
    seconds: float
    reference: list[int]  # the full model's greedy tokens
    reference_text: str
    reference_seconds: float
    quality: A.GenerationQuality
    lens_max_prob: np.ndarray  # [L, n]: each layer's top probability, predicting each token
    lens_agrees: np.ndarray  # [L, n]: each layer's top-1 equals the last layer's
    prefill_seconds: float = 0.0  # of ``seconds``, the prompt's prefill (0: not measured)
    drafted: int = 0  # self-speculation only
    accepted: int = 0
    rounds: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def mean_layers(self) -> float:
        return float(np.mean(self.layers_run)) if self.layers_run else math.nan

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else math.nan

    @property
    def reference_tokens_per_s(self) -> float:
        n = len(self.reference)
        return n / self.reference_seconds if self.reference_seconds > 0 else math.nan

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def equals_greedy(self) -> bool:
        return self.tokens == self.reference


def token_pieces(lm: CausalLM, tokens: Sequence[int]) -> list[str]:
    """Each token's own text, special tokens (the chat template's) included; a multi-byte
    character split over tokens shows as �."""
    if lm.tokenizer is None:
        return [decode(lm, [t]) for t in tokens]
    return [lm.tokenizer.decode([int(t)], skip_special_tokens=False) for t in tokens]


def message_positions(lm: CausalLM, ids: Sequence[int]) -> range:
    """Where the user's message sits in its chat-template prompt ``ids``: what is left after
    the template's own prefix and suffix (those of an empty message)."""
    empty = chat_ids(lm, "")
    ids = list(ids)
    pre = next((i for i, (a, b) in enumerate(zip(ids, empty, strict=False)) if a != b), 0)
    rev = zip(reversed(ids), reversed(empty), strict=False)
    suf = next((i for i, (a, b) in enumerate(rev) if a != b), 0)
    return range(pre, max(pre, len(ids) - suf))


def neutral_id(lm: CausalLM) -> int:
    """The attribution baseline: a space token (an end-of-text token as baseline made the
    integral so uneven that 64 steps left a convergence delta larger than the logit change)."""
    ids = encode(lm, " ") if lm.tokenizer is not None else []
    return int(ids[0]) if len(ids) == 1 else 0


def read_layers(lm: CausalLM, prompt: list[int], tokens: Sequence[int]):
    """The logit lens over prompt + tokens, at the positions that predict the tokens: ([L, n]
    top probability per layer, [L, n] does the layer's top-1 equal the last layer's)."""
    lens = A.logit_lens(lm, [*prompt, *tokens])
    cols = slice(len(prompt) - 1, len(prompt) - 1 + len(tokens))  # position t predicts t + 1
    top1 = lens.top1[:, cols]
    return lens.max_prob[:, cols], top1 == top1[-1:]


def run(lm: CausalLM, prompt: Sequence[int], s: Setting, tuned=None) -> LiveResult:
    """Decode ``prompt`` as ``s`` says, next to the full model's greedy decoding. ``tuned``:
    the model's tuned lens (``tuned_lens.TunedLens``), needed when ``s.lens`` is "tuned"."""
    if s.mode == "exit" and s.lens == "tuned" and tuned is None:
        raise ValueError("this model has no tuned lens to read the confidence through")
    prompt = [int(i) for i in prompt]
    n, n_new = lm.n_layer, int(s.max_new_tokens)
    ref = A.generate(lm, prompt, n_new)
    extra = {}
    if s.mode == "speculate":
        sp = A.self_speculate(lm, prompt, n_new, s.draft_len, exit_layer=int(s.draft_exit))
        tokens, seconds = sp.tokens, sp.seconds
        exits, run_ = [n - 1] * len(tokens), [n] * len(tokens)
        conf = prob = [math.nan] * len(tokens)
        extra = dict(drafted=sp.drafted, accepted=sp.accepted, rounds=sp.rounds)
    else:
        if s.mode == "exit":
            lens = tuned if s.lens == "tuned" else None
            rule = A.ExitRule(s.measure, s.threshold, s.min_layer, lens=lens)
            g = A.generate(lm, prompt, n_new, rule=rule, fill=s.fill)
        else:
            g = A.generate(lm, prompt, n_new, skip=s.skip)
        tokens, seconds = g.tokens, g.seconds
        exits, run_, conf, prob = g.exit_layer, g.layer_rows, g.confidence, g.prob
        extra = dict(prefill_seconds=g.prefill_seconds)
    quality = A.generation_quality(lm, prompt, tokens, ref.tokens)
    max_prob, agrees = read_layers(lm, prompt, tokens)
    return LiveResult(
        setting=s,
        n_layer=n,
        prompt=prompt,
        prompt_pieces=token_pieces(lm, prompt),
        tokens=list(tokens),
        pieces=token_pieces(lm, tokens),
        exit_layer=list(exits),
        layers_run=list(run_),
        confidence=list(conf),
        prob=list(prob),
        seconds=seconds,
        reference=list(ref.tokens),
        reference_text=decode(lm, ref.tokens),
        reference_seconds=ref.seconds,
        quality=quality,
        lens_max_prob=max_prob,
        lens_agrees=agrees,
        **extra,
    )


def lens_exits(max_prob: np.ndarray, threshold: float, min_layer: int = 0) -> np.ndarray:
    """[n] per token, the first layer >= ``min_layer`` whose logit-lens max-prob reaches
    ``threshold`` (the last layer if none does): where a max-prob exit rule would stop it,
    teacher-forced."""
    hit = np.asarray(max_prob) >= threshold
    hit[:min_layer] = False
    hit[-1] = True
    return hit.argmax(0)


@dataclass(frozen=True)
class AnswerLens:
    """The full model's greedy answer, read at every layer (teacher-forced)."""

    pieces: list[str]  # each answer token's text
    max_prob: np.ndarray  # [L, n]: each layer's top probability, predicting each token
    agrees: np.ndarray  # [L, n]: each layer's top-1 equals the last layer's


def answer_lens(lm: CausalLM, prompt: Sequence[int], n: int) -> AnswerLens:
    prompt = [int(i) for i in prompt]
    tokens = A.greedy(lm, prompt, n)
    return AnswerLens(token_pieces(lm, tokens), *read_layers(lm, prompt, tokens))
