"""The layer-skipping versus early-exit study: records, simulated exits, curves, gate, oracle.

Fast tests on the tiny random Llama of test_hf_causal_lm (no download); the shipped SmolLM2
study is loaded as the page would, and one slow test re-runs one of its passages.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_hf_causal_lm import N_LAYER, VOCAB, MLPRows, tiny_config  # noqa: E402

from engine.families.hf_causal_lm import analysis as A  # noqa: E402
from engine.families.hf_causal_lm import model as M  # noqa: E402
from engine.families.hf_causal_lm import study as S  # noqa: E402

torch.set_num_threads(1)
T = 24
CFG = S.StudyConfig(
    n_eval=4,
    n_tokens=T,
    n_calib=3,
    order_tokens=12,
    max_order=N_LAYER - 1,
    kept_grid=(4, 3, 2),
    prompt_tokens=8,
    gen_tokens=6,
    gate_epochs=50,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama_study")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return M.load(tiny_dir)


def texts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(T)] for _ in range(n)]


class Recorder:
    """A Progress (engine.core.progress) that keeps every (done, total, label)."""

    def __init__(self):
        self.calls: list[tuple[float, float, str]] = []

    def __call__(self, done, total, label):
        self.calls.append((done, total, label))

    def bars(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for done, total, label in self.calls:
            out.setdefault(label, [total]).append(done)
        return out


BUILD_PROGRESS = Recorder()  # what the ``built`` fixture's build reported


@pytest.fixture(scope="module")
def built(lm):
    ev, cal = texts(CFG.n_eval, 1), texts(CFG.n_calib, 2)
    return S.build_study(lm, CFG, ev, cal, progress=BUILD_PROGRESS)


# --- records and the simulated exits ----------------------------------------------------------


@pytest.mark.parametrize("measure", ["max_prob", "margin", "saturation"])
def test_simulated_exits_are_a_real_lazy_generation_s_exits_and_tokens(lm, measure):
    prompt = texts(1, 5)[0][:6]
    rec0, _ = S.sequence_records(lm, prompt + A.greedy(lm, prompt, 40, stop_at_eos=False))
    # half the tokens reach it below the last layer, half never do: mixed exits
    t = float(np.median(rec0.scores(measure)[:, :-1].max(1)))
    g = A.generate(lm, prompt, 40, A.ExitRule(measure, t), fill="lazy", stop_at_eos=False)
    # the records of the generation's own text: its step i read the state at position P + i - 1
    rec, _ = S.sequence_records(lm, prompt + g.tokens)
    sim = S.simulate_exits(rec, measure, t)
    at = np.arange(len(prompt), len(prompt) + len(g.tokens) - 1)
    assert sim.exit_layer[at].tolist() == g.exit_layer[1:]
    assert rec.top1[at, sim.exit_layer[at]].tolist() == g.tokens[1:]
    # layer runs the real run spent, catch-ups included, up to its last fed token
    done = S.lazy_computed(sim.exit_layer[at], np.zeros(len(at), int), N_LAYER)
    assert done.sum() == sum(g.layer_rows[1:])
    assert 0 < (np.array(g.exit_layer) < N_LAYER - 1).sum() < len(g.tokens) - 1  # mixed exits


def test_records_hold_the_logit_lens_and_round_trip_through_parquet(lm, tmp_path):
    ids = texts(1, 7)[0]
    rec, normed = S.sequence_records(lm, ids, seq=3)
    lens = A.logit_lens(lm, ids)
    assert rec.top1.T.tolist() == lens.top1.tolist()
    np.testing.assert_allclose(rec.max_prob.T, lens.max_prob, atol=1e-5)
    full = lm.hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    np.testing.assert_allclose(
        rec.logp_next[:-1, -1], full[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4
    )
    assert np.isnan(rec.logp_next[-1]).all() and rec.agree[:, -1].all()
    assert normed.shape == (T, N_LAYER, lm.hidden_size)
    rec.gate = np.random.default_rng(0).random(rec.top1.shape).astype(np.float32)
    rec.to_frame().write_parquet(tmp_path / "r.parquet")
    back = S.Records.from_frame(pl.read_parquet(tmp_path / "r.parquet"))
    for f in ("seq", "pos", "token", "top1", "max_prob", "margin", "saturation", "gate"):
        np.testing.assert_array_equal(getattr(back, f), getattr(rec, f))
    assert back.tokens(3) == ids


def test_exit_rule_edges_match_the_runtime_rule(built):
    rec = built.records
    full = S.simulate_exits(rec, "max_prob", 1.01)  # never fires: full depth
    assert full.mean_layers == N_LAYER and full.agreement == 1.0
    first = S.simulate_exits(rec, "max_prob", 0.0)  # always fires: the first layer
    assert (first.exit_layer == 0).all()
    late = S.simulate_exits(rec, "max_prob", 0.0, min_layer=2)
    assert (late.exit_layer == 2).all()
    with pytest.raises(ValueError, match="measure"):
        S.simulate_exits(rec, "entropy", 0.5)


# --- curves -----------------------------------------------------------------------------------


def test_curves_cover_every_method_and_are_full_quality_at_full_depth(built):
    c = built.curves
    assert set(c["method"]) == set(S.METHOD_LABELS)
    full_ppl = float(np.exp(-np.nanmean(built.records.logp_next[:, -1])))
    for m in S.METHOD_LABELS:
        cm = c.filter(pl.col("method") == m)
        top = cm.filter(pl.col("layers") == N_LAYER)
        assert top.height >= 1, m
        assert top["agreement"].min() == 1.0, m
        np.testing.assert_allclose(top["perplexity"].to_numpy(), full_ppl, rtol=1e-4)
        if m.startswith("calm_"):  # a higher threshold never exits earlier
            layers = cm.sort("setting")["layers"].to_numpy()
            assert (np.diff(layers) >= -1e-12).all(), m
    ex = c.filter(pl.col("method") == "exit_fixed").sort("layers")
    assert ex["layers"].to_list() == list(range(1, N_LAYER + 1))
    assert ((c["fraction"] - c["layers"] / N_LAYER).abs() < 1e-12).all()
    assert (c["lazy_layers"] >= c["layers"] - 1e-9).all()  # catch-ups only add layer runs


def test_skip_curves_are_the_plans_run_for_real(lm, built):
    ev = texts(CFG.n_eval, 1)
    plan = S.make_plan("skip_middle", 2, N_LAYER)
    assert plan.skip == A.middle_block(N_LAYER, 2)
    qs = [A.evaluate_plan(lm, t, plan.skip) for t in ev]
    row = built.curves.filter((pl.col("method") == "skip_middle") & (pl.col("layers") == 2))
    assert row["agreement"].item() == pytest.approx(np.mean([q.agreement for q in qs]))
    assert row["perplexity"].item() == pytest.approx(np.exp(np.mean([q.nll for q in qs])))
    greedy = S.make_plan("skip_greedy", 2, N_LAYER, built.order)
    assert set(greedy.skip) == set(built.order[:2]) and len(set(built.order)) == N_LAYER - 1


def test_each_plan_family_runs_the_layers_it_names():
    n, order = 30, [9, 4, 21, 7, 15, 3, 11]
    assert S.make_plan("exit_fixed", 5, n) == S.Plan("exit_fixed", 5, (), 4)
    assert S.make_plan("exit_fixed", n, n).exit_layer is None
    mid, even = S.make_plan("skip_middle", 20, n), S.make_plan("skip_even", 20, n)
    assert mid.skip == A.middle_block(n, 10) == tuple(range(10, 20))
    assert even.skip == A.evenly_spaced(n, 10) and mid.skip != even.skip
    assert S.make_plan("skip_greedy", 26, n, order).skip == (4, 7, 9, 21)
    assert S.min_kept("skip_greedy", n, order) == n - len(order)
    with pytest.raises(ValueError, match="keep"):
        S.make_plan("skip_greedy", 20, n, order)


# --- the oracle -------------------------------------------------------------------------------


def test_plan_greedy_is_the_plain_greedy_decoding_of_that_plan(lm):
    prompt = texts(1, 9)[0][:5]
    full = S.Plan("exit_fixed", N_LAYER)
    ref = A.greedy(lm, prompt, 10, stop_at_eos=False)
    assert S.plan_greedy(lm, prompt, 10, full) == ref
    skip = S.make_plan("skip_middle", 3, N_LAYER)
    assert S.plan_greedy(lm, prompt, 10, skip) == A.greedy(
        lm, prompt, 10, skip=skip.skip, stop_at_eos=False
    )
    wrong = [ref[0], (ref[1] + 1) % VOCAB, *ref[2:]]
    assert S.plan_greedy(lm, prompt, 10, full, wrong) == ref[:2]  # stops at the difference


def test_fewest_bisects_a_monotone_predicate():
    calls = []

    def ok(k):
        calls.append(k)
        return k >= 7

    assert S.fewest(ok, 1, 30) == 7 and len(calls) <= 5
    assert S.fewest(lambda k: True, 1, 30) == 1
    assert S.fewest(lambda k: False, 1, 30) == 30  # the full model always suffices


def test_the_oracle_finds_that_only_the_first_two_layers_matter(tiny_dir):
    """Layers 2 and 3 made identity (their output projections zeroed): the residual stream
    passes through untouched, so two layers reproduce the model exactly and one does not."""
    lm2 = M.load(tiny_dir)
    for j in (2, 3):
        lm2.layers[j].self_attn.o_proj.weight.data.zero_()
        lm2.layers[j].mlp.down_proj.weight.data.zero_()
    ev, cal = texts(4, 11), texts(2, 12)
    order = S.skip_order(lm2, [t for c in cal for t in c[:12]], N_LAYER - 1)
    assert set(order[:2]) == {2, 3}
    for ids in ev:
        rec, _ = S.sequence_records(lm2, ids)
        full_nll = float(-np.nanmean(rec.logp_next[:, -1]))
        cfg = S.StudyConfig(prompt_tokens=8, gen_tokens=8, ppl_tolerance=1e-4)
        got = S.sequence_oracle(lm2, ids, order, cfg, full_nll)
        assert got[("greedy", "exit_fixed")] == 2
        assert got[("greedy", "skip_greedy")] == 2
        assert got[("greedy", "skip_middle")] == N_LAYER  # skips layer 1, which matters
        assert min(v for (c, _), v in got.items() if c == "greedy") == 2
        assert min(v for (c, _), v in got.items() if c == "perplexity") <= 2
    table = pl.DataFrame(
        [
            (0, "greedy", "exit_fixed", 2),
            (0, "greedy", "skip_even", 4),
            (1, "greedy", "exit_fixed", 3),
        ]
        + [(0, "perplexity", "exit_fixed", 1), (1, "perplexity", "exit_fixed", 4)],
        schema=["seq", "criterion", "family", "kept"],
        orient="row",
    )
    s = S.summarise_oracle(table, N_LAYER)
    assert s.greedy_fraction == pytest.approx((2 + 3) / 2 / N_LAYER)
    assert s.perplexity_fraction == pytest.approx((1 + 4) / 2 / N_LAYER)
    assert s.per_family["greedy"]["skip_even"] == 1.0


# --- the gate ---------------------------------------------------------------------------------


def test_a_gate_on_separable_features_exits_where_the_per_token_oracle_does():
    n, layers, d = 400, 8, 6

    def toy(seed):
        r = np.random.default_rng(seed)
        first = r.integers(0, layers, n)  # the first layer whose top-1 is final, per token
        ok = np.arange(layers)[None, :] >= first[:, None]
        x = r.normal(size=(n, layers, d)).astype(np.float32)
        x[..., 0] = np.where(ok, 1.0, -1.0) + r.normal(0, 0.2, ok.shape)  # separable
        top1 = np.where(ok, 7, r.integers(8, 50, (n, layers)))
        z = np.zeros((n, layers), np.float32)
        rec = S.Records(layers, np.zeros(n, int), np.arange(n), np.zeros(n, int), top1, z, z, z, z)
        return x, ok, rec

    x, y, _ = toy(1)
    gate = S.train_gate(x, y, hidden=8, epochs=200, seed=0)
    xt, yt, rec = toy(2)
    rec.gate = gate.score(xt)
    assert S.auc(rec.gate, yt) > 0.99
    got = S.simulate_exits(rec, "gate", 0.5)
    oracle = S.token_oracle(rec)
    assert got.agreement > 0.97
    assert abs(got.mean_layers - oracle.mean_layers) < 0.1


def test_auc_is_the_rank_statistic():
    assert S.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert S.auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert S.auc([0.5, 0.5], [0, 1]) == 0.5


# --- saving, loading, and the shipped study ---------------------------------------------------


def test_a_saved_study_loads_back_for_the_page(built, tmp_path):
    card = S.save_study(built, CFG, {"command": "test", "seed": 0}, model_id="tiny", root=tmp_path)
    st = S.load_study(tmp_path / "tiny__study.json")
    assert st.n_layer == N_LAYER and st.config == CFG and st.skip_order == built.order
    assert st.curves.equals(built.curves) and st.curves.columns[:6] == [
        "method",
        "setting",
        "layers",
        "fraction",
        "agreement",
        "perplexity",
    ]
    o = st.simulate("gate", 0.5)
    np.testing.assert_array_equal(
        o.exit_layer, S.simulate_exits(built.records, "gate", 0.5).exit_layer
    )
    assert st.curve("skip_even")["layers"].is_sorted()
    assert card["summary"]["oracle"]["reference_fraction"] == S.GLAVAS_ORACLE_FRACTION
    with pytest.raises(FileNotFoundError, match="build it with"):
        S.load_study(tmp_path / "nothing")


def test_the_shipped_smollm2_study_is_complete():
    st = S.load_study()
    cfg = st.config
    assert st.n_layer == 30 and st.records.n_sequences == cfg.n_eval
    assert len(st.records.seq) == cfg.n_eval * cfg.n_tokens
    assert set(st.curves["method"]) == set(S.METHOD_LABELS)
    full = st.curves.filter(pl.col("layers") == 30)
    assert (full["agreement"] == 1.0).all()
    assert st.oracle_table.height == cfg.n_eval * len(S.ORACLE_CRITERIA) * len(S.PLAN_FAMILIES)
    assert 0 < st.oracle.greedy_fraction <= 1 and 0 < st.oracle.perplexity_fraction <= 1
    assert {"command", "wall_time_s", "seed"} <= set(st.card)
    assert len(set(st.skip_order)) == len(st.skip_order) == cfg.max_order
    for f in S.study_files().values():
        assert f.stat().st_size < 4_000_000, f


@pytest.mark.slow
def test_the_shipped_records_reproduce_on_one_passage():
    torch.set_num_threads(2)
    st = S.load_study()
    real = M.load_smollm2()
    ids = S.passages(real, "test", 1, st.config.n_tokens)[0]
    assert ids == st.records.tokens(0)
    rec, _ = S.sequence_records(real, ids)
    shipped = st.records.sequence(0)
    assert (rec.top1 == shipped.top1).mean() > 0.995  # near-ties may flip across machines
    for f in ("max_prob", "margin", "saturation"):
        np.testing.assert_allclose(getattr(rec, f), getattr(shipped, f), atol=2e-3)


def test_a_stopped_build_resumes_from_its_checkpoint_and_a_helper_shares_the_oracle(
    lm, built, tmp_path
):
    ev, cal = texts(CFG.n_eval, 1), texts(CFG.n_calib, 2)
    first = S.build_study(lm, CFG, ev, cal, checkpoint=tmp_path)
    assert first.curves.equals(built.curves) and first.oracle.equals(built.oracle)
    for i in (0, 3):  # as if the build stopped before these passages' oracle
        (tmp_path / f"oracle_{i}.json").unlink()
        (tmp_path / f"oracle_{i}.started").unlink()
    assert S.build_study(lm, CFG, ev, cal, checkpoint=tmp_path, oracle_helper=True) is None
    assert (tmp_path / "oracle_3.json").is_file()
    rows = MLPRows(lm)
    try:
        again = S.build_study(lm, CFG, ev, cal, checkpoint=tmp_path)
    finally:
        rows.close()
    assert sum(rows.rows) == 0  # every stage read back, nothing re-run
    assert again.curves.equals(built.curves) and again.oracle.equals(built.oracle)
    assert again.order == built.order


def test_a_helper_process_shares_the_skip_curves_and_the_oracle(lm, built, tmp_path):
    import shutil
    import threading

    ev, cal = texts(CFG.n_eval, 1), texts(CFG.n_calib, 2)
    S.build_study(lm, CFG, ev, cal, checkpoint=tmp_path / "a")
    (tmp_path / "b").mkdir()
    for f in ("stage.json", "records.parquet"):  # the records stage done, nothing after
        shutil.copy(tmp_path / "a" / f, tmp_path / "b" / f)
    helper = threading.Thread(
        target=S.build_study, args=(lm, CFG, ev, cal, tmp_path / "b", True), daemon=True
    )
    helper.start()
    got = S.build_study(lm, CFG, ev, cal, checkpoint=tmp_path / "b")
    helper.join(60)
    assert (tmp_path / "b" / "skip_part_nll.parquet").is_file()  # the helper ran two families
    assert got.curves.equals(built.curves) and got.oracle.equals(built.oracle)


# --- progress ----------------------------------------------------------------------------------


def test_the_build_reports_every_stage_to_its_progress(built):
    """A bar per stage through engine.core.progress (tqdm on the command line), each counting
    its own work from 0 to its total: no tqdm of the study's own."""
    bars = BUILD_PROGRESS.bars()
    n = CFG.n_eval
    plans = sum(
        1
        for f in S.SKIP_FAMILIES
        for k in CFG.kept_grid
        if k >= S.min_kept(f, N_LAYER, built.order)
    )
    want = {
        "study: calibration passages": CFG.n_calib,
        "study: evaluation passages": n,
        next(b for b in bars if b.startswith("study: greedy skip order")): 1,
        "study: skip curves (plans x passages)": plans * n,
        "study: oracle (passages)": n,
    }
    assert list(bars) == list(want)
    for label, total in want.items():
        assert bars[label] == [total, *range(total + 1)], label


@pytest.mark.parametrize("quiet", [False, True])
def test_the_study_command_reports_to_the_terminal_sink(lm, monkeypatch, quiet):
    """``python -m engine.families.hf_causal_lm.study [--quiet]`` builds with the sink
    ``engine.core.progress.terminal(quiet)`` gives, as every other command does."""
    from engine import families

    sink, got = Recorder(), {}

    def terminal(quiet=False):
        got["quiet"] = quiet
        return sink

    monkeypatch.setattr(S, "terminal", terminal)
    monkeypatch.setattr(families, "load_model", lambda model_id: lm)

    def build(lm, cfg, *, checkpoint, oracle_helper, progress):
        got["progress"] = progress
        return None  # as an oracle helper: nothing to save

    monkeypatch.setattr(S, "build_study", build)
    argv = ["--sequences", "2", "--tokens", "8", "--calibration", "1"]
    assert S.main(argv + ["--quiet"] * quiet) == 0
    assert got == {"quiet": quiet, "progress": sink}
