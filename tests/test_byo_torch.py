"""Way in 2, a PyTorch model in the user's own file (``python -m engine.byo torch``): the
3×32×32 example module (tests/fixtures/byo_cnn.py) with random weights and data made here →
card + trace → the real runtime agrees with the trace (bit for bit on torch, to tolerance on
ONNX Runtime) → the tuning page and the inspector show it; every protocol violation is one
sentence on stderr with exit code 2, and nothing saved is replaced without --overwrite."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from engine.byo import ByoError
from engine.byo.__main__ import main as byo
from engine.core.policies import Policy, exit_index
from engine.families.torch_protocol import model as protocol

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "fixtures" / "byo_cnn.py"
N = 600  # two full batches of 256 and a partial one
MODEL_ID = "my_cnn"

MLP = """
from torch import nn

INPUT_SHAPE = (40,)
CLASSES = ["a", "b", "c"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.Linear(40, 32), nn.ReLU()), nn.Sequential(nn.Linear(32, 32), nn.ReLU())]
        )
        self.heads = nn.ModuleList([nn.Linear(32, 3), nn.Linear(32, 3)])


def build_model():
    return MLP()
"""


def _weights(file: Path, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for the file's model, with peaky heads (confidences spread over 0..1)."""
    torch.manual_seed(seed)
    net = protocol.read_spec(protocol.import_file(file)).network
    with torch.no_grad():
        for head in net.heads:
            last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(40)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(path))
    return sd


