"""The slimmable CNN: the width math (width 1.0 is the plain network, a narrow width is the first
channels, switchable batch norm), the shipped card against the shipped weights, and the real
width cascade: the same decisions as the trace, and forward hooks showing that the widths an
input did not need never ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import families
from engine.core.policies import Policy, exit_index
from engine.data import images
from engine.families.slimmable_cnn import model as slim_model
from engine.families.slimmable_cnn.records import (
    WIDTH_DEPTH,
    RanCounter,
    grid_costs,
    grid_probs,
    run_width_depth,
)
from engine.families.slimmable_cnn.train import sandwich_widths
from engine.registry import get_card
from engine.run.exits import exit_costs
from engine.run.runtime import EarlyExitRunner
from engine.trace_store import load_trace

MODEL_ID = "fashion_slimmable_cnn"


def _randomised(seed: int = 0) -> slim_model.SlimmableCNN:
    """An untrained network whose every batch norm has its own, non-trivial statistics."""
    torch.manual_seed(seed)
    m = slim_model.build({})
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def _plain(m: slim_model.SlimmableCNN, width: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """A plain CNN (nn.Conv2d / nn.BatchNorm2d / nn.Linear, nothing slimmable) of the channels
    width ``width`` keeps, with weights copied from the slimmable one's first channels."""
    mult, c_in = m.config.width_mults[width], 1
    stages, heads = nn.ModuleList(), nn.ModuleList()
    for block, head, c_full, s in zip(
        m.blocks, m.exit_heads, m.config.channels, m.config.strides, strict=True
    ):
        c = slim_model.slim(c_full, mult)
        conv1, conv2 = nn.Conv2d(c_in, c, 3, s, 1, bias=False), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        conv1.weight.data = block.conv1.weight[:c, :c_in].clone()
        conv2.weight.data = block.conv2.weight[:c, :c].clone()
        bn1, bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        bn1.load_state_dict(block.bn1.bns[width].state_dict())
        bn2.load_state_dict(block.bn2.bns[width].state_dict())
        stages.append(nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2, nn.ReLU()))
        fc = nn.Linear(c, m.config.num_classes)
        fc.weight.data = head.fc.weight[:, :c].clone()
        fc.bias.data = head.fc.bias.clone()
        heads.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc))
        c_in = c
    return stages.eval(), heads.eval()


def _plain_logits(stages, heads, x):
    out, h = [], x
    for stage, head in zip(stages, heads, strict=True):
        h = stage(h)
        out.append(head(h))
    return out


@pytest.fixture(scope="module")
def x():
    return images.to_model_input(images.load("fashion_mnist", "test").images[:64])


@pytest.fixture(scope="module")
def shipped():
    return families.load_model(MODEL_ID)


# --- the width math ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["random", "shipped"])
@torch.no_grad()
def test_width_one_is_the_plain_full_network_bit_for_bit(which, x, request):
    m = _randomised() if which == "random" else request.getfixturevalue("shipped")
    full = m.num_widths - 1
    assert m.config.width_mults[full] == 1.0
    want = _plain_logits(*_plain(m, full), x)
    got = m.run(x, full)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    # the contract's last "exit" (the widest network, last exit only) is the same tensor
    assert torch.equal(m(x)[-1], want[-1])


@pytest.mark.parametrize("width", [0, 1, 2])
@torch.no_grad()
def test_a_narrow_width_is_the_plain_network_of_the_first_channels(width, x):
    m = _randomised()
    want = _plain_logits(*_plain(m, width), x)
    got = m.run(x, width)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_narrow_width_reads_only_the_first_channels_of_the_weights(x):
    m = _randomised()
    before, before_full = m.run(x, 0)[-1], m.run(x, 3)[-1]
    c = slim_model.slim(m.config.channels[1], m.config.width_mults[0])
    m.blocks[1].conv2.weight[c:] += 1.0  # channels width 0.25 does not keep
    m.blocks[1].conv2.weight[:, c:] += 1.0
    assert torch.equal(m.run(x, 0)[-1], before)
    assert not torch.allclose(m.run(x, 3)[-1], before_full)  # the full width reads them
    m.blocks[1].conv2.weight[:c, :c] += 0.1  # channels it keeps
    assert not torch.allclose(m.run(x, 0)[-1], before)


