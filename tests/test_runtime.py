"""Real early exit (engine.run.runtime): compaction skips work, decisions equal the cached trace.

Two models: a tiny stand-in with the multi-exit contract (always available, fast) and the
bundled ``mnist_multi_exit_cnn`` with its bundled trace on the full MNIST test split (10k).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.core.policies import Policy, PolicyError, exit_index
from engine.core.trace import Trace, TraceMeta
from engine.data.images import load, to_model_input
from engine.run.exits import exit_costs
from engine.run.runtime import EarlyExitRunner, run

BUNDLED = "mnist_multi_exit_cnn"


class StandIn(nn.Module):
    """Three conv stages with a pooled linear head after each (the multi-exit contract)."""

    def __init__(self, widths=(8, 16, 32), classes=10):
        super().__init__()
        self.stages, self.heads = nn.ModuleList(), nn.ModuleList()
        c = 1
        for w in widths:
            self.stages.append(
                nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            )
            self.heads.append(
                nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * w, classes))
            )
            c = w

    def forward(self, x):
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            out.append(head(x))
        return out


def trace_of(model: nn.Module, x: torch.Tensor, labels: np.ndarray) -> Trace:
    """A trace built the way the trace builders do: batches of 256, float32 softmax."""
    probs = []
    with torch.no_grad():
        for b in range(0, len(x), 256):
            logits = model(x[b : b + 256])
            probs.append(torch.stack([torch.softmax(z.float(), -1) for z in logits], 1).numpy())
    p = np.concatenate(probs)
    k = p.shape[1]
    cost = np.broadcast_to(exit_costs(model).cumulative, (len(x), k)).copy()
    meta = TraceMeta("standin", tuple(f"e{i}" for i in range(k)), tuple(map(str, range(10))))
    return Trace(meta, np.arange(len(x)), labels.astype(np.int64), p, cost)


def policies_for(trace: Trace) -> list[Policy]:
    """Every policy kind; thresholds include values *equal* to trace confidences (the hardest
    case: a one-ulp difference in a logit would flip the decision)."""
    mp = trace.max_prob[:, 0]
    k = trace.num_exits
    out = [Policy("max_prob", threshold=t) for t in (0.5, 0.9, 0.99, float(np.median(mp)))]
    out += [
        Policy("max_prob", threshold=float(np.quantile(mp, q, method="nearest")))
        for q in (0.2, 0.8)
    ]
    out += [
        Policy("entropy", threshold=t)
        for t in (0.05, 0.3, float(np.median(trace.entropy_norm[:, 0])))
    ]
    out += [
        Policy("margin", threshold=t) for t in (0.5, 0.95, float(np.median(trace.margin[:, 0])))
    ]
    out += [Policy("patience", patience=p) for p in range(k)]
    out += [Policy("per_exit", thresholds=tuple(np.linspace(0.99, 0.6, k)))]
    out += [Policy("fixed", exit=e) for e in range(k)]
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the test machine is shared, and oversubscribed threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def standin():
    torch.manual_seed(0)
    model = StandIn().eval()
    with torch.no_grad():  # peaky logits, so confidences spread over [0.1, 1]
        for head in model.heads:
            head[-1].weight.mul_(40)
    data = load("digits", "test")
    x = to_model_input(data.images)
    return model, x, trace_of(model, x, data.labels)


@pytest.fixture(scope="module")
def bundled():
    from engine.families import load_model
    from engine.registry import RegistryError
    from engine.trace_store import load_trace

    try:
        model = load_model(BUNDLED)
        trace = load_trace(BUNDLED, "test", build_if_missing=False)
    except (RegistryError, FileNotFoundError) as e:
        pytest.skip(f"bundled model/trace {BUNDLED} not there yet ({e})")
    data = load("mnist", "test")
    assert np.array_equal(trace.label, data.labels), "trace rows must follow the test split"
    calib = to_model_input(load("mnist", "train").images[:512])
    return model, to_model_input(data.images), trace, calib


# --- compaction really skips work ------------------------------------------------------------


def test_costs_match_trace_and_flops_spent(standin):
    model, x, trace = standin
    res = run(model, x, Policy("max_prob", threshold=0.9), "torch", device="cpu")
    assert np.array_equal(res.flops, trace.cost[np.arange(len(x)), res.exit])
    assert res.flops.sum() < trace.cost[:, -1].sum()  # some samples stopped early
    assert len(res.batch_ms) == -(-len(x) // 256)


@pytest.mark.parametrize("min_rows", [1, 16])
def test_later_stages_never_see_exited_samples(standin, min_rows):
    model, x, _ = standin
    runner = EarlyExitRunner(model, "torch", device="cpu")  # counts FLOPs on one sample
    seen = [0] * len(model.stages)
    hooks = [
        s.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, seen[k] + o.shape[0]))
        for k, s in enumerate(model.stages)
    ]
    try:
        res = runner.run(x, Policy("max_prob", threshold=0.8), batch_size=64, min_rows=min_rows)
    finally:
        for h in hooks:
            h.remove()
    reached = [int((res.exit >= k).sum()) for k in range(len(model.stages))]
    assert res.stage_rows == reached
    assert reached[0] == len(x) and reached[-1] < reached[0]
    if min_rows == 1:
        assert seen == reached  # exactly the samples still running, nothing more
    else:  # tiny compacted batches are padded (batch-size invariance), and the padding reported
        assert all(s >= r for s, r in zip(seen, reached, strict=True))
        per_row = runner.costs.stage + runner.costs.head
        extra = sum((s - r) * c for s, r, c in zip(seen, reached, per_row, strict=True))
        assert extra > 0 and res.padded_flops == pytest.approx(extra)


def test_standin_torch_equals_trace_for_every_policy(standin):
    model, x, trace = standin
    runner = EarlyExitRunner(model, "torch", device="cpu")
    for policy in policies_for(trace):
        res = runner.run(x, policy, batch_size=256)
        want = exit_index(trace, policy)
        assert np.array_equal(res.exit, want), policy
        assert np.array_equal(res.pred, trace.pred[np.arange(len(x)), want]), policy


class Residual(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return h + 0.4 * torch.tanh(self.lin(h))


class Sticky(StandIn):
    """Residual stages on a flattened input: predictions often agree between exits, and
    change for some samples, so patience stops them at every exit (the StandIn's first two
    exits never agree, which leaves patience nothing to decide)."""

    def __init__(self, d=12, exits=5, classes=10):
        nn.Module.__init__(self)
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, d))]
            + [Residual(d) for _ in range(exits - 1)]
        )
        head = nn.Linear(d, classes)  # one head shared by every exit, as in an LM
        self.heads = nn.ModuleList([head] * exits)
        with torch.no_grad():
            for stage in self.stages[1:]:
                stage.lin.weight.mul_(2)


@pytest.mark.parametrize("min_rows", [1, 16])
def test_patience_history_follows_samples_through_compaction(standin, min_rows):
    """The runtime keeps each running sample's past predictions in its rows; compaction drops
    rows at every exit, and a history out of step with them changes patience's exits."""
    _, x, _ = standin
    torch.manual_seed(3)
    model = Sticky().eval()
    trace = trace_of(model, x, np.zeros(len(x)))
    runner = EarlyExitRunner(model, "torch", device="cpu")
    for p in (1, 2, 3):
        policy = Policy("patience", patience=p)
        want = exit_index(trace, policy)
        assert len(np.unique(want)) >= 2, "the test model must stop samples at several exits"
        res = runner.run(x, policy, batch_size=64, min_rows=min_rows)
        assert np.array_equal(res.exit, want), policy
        assert np.array_equal(res.pred, trace.pred[np.arange(len(x)), want]), policy


