"""The tuned lens: an untrained one is the logit lens, training beats the logit lens on held-out
text, the file round-trips, ExitRule can read through it, and the shipped card's numbers are
what its translators give.

Fast tests on the tiny random Llama of test_hf_causal_lm; the slow one on SmolLM2-135M.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.core.training import save_model  # noqa: E402
from engine.families.hf_causal_lm import analysis as A  # noqa: E402
from engine.families.hf_causal_lm import model as M  # noqa: E402
from engine.families.hf_causal_lm import train_lens as T  # noqa: E402
from engine.families.hf_causal_lm import tuned_lens as TL  # noqa: E402
from engine.registry import RegistryError, list_cards  # noqa: E402
from tests.test_hf_causal_lm import N_LAYER, VOCAB, lm, prompts, tiny_dir  # noqa: E402, F401

torch.set_num_threads(1)


def _lens(lm, rank=8) -> TL.TunedLens:  # noqa: F811
    return TL.TunedLens(TL.TunedLensConfig(lm.n_layer, lm.hidden_size, rank, "tiny"))


def texts(n, seed, length=24):
    """Token sequences with structure a translator can learn (a repeated random pattern)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pat = torch.randint(0, VOCAB, (6,), generator=g).tolist()
        out.append((pat * (length // 6 + 1))[:length])
    return out


@pytest.fixture(scope="module")
def trained(lm):  # noqa: F811
    """Translators trained on 40 sequences over the whole (tiny) vocabulary."""
    torch.manual_seed(0)
    states, final_mass, lens_mass = T.cache_states(lm, texts(40, 0))
    vocab = T.training_vocab(final_mass, lens_mass, VOCAB)
    lens = _lens(lm)
    losses = T.fit(lm, lens, states, vocab, epochs=30, batch=128, lr=1e-2, seed=0)
    return lens.eval().requires_grad_(False), losses


def test_an_untrained_tuned_lens_is_the_logit_lens_exactly(lm):  # noqa: F811
    lens = _lens(lm)
    ids = prompts(1, seed=3)[0] + [1, 2, 3]
    a, b = A.logit_lens(lm, ids), A.logit_lens(lm, ids, lens)
    for f in ("agreement", "kl", "nll", "top1", "max_prob"):
        assert (getattr(a, f) == getattr(b, f)).all(), f
    h = torch.randn(5, lm.hidden_size)
    for j in range(lm.n_layer):
        assert torch.equal(TL.read(lm, h, j, lens), lm.logits(h))
    assert torch.equal(lens.translate(h, lm.n_layer - 1), h)  # the last layer: no translator


def test_the_training_loss_is_kl_from_the_final_layer_to_each_lens(tiny_dir):  # noqa: F811
    """The loss (lr 0: no step) is sum over layers of KL(final || lens_l), as the comparison
    measures it, and not the reverse KL. The random model's distributions are near uniform,
    where the two KLs agree; a 40x head and a random bias make them peaked and apart (~7 %)."""
    lm = M.load(tiny_dir)  # noqa: F811
    with torch.no_grad():
        lm.hf.lm_head.weight.mul_(40)
    seqs = texts(6, seed=5)
    states, final_mass, lens_mass = T.cache_states(lm, seqs)
    vocab = T.training_vocab(final_mass, lens_mass, VOCAB)  # the whole tiny vocabulary
    lens = _lens(lm)
    with torch.no_grad():
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=torch.Generator().manual_seed(1)))
    loss = T.fit(lm, lens, states, vocab, epochs=1, batch=10_000, lr=0.0, seed=0)[0]
    lens.eval().requires_grad_(False)
    per_text = [A.logit_lens(lm, s, lens) for s in seqs]
    n = sum(len(s) for s in seqs)
    want = sum(float(r.kl[:-1].sum()) * len(s) for r, s in zip(per_text, seqs, strict=True)) / n
    assert loss == pytest.approx(want, rel=1e-2)  # states are cached in float16


def test_training_lowers_held_out_kl_below_the_logit_lens(lm, trained):  # noqa: F811
    lens, losses = trained
    assert losses[-1] < losses[0]
    df = TL.compare(lm, lens, texts(8, seed=1), "tiny", max_len=24)  # unseen patterns
    kl = {
        name: df.filter(df["lens"] == name).sort("layer")["kl"].to_list()
        for name in ("logit", "tuned")
    }
    assert kl["tuned"][-1] == pytest.approx(kl["logit"][-1])  # the last layer is the output
    for j in range(N_LAYER - 1):
        assert kl["tuned"][j] < 0.9 * kl["logit"][j], (j, kl)
    assert set(df["lens"]) == {"logit", "tuned"} and df.height == 2 * N_LAYER


def test_train_is_the_shipped_recipe_on_given_token_ids(lm, trained):  # noqa: F811
    """``train_lens.train`` (what a user's model is trained with) is the steps the fixture
    takes by hand, rounded, and reports each step (the page's bar adds the time left)."""
    lens, losses = trained
    seen = []
    torch.manual_seed(0)
    cfg = TL.TunedLensConfig(lm.n_layer, lm.hidden_size, 8, "tiny")
    got, info = T.train(
        lm, texts(40, 0), cfg, VOCAB, 30, 128, 1e-2, 0, None, lambda w, f: seen.append((w, f))
    )
    assert info["train_kl_sum_per_epoch"] == losses and info["tokens"] == 40 * 24
    for k, v in lens.rounded().state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert len(seen) == 30 * 8 and seen[-1] == ("training the tuned lens", 1.0)


def test_save_and_load_round_trip_bit_for_bit(lm, trained, tmp_path):  # noqa: F811
    lens, _ = trained
    card = {
        "model_id": TL.card_id("tiny"),
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.tuned_lens",
        "config": TL.config_dict(lens.cfg),
    }
    save_model(copy.deepcopy(lens).half(), card, tmp_path)
    back = TL.load(TL.lens_card("tiny", tmp_path))
    want = lens.rounded()
    for k, v in want.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert torch.equal(back.rounded().state_dict()["up"], want.state_dict()["up"])  # idempotent
    assert back.cfg == lens.cfg
    # a changed file is refused (the card's SHA-256)
    p = tmp_path / f"{TL.card_id('tiny')}.json"
    raw = json.loads(p.read_text())
    raw["weights_sha256"] = "0" * 64
    p.write_text(json.dumps(raw))
    with pytest.raises(RegistryError, match="SHA-256"):
        TL.load(TL.lens_card("tiny", tmp_path))


def test_exit_rule_reads_confidence_through_the_lens(lm, trained):  # noqa: F811
    lens, _ = trained
    ps = texts(6, seed=2, length=12)
    default = [A.generate(lm, p, 8, A.ExitRule("max_prob", 0.006)) for p in ps]
    explicit = [A.generate(lm, p, 8, A.ExitRule("max_prob", 0.006, lens=None)) for p in ps]
    tuned = [A.generate(lm, p, 8, A.ExitRule("max_prob", 0.006, lens=lens)) for p in ps]
    assert [g.exit_layer for g in default] == [g.exit_layer for g in explicit]
    assert [g.confidence for g in default] == [g.confidence for g in explicit]
    assert [g.exit_layer for g in tuned] != [g.exit_layer for g in default]
    # the second token (same context for both: the first comes from the full-depth prefill)
    # exits where its confidence through the tuned lens says
    assert [g.exit_layer[1] for g in tuned] != [g.exit_layer[1] for g in default]
    # the untrained lens exits exactly where the logit lens does
    same = [A.generate(lm, p, 8, A.ExitRule("max_prob", 0.006, lens=_lens(lm))) for p in ps]
    assert [g.tokens for g in same] == [g.tokens for g in default]
    assert [g.exit_layer for g in same] == [g.exit_layer for g in default]
    h = torch.randn(lm.hidden_size)
    want = float(torch.softmax(lens.logits(lm, h, 0), -1).max())
    assert A.confidence(lm, h, h, "max_prob", lens, 0) == pytest.approx(want)
    with pytest.raises(ValueError, match="pass its layer"):
        A.confidence(lm, h, h, "max_prob", lens)
    _, tuned_c = A.ExitRule("max_prob", 0.006, lens=lens).stop(lm)(0, h, h)
    _, logit_c = A.ExitRule("max_prob", 0.006).stop(lm)(0, h, h)
    assert tuned_c == pytest.approx(want) and tuned_c != logit_c


def test_the_lens_card_is_not_a_model_the_registry_lists():
    assert TL.card_id("smollm2_135m") not in {c.model_id for c in list_cards()}
    with pytest.raises(RegistryError, match="no model"):
        TL.lens_card("no_such_model")


# --- progress on the command line ------------------------------------------------------------


class Shown:
    """A Progress (engine.core.progress) that keeps every call and what is shown beside it."""

    def __init__(self):
        self.calls, self.shown = [], []

    def __call__(self, done, total, label):
        self.calls.append((done, total, label))

    def show(self, label, values):
        self.shown.append((label, values))


@pytest.mark.parametrize("quiet", [False, True])
def test_the_lens_command_reports_to_the_terminal_sink(lm, monkeypatch, tmp_path, quiet):  # noqa: F811
    """``python -m engine.families.hf_causal_lm.train_lens [--quiet]``: the states, every
    translator step (with its KL per layer) and the comparison go to the sink
    ``engine.core.progress.terminal(quiet)`` gives, as every other command's do (the tiny
    Llama stands in for SmolLM2; the comparison's held-out news is not read)."""
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    sink, got = Shown(), {}

    def terminal(quiet=False):
        got["quiet"] = quiet
        return sink

    def comparisons(lm, lens, max_tokens, max_len, progress=None):
        got["comparison"] = progress
        return {}

    monkeypatch.setattr(T, "terminal", terminal)
    monkeypatch.setattr(T, "load_smollm2", lambda: lm)
    monkeypatch.setattr(T, "training_ids", lambda lm, tokens, seq_len, seed: texts(6, 0))
    monkeypatch.setattr(T, "comparisons", comparisons)
    argv = ["--rank", "4", "--epochs", "2", "--batch", "64", "--out-dir", str(tmp_path)]
    T.main(argv + ["--quiet"] * quiet)
    assert got == {"quiet": quiet, "comparison": sink}
    steps = 2 * -(-6 * 24 // 64)
    bars = {}
    for done, total, label in sink.calls:
        bars.setdefault(label, [total]).append(done)
    assert bars == {"states (texts)": [6, *range(7)], "translators": [steps, *range(steps + 1)]}
    assert len(sink.shown) == steps and {lab for lab, _ in sink.shown} == {"translators"}
    assert all(v["kl_per_layer"] >= 0 for _, v in sink.shown)


# --- the shipped lens ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_shipped_lens_reproduces_its_cards_numbers():
    """Recompute the card's small slice with the shipped translators (SHA-checked)."""
    card = TL.lens_card("smollm2_135m")
    lens = TL.load(card)
    real = M.load_smollm2()
    stored = TL.lens_comparison(card, "slice")
    for ds, (k, max_len) in card.raw["metrics"]["slice"]["texts"].items():
        got = TL.compare(real, lens, TL.held_out(ds)[:k], ds, max_len)
        want = stored.filter(stored["dataset"] == ds)
        assert got["tokens"].to_list() == want["tokens"].to_list()
        for col in ("agreement", "kl", "perplexity"):
            assert got[col].to_list() == pytest.approx(want[col].to_list(), rel=1e-3, abs=1e-4)
    full = TL.lens_comparison(card)
    assert set(full["dataset"]) == set(TL.DATASETS) and set(full["lens"]) == {"logit", "tuned"}
    mid = full.filter(full["layer"] == real.n_layer // 2)
    for ds in TL.DATASETS:  # the point of the tuned lens: it reads the middle layers better
        d = mid.filter(mid["dataset"] == ds)
        kl = dict(zip(d["lens"], d["kl"], strict=True))
        assert kl["tuned"] < kl["logit"]