@torch.no_grad()
def test_switchable_batch_norm_uses_its_own_widths_statistics(x):
    m = _randomised()
    outs = [m.run(x, w)[-1].clone() for w in range(m.num_widths)]
    bns = m.blocks[2].bn1.bns
    assert [bn.num_features for bn in bns] == [16, 32, 48, 64]
    bns[1].running_mean += 3.0  # width 0.5's statistics only
    for w in range(m.num_widths):
        same = torch.equal(m.run(x, w)[-1], outs[w])
        assert same == (w != 1), f"width {w}"


def test_slim_channel_counts_and_the_sandwich():
    assert [slim_model.slim(16, w) for w in (0.25, 0.5, 0.75, 1.0)] == [4, 8, 12, 16]
    assert slim_model.slim(10, 0.25) == 3  # ceil
    gen = torch.Generator().manual_seed(0)
    drawn = [sandwich_widths(4, 1, gen) for _ in range(50)]
    assert all(d[:2] == [3, 0] and len(d) == 3 and d[2] in (1, 2) for d in drawn)
    assert {d[2] for d in drawn} == {1, 2}
    assert sandwich_widths(4, 2, gen) == [3, 0, 1, 2]


def test_the_state_dict_holds_each_weight_once():
    keys = list(_randomised().state_dict())
    assert not any(k.startswith(("heads.", "stages.")) for k in keys)
    assert sum(k.endswith("conv1.weight") for k in keys) == 4


# --- the shipped card and traces -----------------------------------------------------------


def test_card_numbers_are_the_shipped_weights(shipped):
    card = get_card(MODEL_ID)
    met = card.raw["metrics"]
    data = images.load("fashion_mnist", "test")
    assert met["test_samples"] == len(data) == 10000
    probs = grid_probs(shipped, images.to_model_input(data.images))  # [N, W, S, C]
    acc = (probs.argmax(-1) == data.labels[:, None, None]).mean(0)
    np.testing.assert_allclose(acc, met["test_accuracy_grid"], atol=1e-5)
    np.testing.assert_allclose(acc[:, -1], met["test_accuracy"], atol=1e-5)
    costs = grid_costs(shipped)
    assert costs.cumulative.astype(int).tolist() == met["flops_grid"]
    assert costs.last_exit.astype(int).tolist() == met["flops_width"]
    # FLOPs grow with width, about as its square: width 0.25 costs about a sixteenth (the tour)
    f = np.asarray(met["flops_width"], dtype=float)
    assert (np.diff(f) > 0).all() and 1 / 20 < f[0] / f[-1] < 1 / 13
    assert met["params"] == sum(p.numel() for p in shipped.parameters())


def test_the_traces_are_the_card_and_agree_with_each_other():
    card = get_card(MODEL_ID)
    met = card.raw["metrics"]
    cascade = load_trace(MODEL_ID, build_if_missing=False)
    grid = load_trace(MODEL_ID, WIDTH_DEPTH, build_if_missing=False)
    w, s = np.asarray(met["test_accuracy_grid"]).shape
    assert cascade.num_exits == w and grid.num_exits == w * s
    np.testing.assert_allclose(cascade.correct.mean(0), met["test_accuracy"], atol=1e-5)
    np.testing.assert_allclose(
        grid.correct.mean(0).reshape(w, s), met["test_accuracy_grid"], atol=1e-5
    )
    # the cascade's exits are the grid's last exit of each width
    np.testing.assert_allclose(cascade.probs, grid.probs[:, s - 1 :: s], atol=1e-6)
    # cascade cost: every width run so far; grid cost: earlier widths run to the end
    assert cascade.cost[0].tolist() == np.cumsum(met["flops_width"]).tolist()
    fl = np.asarray(met["flops_grid"], dtype=float)
    before = np.concatenate([[0.0], np.cumsum(fl[:, -1])[:-1]])
    assert grid.cost[0].tolist() == (before[:, None] + fl).reshape(-1).tolist()