def test_batch_size_one(standin):
    model, x, trace = standin
    policy = Policy("max_prob", threshold=float(np.median(trace.max_prob[:, 0])))
    sub = np.arange(60)
    res = run(model, x[sub], policy, "torch", batch_size=1, device="cpu")
    assert np.array_equal(res.exit, exit_index(trace, policy)[sub])
    assert len(res.batch_ms) == 60


def test_bad_inputs(standin):
    model, x, _ = standin
    with pytest.raises(PolicyError):
        run(model, x[:4], Policy("gate", threshold=0.5), "torch", device="cpu")
    with pytest.raises(PolicyError):
        run(model, x[:4], Policy("fixed", exit=7), "torch", device="cpu")
    with pytest.raises(ValueError):
        run(model, x[:4], Policy("fixed", exit=0), "tensorrt")
    with pytest.raises(TypeError):
        run(nn.Linear(2, 2).eval(), x[:4], Policy("fixed", exit=0))


# --- the bundled model on the full MNIST test split ------------------------------------------


def test_bundled_torch_equals_trace_bit_for_bit(bundled):
    """Every policy kind at several thresholds: exit, prediction and FLOPs equal the trace's.

    Two policies run on the full test split (10k), a threshold equal to a trace confidence and
    patience; to keep the test fast, the others run on the first 1,000 samples (the runtime
    compacts within each batch of 256, so a subset exercises the same code)."""
    model, x, trace, _ = bundled
    runner = EarlyExitRunner(model, "torch", device="cpu")
    assert np.allclose(runner.costs.cumulative, trace.cost[0])
    on_full_split: set[str] = set()
    sub = trace.subset(np.arange(1000))
    median = float(np.median(trace.max_prob[:, 0]))
    for policy in policies_for(trace):
        if policy in (Policy("max_prob", threshold=median), Policy("patience", patience=1)):
            on_full_split.add(policy.kind)
            t, xs = trace, x
        else:
            t, xs = sub, x[:1000]
        res = runner.run(xs, policy)
        want = exit_index(t, policy)
        rows = np.arange(t.num_samples)
        bad = np.flatnonzero(res.exit != want)
        assert bad.size == 0, f"{policy}: {bad.size} of {t.num_samples} differ, e.g. {bad[:5]}"
        assert np.array_equal(res.pred, t.pred[rows, want]), policy
        assert np.array_equal(res.flops, t.cost[rows, want]), policy
    assert on_full_split == {"max_prob", "patience"}


