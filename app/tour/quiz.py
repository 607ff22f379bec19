""" "Guess first": pick a test image, let the student guess its exit, keep score (pure logic)."""

from __future__ import annotations

import numpy as np


def question_sample(exits: np.ndarray, q: int, seed: int = 0) -> int:
    """Index of the sample shown for question ``q``: cycles through the exits that some samples
    take (in a shuffled order), so easy and hard inputs alternate, random within each exit."""
    exits = np.asarray(exits)
    taken = [k for k in np.unique(exits)]
    order = np.random.default_rng(seed).permutation(len(taken))
    bucket = np.flatnonzero(exits == taken[order[q % len(taken)]])
    return int(np.random.default_rng([seed, q]).choice(bucket))


def score(answers: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(right, asked) from {question: (guessed exit, true exit)}."""
    right = sum(1 for guess, truth in answers.values() if guess == truth)
    return right, len(answers)


def record(answers: dict[int, tuple[int, int]], q: int, guess: int, truth: int) -> bool:
    """Store the first answer to question ``q`` (later changes do not count); True if right."""
    answers.setdefault(q, (int(guess), int(truth)))
    return answers[q][0] == answers[q][1]
