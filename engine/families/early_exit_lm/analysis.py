"""What the language page needs of the early-exit character LM (no streamlit here).

Pages reach the model module through here only: the confidence measures and modes the
controls offer, and ``generate_pair``, a generation under a policy next to the full-depth one
it is judged against.
"""

from __future__ import annotations

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