def test_bundled_batch_size_one(bundled):
    model, x, trace, _ = bundled
    policy = Policy("max_prob", threshold=float(np.median(trace.max_prob[:, 0])))
    want = exit_index(trace, policy)[:100]
    res = run(model, x[:100], policy, "torch", batch_size=1, device="cpu")
    assert np.array_equal(res.exit, want) and len(res.batch_ms) == 100
    onnx = run(model, x[:100], policy, "onnx", batch_size=1, model_id=BUNDLED)
    assert (onnx.exit == want).mean() >= 0.99


def test_bundled_onnx_float_int8_and_quee(bundled):
    model, x, trace, calib = bundled
    policy = Policy("max_prob", threshold=0.9)
    want = exit_index(trace, policy)
    want_pred = trace.pred[np.arange(len(x)), want]

    onnx = run(model, x, policy, "onnx", model_id=BUNDLED)
    agree = ((onnx.exit == want) & (onnx.pred == want_pred)).mean()
    print(f"\nONNX Runtime float32: exit+prediction agree with the trace on {agree:.4%}")
    assert agree >= 0.999

    int8 = run(model, x, policy, "onnx_int8", model_id=BUNDLED, calibration=calib)
    agree8 = ((int8.exit == want) & (int8.pred == want_pred)).mean()
    acc8, acc = (int8.pred == trace.label).mean(), (want_pred == trace.label).mean()
    print(
        f"ONNX Runtime int8: agree {agree8:.2%} (exit {np.mean(int8.exit == want):.2%}, "
        f"prediction {np.mean(int8.pred == want_pred):.2%}); accuracy {acc8:.4f} vs {acc:.4f}"
    )
    # int8 moves confidences a little, so exits near the threshold move: reported, and only
    # asserted to be reasonable
    assert np.mean(int8.pred == want_pred) >= 0.95 and agree8 >= 0.85
    assert (int8.int8_from == 0).all()

    runner = EarlyExitRunner(model, "quee", model_id=BUNDLED, calibration=calib)
    never = runner.run(x, policy, quee_band=1.5)  # nobody is confident enough to switch
    assert np.array_equal(never.exit, onnx.exit) and np.array_equal(never.pred, onnx.pred)
    assert (never.int8_from == len(model.stages)).all()
    q = runner.run(x, policy, quee_band=0.5)
    switched = q.int8_from < len(model.stages)
    assert switched.any() and (q.int8_from[switched] <= q.exit[switched]).all()
    assert (q.exit[switched] >= 1).all()  # a switch happens after an exit that did not stop
    labels = set(q.precision())
    print(f"QuEE band 0.5: {switched.mean():.2%} of samples finished in int8; {sorted(labels)}")
    assert "float32" in labels and any(lab.startswith("float32→int8@") for lab in labels)
    assert (q.pred == trace.label).mean() >= acc - 0.01