# --- real execution at the chosen width -----------------------------------------------------


@pytest.mark.parametrize("threshold", [0.6, 0.9, 0.99])
def test_real_width_cascade_is_the_trace_and_skipped_widths_never_run(threshold, shipped):
    data = images.load("fashion_mnist", "test")
    n = 600
    trace = load_trace(MODEL_ID, build_if_missing=False).subset(np.arange(n))
    policy = Policy("max_prob", threshold=threshold)
    want = exit_index(trace, policy)
    runner = EarlyExitRunner(shipped, backend="torch", device="cpu")
    with RanCounter(shipped) as ran:
        out = runner.run(images.to_model_input(data.images[:n]), policy, batch_size=128, min_rows=1)
    np.testing.assert_array_equal(out.exit, want)
    np.testing.assert_array_equal(out.pred, trace.pred[np.arange(n), want])
    np.testing.assert_array_equal(out.flops, trace.cost[np.arange(n), want])
    assert len(np.unique(want)) >= 2  # the test would be vacuous otherwise
    # what really ran, read off the tensors by hooks: width i ran for the inputs that had not
    # stopped before it, at exactly its channel count, in every layer
    cfg = shipped.config
    for i, mult in enumerate(cfg.width_mults):
        reached = int((want >= i).sum())
        for s, c_full in enumerate(cfg.channels):
            c = slim_model.slim(c_full, mult)
            assert ran.widths_run(f"blocks.{s}.conv1").get(c, 0) == reached, (i, s)
            assert ran.rows(f"blocks.{s}.bn2.bns.{i}") == reached
    # exit heads: only the last one, once per width run
    assert ran.rows("exit_heads.0.fc") == 0
    assert ran.rows("exit_heads.3.fc") == int((want + 1).sum())
    # rows x channels² per conv: the narrow widths are cheap because fewer channels ran
    assert sum(ran.widths_run("blocks.1.conv2").values()) == int((want + 1).sum())


@pytest.mark.parametrize(
    "policy", [Policy("max_prob", threshold=0.9), Policy("patience", patience=2)]
)
def test_real_width_by_depth_is_its_trace_and_runs_only_what_it_needs(policy, shipped):
    data = images.load("fashion_mnist", "test")
    n = 400
    trace = load_trace(MODEL_ID, WIDTH_DEPTH, build_if_missing=False).subset(np.arange(n))
    want = exit_index(trace, policy)
    x, costs = images.to_model_input(data.images[:n]), grid_costs(shipped)
    with RanCounter(shipped) as ran:
        out = run_width_depth(shipped, x, policy, costs)
    np.testing.assert_array_equal(out.exit, want)
    np.testing.assert_array_equal(out.pred, trace.pred[np.arange(n), want])
    np.testing.assert_array_equal(out.flops, trace.cost[np.arange(n), want])
    assert len(np.unique(want)) >= 4
    cfg = shipped.config
    s_count = len(cfg.channels)
    for i, mult in enumerate(cfg.width_mults):
        for s, c_full in enumerate(cfg.channels):
            reached = int((want >= i * s_count + s).sum())
            c = slim_model.slim(c_full, mult)
            assert ran.widths_run(f"blocks.{s}.conv2").get(c, 0) == reached, (i, s)
            assert ran.rows(f"blocks.{s}.bn1.bns.{i}") == reached
    for s in range(s_count):  # exit head s runs once for every width that reached stage s
        reached = sum(int((want >= i * s_count + s).sum()) for i in range(len(cfg.width_mults)))
        assert ran.rows(f"exit_heads.{s}.fc") == reached