def _data(path: Path, shape: tuple[int, ...], classes: int, n: int = N, seed: int = 0) -> None:
    """Random inputs and labels, as .npz or .safetensors (both are accepted)."""
    from safetensors.numpy import save_file as save_arrays

    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.normal(size=(n, *shape)).astype(np.float32),
        "y": rng.integers(0, classes, n).astype(np.int64),
    }
    if path.suffix == ".safetensors":
        save_arrays(arrays, str(path))
    else:
        np.savez(path, **arrays)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("byo")
    _weights(EXAMPLE, d / "cnn.safetensors")
    _data(d / "eval.npz", (3, 32, 32), 10)
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Own data and cache folders for the module (the user model folder lives in the first)."""
    d = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIE_DATA_DIR", str(d / "data"))
        mp.setenv("AIE_CACHE_DIR", str(d / "cache"))
        st.cache_data.clear()
        st.cache_resource.clear()
        yield d
        st.cache_data.clear()
        st.cache_resource.clear()


def _cli(*argv: str) -> int:
    return byo(["torch", *map(str, argv)])


@pytest.fixture(scope="module")
def registered(files, env):
    rc = _cli(
        EXAMPLE,
        "--weights",
        files / "cnn.safetensors",
        "--data",
        files / "eval.npz",
        "--name",
        MODEL_ID,
    )
    assert rc == 0
    from engine.families import load_model
    from engine.trace_store import load_trace

    x = torch.from_numpy(np.load(files / "eval.npz")["x"])
    return load_model(MODEL_ID), x, load_trace(MODEL_ID, build_if_missing=False)


def test_card_and_trace_are_saved_where_the_app_looks(registered, files):
    from engine.paths import user_models_dir
    from engine.registry import get_card, sha256_file
    from engine.run.exits import exit_costs
    from engine.trace_store import available_traces, user_trace_file

    model, x, trace = registered
    card = get_card(MODEL_ID)
    assert card.user and card.family == "torch_protocol"
    assert card.weights_path.parent == user_models_dir()
    assert card.raw["weights_sha256"] == sha256_file(card.weights_path)
    assert card.config["file_sha256"] == sha256_file(EXAMPLE)
    assert card.config["input_shape"] == [3, 32, 32] and len(card.config["classes"]) == 10
    assert (MODEL_ID, "test") in available_traces()
    assert user_trace_file(MODEL_ID).exists()
    # the trace is the user's own network on the user's own data, every exit, every sample
    assert trace.num_samples == N and trace.num_exits == 3 and trace.num_classes == 10
    assert np.array_equal(trace.label, np.load(files / "eval.npz")["y"])
    with torch.no_grad():
        logits = model(x[:256])
    want = torch.stack([torch.softmax(z, -1) for z in logits], 1).numpy()
    assert np.array_equal(trace.probs[:256], want)
    cum = exit_costs(model, (3, 32, 32)).cumulative
    assert np.array_equal(trace.cost[0], cum) and (np.diff(cum) > 0).all()
    # the exits' confidences spread, so the policies below really split the samples
    assert 0.1 < (trace.max_prob[:, 0] > 0.9).mean() < 0.9


def test_a_lost_trace_is_rebuilt_from_the_recorded_data(registered):
    from engine.trace_store import load_trace, user_trace_file

    _, _, trace = registered
    user_trace_file(MODEL_ID).unlink()
    rebuilt = load_trace(MODEL_ID)  # the family traces the card's model on the card's data
    assert user_trace_file(MODEL_ID).exists()
    assert np.array_equal(rebuilt.probs, trace.probs) and np.array_equal(rebuilt.cost, trace.cost)


def _policies(trace) -> list[Policy]:
    mp = trace.max_prob[:, 0]
    out = [Policy("max_prob", threshold=t) for t in (0.5, 0.9, float(np.median(mp)))]
    out += [Policy("entropy", threshold=float(np.median(trace.entropy_norm[:, 0])))]
    out += [Policy("margin", threshold=float(np.median(trace.margin[:, 1])))]
    out += [Policy("patience", patience=p) for p in range(trace.num_exits)]
    out += [Policy("per_exit", thresholds=(0.95, 0.8, 0.5))]
    return out


def test_runtime_torch_agrees_with_the_trace_bit_for_bit(registered):
    from engine.run.runtime import EarlyExitRunner

    model, x, trace = registered
    runner = EarlyExitRunner(model, "torch", device="cpu")
    assert runner.input_shape == (3, 32, 32)
    rows = np.arange(N)
    for policy in _policies(trace):
        res = runner.run(x, policy)
        want = exit_index(trace, policy)
        assert np.array_equal(res.exit, want), policy
        assert np.array_equal(res.pred, trace.pred[rows, want]), policy
        assert np.array_equal(res.probs, trace.probs[rows, want]), policy
        assert np.array_equal(res.flops, trace.cost[rows, want]), policy
        # later stages never see the samples that left: stage k ran on those exiting at >= k
        assert res.stage_rows == [int((want >= k).sum()) for k in range(3)], policy
    with pytest.raises(ValueError, match=r"this model takes \(3, 32, 32\)"):
        runner.run(x[:, :, :28, :28], Policy("fixed", exit=0))


def test_runtime_onnx_agrees_with_the_trace(registered):
    from engine.run.runtime import run

    model, x, trace = registered
    policy = Policy("max_prob", threshold=float(np.median(trace.max_prob[:, 0])))
    res = run(model, x, policy, "onnx", model_id=MODEL_ID)
    want = exit_index(trace, policy)
    assert (res.exit == want).mean() >= 0.99
    same = res.exit == want
    np.testing.assert_allclose(
        res.probs[same], trace.probs[np.flatnonzero(same), want[same]], atol=1e-5
    )


def test_tuning_page_lists_and_tunes_it(registered):
    from app import figures
    from engine.core import tradeoff

    _, _, trace = registered
    at = AppTest.from_file(str(ROOT / "pages" / "tuning.py"), default_timeout=90)
    at.query_params["model"] = MODEL_ID
    at.query_params["policy"] = "max_prob"
    at.query_params["t"] = "0.9"
    at.run()
    assert not at.exception, at.exception
    picker = at.selectbox(key="w.model")
    assert MODEL_ID in picker.options and picker.value == MODEL_ID
    s = tradeoff.evaluate(trace, exit_index(trace, Policy("max_prob", threshold=0.9)))
    shown = {m.label: m.value for m in at.metric}
    assert shown["Accuracy"] == f"{s.accuracy:.4f}"
    assert shown["Mean FLOPs"] == figures.fmt_flops(s.mean_cost) + "FLOPs"


def _inspector(model_id: str, sample: int) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / "inspector.py"), default_timeout=120)
    at.query_params["model"] = model_id
    at.query_params["sample"] = str(sample)
    at.query_params["policy"] = "max_prob"
    at.query_params["t"] = "0.9"
    return at.run()


def test_inspector_runs_a_3x32x32_sample_and_explains_it(registered):
    from engine.run.exits import input_exits

    model, x, trace = registered
    at = _inspector(MODEL_ID, 7)
    assert not at.exception, at.exception
    probs = input_exits(model, x[7].numpy())
    np.testing.assert_allclose(probs, trace.probs[7], atol=1e-5)
    k = int(exit_index(probs, Policy("max_prob", threshold=0.9)))
    shown = {m.label: m.value for m in at.metric}
    assert shown["Policy exits at"] == trace.meta.exit_names[k]
    assert shown["Prediction"] == trace.meta.class_names[int(probs[k].argmax())]
    assert at.get("image"), "the 3×32×32 sample and its gallery are drawn"
    assert "Upload an image" not in at.radio(key="w.input_source").options
    charts = len(at.get("plotly_chart"))
    at.button(key="current.attr").click().run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == charts + 1
    assert any("IG convergence delta" in c.value for c in at.caption)


def test_inspector_and_attributions_on_a_non_image_input(env, tmp_path):
    from engine.run import inspection

    (tmp_path / "mlp.py").write_text(MLP)
    _weights(tmp_path / "mlp.py", tmp_path / "mlp.safetensors")
    _data(tmp_path / "feat.safetensors", (40,), 3, n=50)
    args = ["--weights", tmp_path / "mlp.safetensors", "--data", tmp_path / "feat.safetensors"]
    assert _cli(tmp_path / "mlp.py", *args, "--name", "my_mlp") == 0
    at = _inspector("my_mlp", 3)
    assert not at.exception, at.exception
    assert any("not an image" in i.value for i in at.info)
    at.button(key="current.attr").click().run()
    assert not at.exception, at.exception
    assert any("features" in c.value for c in at.caption)
    # Captum on a flat input: one row of 40 features per map
    from engine.families import load_model

    a = inspection.attribute(load_model("my_mlp"), np.ones(40, np.float32), 1)
    assert a.integrated_gradients.shape == (1, 40) and a.saliency.shape == (1, 40)


def test_an_edited_model_file_is_refused_until_registered_again(files, env, tmp_path):
    from engine.families import load_model

    mine = tmp_path / "cnn_copy.py"
    shutil.copy(EXAMPLE, mine)
    args = ["--weights", files / "cnn.safetensors", "--data", files / "eval.npz"]
    assert _cli(mine, *args, "--name", "edited") == 0
    load_model("edited")
    mine.write_text(mine.read_text() + "\n# edited\n")
    with pytest.raises(ByoError, match="changed since it was registered.*--overwrite"):
        load_model("edited")
    assert _cli(mine, *args, "--name", "edited", "--overwrite") == 0
    load_model("edited")


# --- bad input: one sentence each, exit code 2, nothing replaced -----------------------------

SWAP = """
import torch


