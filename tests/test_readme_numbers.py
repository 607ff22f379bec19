"""The README's per-exit claims are the model cards' numbers, word for word: first, best and
last exit are said as they are (a claim such as "74.1 % → 76.5 % over exits" for a model whose
last exit is 75.8 % fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine.registry import get_card

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _row(model_id: str) -> str:
    rows = [ln for ln in README.splitlines() if ln.startswith("|") and f"`{model_id}`" in ln]
    assert rows, f"{model_id} is not in the README's model table"
    return rows[0].split("|")[-2]


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def test_minilm_row_says_first_best_and_last_exit_as_they_are():
    acc = get_card("tweets_multi_exit_minilm").raw["metrics"]["test_accuracy_per_exit"]
    best = int(np.argmax(acc))
    said = _row("tweets_multi_exit_minilm")
    assert f"{pct(acc[0])} at layer 1" in said
    assert f"best {pct(acc[best])} at layer {best + 1}" in said
    assert f"{pct(acc[-1])} at the last (layer {len(acc)})" in said


def test_cnn_rows_list_every_exit():
    said = _row("mnist_multi_exit_cnn")
    for model_id, name in (
        ("mnist_multi_exit_cnn", "MNIST"),
        ("fashion_multi_exit_cnn", "Fashion"),
    ):
        acc = get_card(model_id).raw["metrics"]["test_accuracy"]
        listed = " / ".join(f"{100 * a:.1f}" for a in acc)
        assert re.search(rf"{name} (exits )?{re.escape(listed)} %", said), (name, listed, said)


def test_runtime_claims_name_each_backend_as_tested():
    # PyTorch is bit for bit; ONNX Runtime is said with its tested agreement, not as "exactly"
    assert "agrees with the trace exactly" not in README
    assert "bit for bit" in README and "99.9 %" in README


def test_smollm2_study_table_is_the_shipped_studys_numbers():
    """Each cell "agreement / perplexity" of the SmolLM2 table is the study's summary at that
    number of layers, rounded as written."""
    from engine.families.hf_causal_lm import study

    at = study.load_study().card["summary"]["at_layers"]
    cols = ("exit_fixed", "calm_max_prob", "calm_gate", "skip_middle", "skip_greedy")
    rows = {
        ln.split("|")[1].strip(): ln.split("|")[2:-1]
        for ln in README.splitlines()
        if re.match(r"\| (27|24|18) \|", ln)
    }
    assert set(rows) == {"27", "24", "18"}
    for k, cells in rows.items():
        for method, cell in zip(cols, cells, strict=True):
            agree, ppl = (float(x) for x in cell.split("/"))
            want = at[method][k]
            assert agree == round(want["agreement"], 2), (k, method)
            assert abs(ppl - want["perplexity"]) / want["perplexity"] < 0.05, (k, method)