def test_live_run_says_which_width_it_stopped_at(shipped):
    card = get_card(MODEL_ID)
    fam = families.get(card.family)
    data = images.load("fashion_mnist", "test")
    trace = load_trace(MODEL_ID, build_if_missing=False)
    for i in range(5):
        run = fam.run_one(shipped, card, data.images[i], 0.9)
        k = exit_index(trace.subset(np.array([i])), Policy("max_prob", threshold=0.9))[0]
        assert (
            run.detail["exit"] == k and f"width {card.config['width_mults'][k]:g}" in run.decision
        )
        assert run.cost == trace.cost[i, k] and run.full_cost == exit_costs(shipped).full


# --- the README's numbers -------------------------------------------------------------------

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _mflops(f: float) -> str:
    return f"{f / 1e6:.2f}"


def test_readme_row_and_paragraph_are_the_card_and_traces():
    met = get_card(MODEL_ID).raw["metrics"]
    row = next(ln for ln in README.splitlines() if ln.startswith(f"| `{MODEL_ID}`"))
    acc = " / ".join(f"{100 * a:.1f}" for a in met["test_accuracy"])
    fl = " / ".join(_mflops(f) for f in met["flops_width"])
    assert f"widths {acc} % at {fl} MFLOPs" in row
    # the width policy at max-prob 0.9, on the whole test trace
    trace = load_trace(MODEL_ID, build_if_missing=False)
    k = exit_index(trace, Policy("max_prob", threshold=0.9))
    rows = np.arange(trace.num_samples)
    full_width = met["flops_width"][-1]
    acc09, cost09 = trace.correct[rows, k].mean(), trace.cost[rows, k].mean()
    share = f"{100 * cost09 / full_width:.0f} %"
    assert f"width cascade at max-prob 0.9: {100 * acc09:.1f} % at {share} of the full" in row
    text = " ".join(README.split())
    all_widths = trace.cost[0, -1]
    assert f"every width run ({_mflops(all_widths)} MFLOPs, {all_widths / full_width:.1f}×" in text
    assert (
        f"max-prob 0.9 keeps {100 * acc09:.1f} % (full width: {100 * met['test_accuracy'][-1]:.1f}"
        f" %) at {_mflops(cost09)} MFLOPs, {share} of the full width, and answers "
        f"{100 * (k == 0).mean():.0f} % of the images at width 0.25" in text
    )
    grid = load_trace(MODEL_ID, WIDTH_DEPTH, build_if_missing=False)
    kg = exit_index(grid, Policy("max_prob", threshold=0.9))
    acc_g, cost_g = grid.correct[rows, kg].mean(), grid.cost[rows, kg].mean()
    assert f"gives {100 * acc_g:.1f} % at {_mflops(cost_g)} MFLOPs for the same threshold" in text