class {name}(torch.nn.Sequential):
    def forward(self, x):
        y = super().forward(x)
        return {expr}


def build_model():
    m = SmallCNN()
    m.{where}.__class__ = {name}
    return m
"""

BROKEN_FILES = {
    "no build function": (
        lambda s: s.replace("def build_model()", "def make_model()"),
        "defines no build_model() function",
    ),
    "heads of another length": (
        lambda s: s.replace("for w in widths)", "for w in widths[:2])"),
        "has 3 stages and 2 heads",
    ),
    "no stages": (
        lambda s: s + "\n\ndef build_model():\n    return nn.Linear(2, 2)\n",
        "needs `stages` and `heads`",
    ),
    "stage changes the batch size": (
        lambda s: s + SWAP.format(name="Twice", expr="torch.cat([y, y])", where="stages[1]"),
        "stage 1 turns a batch of 4 into 8 rows",
    ),
    "head not batch by classes": (
        lambda s: s + SWAP.format(name="Col", expr="y[..., None]", where="heads[0]"),
        "head 0 returns (4, 10, 1)",
    ),
    "heads with different classes": (
        lambda s: s.replace(
            "for w in widths)", "for w in widths)\n        self.heads[2][-1] = nn.Linear(64, 4)"
        ),
        "head 2 predicts 4 classes but head 0 predicts 10",
    ),
    "samples mixed within a batch": (
        lambda s: (
            s + SWAP.format(name="Mix", expr="y - y.mean(0, keepdim=True)", where="stages[2]")
        ),
        "exit 2's logits for a sample change with the other samples in its batch",
    ),
    "no input shape": (
        lambda s: s.replace("INPUT_SHAPE = (3, 32, 32)", "INPUT_SHAPE = None"),
        "needs INPUT_SHAPE",
    ),
}


def _saved_state():
    from engine.paths import user_models_dir, user_traces_dir

    return {
        p.name: p.read_bytes()
        for d in (user_models_dir(), user_traces_dir())
        for p in sorted(d.iterdir())
    }


def _refused(capsys, argv, fragment: str) -> str:
    capsys.readouterr()
    before = _saved_state()
    assert _cli(*argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert _saved_state() == before, "a refused input changed the user model folder"
    return lines[0]


@pytest.mark.parametrize("case", list(BROKEN_FILES), ids=lambda c: c.replace(" ", "_"))
def test_a_file_that_breaks_the_protocol_is_refused(case, registered, files, tmp_path, capsys):
    edit, fragment = BROKEN_FILES[case]
    bad = tmp_path / "bad.py"
    bad.write_text(edit(EXAMPLE.read_text()))
    args = ["--weights", files / "cnn.safetensors", "--data", files / "eval.npz"]
    # under the registered model's own name: refused, and the saved model is left as it was
    _refused(capsys, [bad, *args, "--name", MODEL_ID, "--overwrite"], fragment)


def _bad_weights(files: Path, d: Path, how: str) -> Path:
    from safetensors.torch import load_file

    sd = load_file(files / "cnn.safetensors")
    if how == "missing":
        del sd["stages.1.0.weight"]
    elif how == "unexpected":
        sd["heads.3.2.weight"] = torch.zeros(2)
    elif how == "shape":
        sd["heads.0.2.bias"] = torch.zeros(11)
    path = d / f"{how}.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize(
    ("how", "fragment"),
    [
        ("missing", "lacks the model's weight 'stages.1.0.weight'"),
        ("unexpected", "has a weight 'heads.3.2.weight' that the model does not have"),
        ("shape", "weight 'heads.0.2.bias' has shape (11,) but the model's is (10,)"),
    ],
)
def test_weights_that_do_not_match_name_the_key(how, fragment, registered, files, tmp_path, capsys):
    w = _bad_weights(files, tmp_path, how)
    argv = [
        EXAMPLE,
        "--weights",
        w,
        "--data",
        files / "eval.npz",
        "--name",
        MODEL_ID,
        "--overwrite",
    ]
    _refused(capsys, argv, fragment)


def test_pickles_are_refused_unopened(registered, files, tmp_path, capsys):
    pt = tmp_path / "cnn.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    argv = [EXAMPLE, "--weights", pt, "--data", files / "eval.npz", "--name", MODEL_ID]
    _refused(capsys, argv, "pickle-based format")
    disguised = tmp_path / "cnn.safetensors"
    shutil.copy(pt, disguised)
    argv[2] = disguised
    _refused(capsys, argv, "is not a readable safetensors file")
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    argv = [EXAMPLE, "--weights", files / "cnn.safetensors", "--data", objects, "--name", "x1"]
    _refused(capsys, argv, "could not be read")


@pytest.mark.parametrize(
    ("shape", "label", "fragment"),
    [
        ((3, 28, 28), 0, "x has shape (20, 3, 28, 28) but the model takes [N, 3, 32, 32]"),
        ((3, 32, 32), 12, "label 12 is outside 0..9 (the heads predict 10 classes)"),
    ],
)
def test_data_that_does_not_fit_is_refused(
    shape, label, fragment, registered, files, tmp_path, capsys
):
    d = tmp_path / "bad.npz"
    y = np.zeros(20, np.int64)
    y[3] = label
    np.savez(d, x=np.zeros((20, *shape), np.float32), y=y)
    argv = [EXAMPLE, "--weights", files / "cnn.safetensors", "--data", d, "--name", MODEL_ID]
    _refused(capsys, [*argv, "--overwrite"], fragment)


def test_an_existing_model_is_replaced_only_with_overwrite(registered, files, capsys):
    from engine.registry import get_card

    card = get_card(MODEL_ID).path.read_bytes()
    argv = [EXAMPLE, "--weights", files / "cnn.safetensors", "--data", files / "eval.npz"]
    line = _refused(capsys, [*argv, "--name", MODEL_ID], "pass --overwrite to replace it")
    assert MODEL_ID in line and get_card(MODEL_ID).path.read_bytes() == card
    assert json.loads(card)["family"] == "torch_protocol"


def test_the_command_line_exits_2_with_one_line(files, tmp_path):
    bad = tmp_path / "nobuild.py"
    bad.write_text("INPUT_SHAPE = (3, 32, 32)\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.byo",
            "torch",
            str(bad),
            "--weights",
            str(files / "cnn.safetensors"),
            "--data",
            str(files / "eval.npz"),
            "--name",
            "z",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            "AIE_DATA_DIR": str(tmp_path / "data"),
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
        },
    )
    assert out.returncode == 2, out.stderr
    assert (
        out.stderr.strip()
        == "error: nobuild.py defines no build_model() function returning the nn.Module"
    )
    assert not list((tmp_path / "data" / "models").glob("*"))
