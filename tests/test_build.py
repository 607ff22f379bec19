"""``python -m engine.build``: every bundled model builds its results or says in one line why
not, and a model is refused on a data set it was not trained on unless ``--force``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine import build, families
from engine.core import results
from engine.core.family import FamilyError
from engine.registry import get_card, list_cards

ROOT = Path(__file__).resolve().parent.parent
RECORD_FAMILIES = [
    c.model_id for c in list_cards() if not getattr(families.get(c.family), "traces", False)
]


@pytest.mark.parametrize("model_id", RECORD_FAMILIES)
def test_every_non_trace_model_builds_results_or_says_why(model_id, tmp_path):
    out = tmp_path / "r.parquet"
    card = get_card(model_id)
    fam = families.get(card.family)
    try:
        line = build.build(model_id, out, "test", None, False)
    except FamilyError as e:
        msg = str(e)
        assert "\n" not in msg and model_id in msg  # one line, naming the model
        assert fam.results(card) is None  # only models without a swept setting say no
        return
    assert "results" in line
    back = results.read_parquet(out)
    direct = fam.results(card)
    assert back.setting == direct.setting and back.num_samples == direct.num_samples
    assert (back.correct == direct.correct).all()
    assert (back.cost == direct.cost).all()


def test_a_model_is_refused_on_data_it_was_not_trained_on(tmp_path):
    with pytest.raises(FamilyError, match="--force"):
        build.build("mnist_cascade", tmp_path / "t.parquet", "test", "fashion_mnist", False)
    with pytest.raises(FamilyError, match="--force"):
        build.build("mnist_skipnet", tmp_path / "t.parquet", "test", "fashion_mnist", False)


def test_the_cli_gives_one_line_and_exit_code_2_for_what_it_cannot_build(tmp_path):
    for argv in (
        ["no_such_model"],
        ["bbc_char_early_exit_lm"],
        ["mnist_cascade", "--dataset", "fashion_mnist"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "engine.build", *argv, "--out", str(tmp_path / "x.parquet")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "Traceback" not in res.stderr
