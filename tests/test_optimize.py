"""Inference variants (engine.run.optimize) compute what the plain model computes.

Float variants (batch norm folded, channels_last, ONNX Runtime graph optimisation levels): the
same argmax at every exit on the digits test split, probabilities within float rounding. int8
schemes: accuracy of the bundled CNN on MNIST within a point of float. Speed is measured in
bench/multi_exit_cost.py, not here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.core.policies import Policy
from engine.data.images import load, to_model_input
from engine.families.multi_exit_cnn.model import build
from engine.run import optimize
from engine.run.onnx_export import (
    GRAPH_LEVELS,
    Int8Scheme,
    OnnxSessions,
    export_chain,
    quantize_chain,
)
from engine.run.runtime import EarlyExitRunner


def _ops(path) -> set[tuple[str, str]]:
    import onnx

    return {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}


def _bn_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


@pytest.fixture(scope="module")
def small():
    """A small multi-exit CNN whose batch norms are far from identity, so folding matters."""
    torch.manual_seed(0)
    model = build({"widths": [8, 8, 16, 16]})
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.3)
    model.eval()
    x = to_model_input(load("digits", "test").images)
    with torch.inference_mode():
        ref = optimize.all_logits(
            lambda k, h: model.stages[k](h), lambda k, h: model.heads[k](h), x, 4
        )
    return model, x, ref


@pytest.mark.parametrize("variant", ["fold_bn", "fold_bn_cl"])
def test_float_torch_variants_keep_predictions(small, variant):
    model, x, ref = small
    before = [p.clone() for p in model.parameters()]
    ts = optimize.torch_stages(model, variant)
    assert all(_bn_count(s) == 0 for s in ts.stages), "every batch norm folded"
    assert _bn_count(model) > 0 and all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    ), "the model itself is not modified"
    with torch.inference_mode():
        h = ts.start(x)
        cl = ts.stages[0](h).is_contiguous(memory_format=torch.channels_last)
        assert ts.channels_last == cl == (variant == "fold_bn_cl")
        got = optimize.all_logits(lambda k, h: ts.stages[k](h), lambda k, h: ts.heads[k](h), h, 4)
    ag = optimize.agreement(ref, got)
    print(f"\n{variant}: max |Δprob| {ag.max_abs_dprob.max():.1e}")
    assert (ag.argmax_equal == 1.0).all()
    assert ag.max_abs_dprob.max() < 1e-4


def test_fold_bn_needs_eval_mode(small):
    model = build({"widths": [8, 8, 16, 16]})  # train mode
    with pytest.raises(ValueError, match="eval"):
        optimize.torch_stages(model, "fold_bn")
    with pytest.raises(ValueError, match="unknown variant"):
        optimize.torch_stages(small[0], "tensorrt")


def test_runtime_torch_opt_backend(bundled):
    """The runtime's "torch_opt" runs the folded stages and takes the eager decisions."""
    model, x, _, _ = bundled
    policy = Policy("max_prob", threshold=0.9)
    eager = EarlyExitRunner(model, "torch", device="cpu").run(x, policy)
    runner = EarlyExitRunner(model, "torch_opt", device="cpu")
    assert all(_bn_count(s) == 0 for s in runner._float.stages)
    opt = runner.run(x, policy)
    agree = np.mean((opt.exit == eager.exit) & (opt.pred == eager.pred))
    print(f"\ntorch_opt vs torch: exit and prediction agree on {agree:.4%}")
    assert agree >= 0.995
    assert 0 < eager.exit.mean() < 3, "the threshold makes samples exit at several exits"
    assert np.array_equal(opt.flops, runner.costs.cumulative[opt.exit])


def test_ort_graph_levels_keep_predictions(small, tmp_path):
    model, x, ref = small
    chain = export_chain(model, directory=tmp_path / "chain")
    xs = np.ascontiguousarray(x.numpy())
    for level in GRAPH_LEVELS:
        sess = OnnxSessions(chain, 1, level=level, save_optimized=True)
        ag = optimize.agreement(ref, optimize.all_logits(sess.stage, sess.head, xs, 4))
        assert (ag.argmax_equal == 1.0).all() and ag.max_abs_dprob.max() < 1e-4, level
        saved = sorted((chain.directory / f"opt-{level}").glob("*.onnx"))
        assert len(saved) == 8, f"{level}: every optimised graph saved"
        ops = _ops(chain.directory / f"opt-{level}" / f"{chain.directory.name}-stage_0.onnx")
        # the level really applied: "extended" fuses Conv+ReLU, "all" adds NCHWc convolutions
        assert (("com.microsoft", "FusedConv") in ops) == (level == "extended"), (level, ops)
        assert any(d == "com.microsoft.nchwc" for d, _ in ops) == (level == "all"), (level, ops)
    with pytest.raises(ValueError, match="level"):
        OnnxSessions(chain, 1, level="max")