def test_readme_width_versus_depth_agreement_is_the_compare_pages():
    from engine import compare, compare_sources

    found, _ = compare_sources.load_sweeps("fashion_mnist")
    aligned = compare.align([*found, compare_sources.load_oracle("fashion_mnist")])
    compute = {m.name: m.compute for m in (compare.match_budget(s, 0.6) for s in aligned[:-1])}
    compute["oracle exit"] = aligned[-1].cost_fraction[0]
    names, rho, _ = compare.rank_correlations(compute)
    width_name, depth_name = width_and_depth_labels()
    width, depth = names.index(width_name), names.index(depth_name)
    oracle = names.index("oracle exit")
    text = " ".join(README.split())
    assert f"page's {len(aligned[0].sample_id):,} shared Fashion-MNIST inputs" in text
    fams = [n.split(" · ")[0] for n in names]  # one family's models share its title
    cnn = [i for i, f in enumerate(fams) if f == fams[depth]]
    lo, hi = min(rho[width, i] for i in cnn), max(rho[width, i] for i in cnn)
    assert f"correlate at Spearman {rho[width, depth]:.2f} ({lo:.2f}–{hi:.2f} against each" in text
    assert f"({rho[width, oracle]:.2f} against {rho[depth, oracle]:.2f})" in text
    # width with depth agree more than any other two families do (on this page at least)
    width_depth = {frozenset((width, i)) for i in cnn}
    other = [
        rho[i, j]
        for i in range(len(names))
        for j in range(i)
        if fams[i] != fams[j] and frozenset((i, j)) not in width_depth
    ]
    assert np.nanmax(other) < lo
    same = [rho[i, j] for i in range(len(names)) for j in range(i) if fams[i] == fams[j]]
    assert f"agree with each other at {min(same):.2f}–{max(same):.2f}" in text


def width_and_depth_labels() -> tuple[str, str]:
    """The compare page's names of the width cascade and of the joint multi-exit CNN."""
    from engine import compare_sources

    found, _ = compare_sources.load_sweeps("fashion_mnist")
    width = next(s.name for s in found if s.name.startswith(families.get("slimmable_cnn").title))
    depth = next(s.name for s in found if s.name.endswith("· fashion_multi_exit_cnn"))
    return width, depth


# --- its curve on the tuning page -----------------------------------------------------------


@pytest.mark.parametrize("source", [MODEL_ID, f"{MODEL_ID}@{WIDTH_DEPTH}"])
def test_the_tuning_page_tunes_both_traces(source, tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from engine.core import tradeoff

    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    st.cache_data.clear()
    page = Path(__file__).resolve().parent.parent / "pages" / "tuning.py"
    at = AppTest.from_file(str(page), default_timeout=90)
    at.query_params.update(model=source, policy="max_prob", t="0.9")
    at.run()
    assert not at.exception, at.exception
    assert at.sidebar.selectbox[0].value == source
    model_id, _, split = source.partition("@")
    trace = load_trace(model_id, split or "test", build_if_missing=False)
    s = tradeoff.evaluate(trace, exit_index(trace, Policy("max_prob", threshold=0.9)))
    shown = {m.label: m.value for m in at.metric}
    assert shown["Accuracy"] == f"{s.accuracy:.4f}"
    st.cache_data.clear()


def test_the_compare_page_puts_width_beside_depth_on_fashion():
    import base64
    import json

    from streamlit.testing.v1 import AppTest

    from engine import compare, compare_sources

    page = Path(__file__).resolve().parent.parent / "pages" / "compare.py"
    at = AppTest.from_file(str(page), default_timeout=90).run()
    at.selectbox(key="cmp_dataset").set_value("fashion_mnist").run()
    at.slider(key="cmp_budget").set_value(0.6).run()
    assert not at.exception, at.exception
    width, depth = width_and_depth_labels()
    methods = list(at.dataframe[0].value["method"])
    assert width in methods and depth in methods
    found, _ = compare_sources.load_sweeps("fashion_mnist")
    aligned = compare.align([*found, compare_sources.load_oracle("fashion_mnist")])
    compute = {m.name: m.compute for m in (compare.match_budget(s, 0.6) for s in aligned[:-1])}
    compute["oracle exit"] = aligned[-1].cost_fraction[0]
    names, rho, _ = compare.rank_correlations(compute)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    heat = next(s for s in specs if "Spearman" in s["layout"].get("title", {}).get("text", ""))
    z = heat["data"][0]["z"]  # plotly's typed-array encoding
    shape = [int(d) for d in z["shape"].split(",")]
    z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)
    labels = list(heat["data"][0]["x"])
    i, j = labels.index(width), labels.index(depth)
    assert z[i, j] == pytest.approx(rho[names.index(width), names.index(depth)], abs=1e-3)
