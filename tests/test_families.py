"""The Family interface, for every family folder and every bundled model: discovery, building
from the card, and one live run per model that says what it decided and spent — and agrees with
the family's stored results or trace where there is one."""

from __future__ import annotations

import numpy as np
import pytest

from engine import families
from engine.core.family import KINDS, Family, LiveRun
from engine.core.policies import Policy, exit_index
from engine.data import gallery
from engine.registry import list_cards
from engine.trace_store import load_trace

CARDS = list_cards()


def test_every_family_folder_is_discovered_and_every_card_has_its_family():
    names = families.family_names()
    assert {"act", "act_cnn", "pondernet", "multi_exit_cnn", "skipnet", "moe"} <= set(names)
    for fam in families.all_families():
        assert isinstance(fam, Family) and fam.kind in KINDS and fam.title
    for card in CARDS:
        assert families.get(card.family).name == card.family
    with pytest.raises(families.FamilyError, match="unknown model family"):
        families.get("no_such_family")


def _input(card, fam):
    kind = fam.live_input(card)
    if kind == "image":
        t = gallery.test_images(card.dataset)
        return t.data.images[0], int(t.indices[0])
    if kind == "bits":
        return fam.parse_live(card, "+-0+0-0++0-0"[: card.config["num_bits"]]), None
    if kind == "text":
        return "the match was a great win for the home side", None
    return None, None


@pytest.mark.parametrize("model_id", [c.model_id for c in CARDS])
def test_one_live_run_per_model(model_id):
    card = next(c for c in CARDS if c.model_id == model_id)
    fam = families.get(card.family)
    x, sample = _input(card, fam)
    if x is None:
        pytest.skip(f"{fam.name} takes no live input")
    try:
        model = families.load_model(model_id)
    except Exception as e:  # a backbone package missing here
        pytest.skip(f"{model_id} cannot be loaded here: {e}")
    run = fam.run_one(model, card, x, fam.default_setting(card))
    assert isinstance(run, LiveRun) and run.decision
    assert run.cost > 0 and (np.isnan(run.full_cost) or run.cost <= run.full_cost * (1 + 1e-9))
    assert run.ran.dtype == bool and run.ran.any()
    if getattr(fam, "traces", False) and sample is not None:
        # the live exit is the trace's exit for the same test image at the same threshold
        trace = load_trace(model_id, build_if_missing=False)
        row = int(np.flatnonzero(trace.sample_id == sample)[0])
        want = exit_index(trace, Policy("max_prob", threshold=fam.default_setting(card)))[row]
        assert run.detail["exit"] == want
        assert run.cost == pytest.approx(trace.cost[row, want])


def test_skipnet_live_run_is_its_stored_record():
    card = next((c for c in CARDS if c.family == "skipnet"), None)
    if card is None:
        pytest.skip("no SkipNet bundled")
    fam = families.get("skipnet")
    res = fam.results(card)
    t = gallery.test_images(card.dataset)
    row = int(np.flatnonzero(res.sample_id == int(t.indices[0]))[0])
    i = res.index_of(fam.default_setting(card))
    run = fam.run_one(families.load_model(card.model_id), card, t.data.images[0], res.settings[i])
    assert run.prediction == res.pred[i, row]
    assert int(run.ran.sum()) == res.detail["blocks run"][i, row]
    assert run.cost == pytest.approx(res.cost[i, row])