def test_pick_int8_stages_and_mixed_chain(small, tmp_path):
    assert optimize.pick_int8_stages([10, 5, 4, 4], [5, 4.6, 4.4, 1]) == (True, False, False, True)
    assert optimize.pick_int8_stages([10], [9], margin=0.95) == (True,)
    model, x, ref = small
    chain = export_chain(model, directory=tmp_path / "chain")
    q = quantize_chain(model, chain, x[:128])
    mixed = optimize.mixed_chain(chain, q, (True, False, False, True))
    assert mixed.stages == (q.stages[0], chain.stages[1], chain.stages[2], q.stages[3])
    assert mixed.heads == chain.heads and mixed.precision == "mixed-qffq"
    none = optimize.mixed_chain(chain, q, (False,) * 4)
    sess = OnnxSessions(none, 1)  # all-float "mixed" chain is the float chain exactly
    ag = optimize.agreement(
        ref, optimize.all_logits(sess.stage, sess.head, np.ascontiguousarray(x.numpy()), 4)
    )
    assert (ag.argmax_equal == 1.0).all()


@pytest.fixture(scope="module")
def bundled():
    from engine.families import load_model
    from engine.registry import RegistryError

    try:
        model = load_model("mnist_multi_exit_cnn")
    except (RegistryError, FileNotFoundError) as e:
        pytest.skip(f"bundled model not there ({e})")
    data = load("mnist", "test")
    calib = to_model_input(load("mnist", "train").images[:256])
    return model, to_model_input(data.images[:1000]), data.labels[:1000], calib


@pytest.mark.parametrize(
    "scheme",
    [
        Int8Scheme(),
        Int8Scheme("qdq", True, "uint8"),
        Int8Scheme("qoperator", False, "uint8"),
        Int8Scheme("qdq", True, "int8"),
    ],
    ids=lambda s: s.tag,
)
def test_int8_schemes_keep_accuracy(bundled, scheme):
    model, x, labels, calib = bundled
    chain = export_chain(model, model_id="mnist_multi_exit_cnn")
    q = quantize_chain(model, chain, calib, scheme)
    assert scheme.tag in q.directory.name
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(q.stages[1])).graph
    ops = {n.op_type for n in g.node}
    assert ("QLinearConv" in ops) == (scheme.fmt == "qoperator"), ops
    assert "DequantizeLinear" in ops
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    conv = next(n for n in g.node if n.op_type in ("QLinearConv", "Conv"))
    if scheme.fmt == "qoperator":
        w_scale, x_zero = inits[conv.input[4]], inits[conv.input[2]]
    else:  # Conv's weight comes from a DequantizeLinear of the int8 initialiser
        deq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
        w_scale = inits[deq[conv.input[1]].input[1]]
        x_zero = inits[deq[conv.input[0]].input[2]]
    assert (w_scale.size > 1) == scheme.per_channel
    assert x_zero.dtype == (np.uint8 if scheme.activation == "uint8" else np.int8)
    f_sess, q_sess = OnnxSessions(chain, 1), OnnxSessions(q, 1)
    xs = np.ascontiguousarray(x.numpy())
    ref = optimize.all_logits(f_sess.stage, f_sess.head, xs, 4)
    ag = optimize.agreement(ref, optimize.all_logits(q_sess.stage, q_sess.head, xs, 4), labels)
    acc = optimize.agreement(ref, ref, labels).accuracy
    print(f"\n{scheme.tag}: accuracy {ag.accuracy.round(4)} vs float {acc.round(4)}")
    assert (ag.accuracy >= acc - 0.01).all()
    assert ag.argmax_equal[-1] >= 0.98
    assert ag.max_abs_dprob.max() > 0, "int8 really ran (not the float graphs)"


def test_int8_scheme_validation(bundled):
    model, _, _, calib = bundled
    chain = export_chain(model, model_id="mnist_multi_exit_cnn")
    with pytest.raises(ValueError, match="scheme"):
        quantize_chain(model, chain, calib, Int8Scheme("int4"))


def test_early_exit_benchmark_prints_both_predictions(bundled, capsys):
    """A smoke run of bench/early_exit_speedup.py: per row the FLOPs- and time-predicted
    speed-ups, the measured one and the realised ratio, and the load average around it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "early_exit_speedup.py"
    spec = importlib.util.spec_from_file_location("early_exit_speedup", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = "--n 256 --repeats 1 --batch-sizes 256 --thresholds 0.9 --backends torch torch_opt"
    before = torch.get_num_threads()
    try:
        bench.main(args.split())
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "load average before" in out and "load average after" in out
    header = next(line for line in out.splitlines() if line.startswith("| backend"))
    for col in ("FLOPs pred.", "time pred.", "measured", "realised / time pred."):
        assert col in header
    rows = [
        line
        for line in out.splitlines()
        if line.startswith(("| torch | 256 | 0.9", "| torch_opt | 256 | 0.9"))
    ]
    assert len(rows) == 2 and all("100.00%" in r for r in rows), rows
