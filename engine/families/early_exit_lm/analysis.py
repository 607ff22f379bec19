"""What the language page needs of the early-exit character LM (no streamlit here).

Pages reach the model module through here only: the confidence measures and modes the
controls offer, and ``generate_pair``, a generation under a policy next to the full-depth one
it is judged against.
"""

from __future__ import annotations

import numpy as np

from engine.core import costs
from engine.families.early_exit_lm import model as lm

MEASURES = lm.MEASURES
MODES = lm.MODES


def generate_pair(
    model: lm.EarlyExitLM, prompt: str, n: int, measure: str, mode: str, threshold: float
) -> tuple[lm.Generation, lm.Generation]:
    """(``n`` characters after ``prompt`` with per-token exits or skips at ``threshold`` on
    ``measure``, the same ``n`` characters at full depth)."""
    policy = lm.ExitPolicy(measure=measure, threshold=threshold, mode=mode)
    early = lm.generate(model, prompt, n, policy)
    full = lm.generate(model, prompt, n, lm.ExitPolicy(measure=None))
    return early, full


# --- the time axis: what a generation and the card's policies take on this machine -----------
#
# This decoder writes every layer's K/V for every token (CALM's propagation), and the cost of
# asking a confidence here is mostly the step's own bookkeeping (its head is only 128 x 100),
# so every measure's ask counts one "read" of the profile (``engine.families.early_exit_lm.timing``).


def _asked(layers: np.ndarray, exit_layer: np.ndarray, n: int, mode: str, threshold: float):
    if threshold > 1.0:
        return np.zeros(len(layers))
    if mode == "exit":
        return costs.asked_reads(exit_layer, n)
    return np.maximum(layers - 1, 0)  # skip mode asks after every layer it runs but the last


def generation_ms(
    model: lm.EarlyExitLM, g: lm.Generation, profile, unit: str, mode: str, threshold: float
) -> float:
    """Mean ms per generated character that the profile predicts for ``g``, the first (from
    the prompt's prefill) left out."""
    n = model.n_layer
    layers = np.asarray(g.layers_run[1:], dtype=np.float64)
    if not len(layers):
        return float("nan")
    e = np.asarray(g.exit_layer[1:])
    return float(
        costs.decode_ms(profile, unit, layers, _asked(layers, e, n, mode, threshold)).mean()
    )


def sweep_ms(sweep: list[dict], profile, unit: str, n_layer: int) -> list[float]:
    """Per sweep point of the card (teacher-forced, mean layers per token only), its ms per
    token: a read counted at every layer run, which overstates a policy by at most one read
    per token (a full-depth token is not asked at its last layer)."""
    out = []
    for p in sweep:
        layers = p["fraction"] * n_layer
        asked = 0.0 if p["threshold"] > 1 else layers - (p["mode"] == "skip")
        out.append(float(costs.decode_ms(profile, unit, layers, asked)))
    return out


def static_ms(profile, unit: str, n_layer: int) -> np.ndarray:
    """[L] ms per token when every token exits after layer k (nothing asked)."""
    return costs.decode_ms(profile, unit, np.arange(1, n_layer + 1))
