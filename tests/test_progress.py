"""Long work says how far it has got: tqdm bars with the time left on a terminal, nothing off
one, (done, total) rising to a caller's callback, and a bar with the time left on the page."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from app.progress import meter
from engine.core.progress import Bars, Meter, show, silent, terminal, track
from engine.paths import MODELS_DIR

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits_multi_exit_cnn"  # bundled, small: its test split is 450 images
ETA = re.compile(r"\[\d\d:\d\d<\d\d:\d\d")  # tqdm's [elapsed<remaining]


class Recorder:
    """A Progress that keeps every call."""

    def __init__(self):
        self.calls: list[tuple[float, float, str]] = []

    def __call__(self, done, total, label):
        self.calls.append((done, total, label))

    def labels(self) -> list[str]:
        return list(dict.fromkeys(label for _, _, label in self.calls))

    def assert_monotone(self) -> None:
        """Per label: one total, done rising from 0 to it."""
        assert self.calls
        for label in self.labels():
            done = [d for d, _, lab in self.calls if lab == label]
            totals = {t for _, t, lab in self.calls if lab == label}
            assert len(totals) == 1, (label, totals)
            assert done[0] == 0 and done[-1] == totals.pop(), (label, done)
            assert done == sorted(done), (label, done)


class Shown(Recorder):
    """A Progress that also keeps what was shown beside each bar (``engine.core.progress.show``)."""

    def __init__(self):
        super().__init__()
        self.shown: list[tuple[str, dict[str, float]]] = []

    def show(self, label, values):
        self.shown.append((label, values))

    def last(self, label: str) -> dict[str, float]:
        return [v for lab, v in self.shown if lab == label][-1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_draw_on_a_terminal_and_stay_quiet_off_one():
    tty, pipe = Terminal(), io.StringIO()
    for out in (tty, pipe):
        for _ in track(range(3), "epoch 1/1", Bars(file=out)):
            pass
    assert "epoch 1/1: 100%" in tty.getvalue() and ETA.search(tty.getvalue())
    assert pipe.getvalue() == ""
    quiet = Terminal()
    for _ in track(range(3), "epoch 1/1", Bars(quiet=True, file=quiet)):
        pass
    assert quiet.getvalue() == "" and terminal(quiet=True) is silent


def test_bars_show_the_numbers_beside_the_bar_and_keep_them_when_it_closes():
    """On a terminal the closed bar keeps its postfix; off one each bar's numbers are one line;
    a score shown after its bar closed gets a line of its own; quiet shows nothing."""
    from tqdm import tqdm

    tty, pipe, quiet = Terminal(), io.StringIO(), Terminal()
    for out in (tty, pipe, quiet):
        bars = Bars(quiet=out is quiet, file=out)
        meter = Meter(bars, "epoch 1/1")
        for i in track(range(4), "epoch 1/1", bars):
            meter.add(2 if i else 1, loss=0.5 * i)  # weighted: (0 + 1 + 2 + 3) / 7
        show(bars, "epoch 1/1", val_acc=0.875)  # computed once the epoch is over
    loss = tqdm.format_num(6 / 7)
    assert meter.means == {"loss": pytest.approx(6 / 7)}
    drawn, after = tty.getvalue().rsplit("\r", 1)[-1].split("\n", 1)  # the bar as left
    assert "4/4" in drawn and f"loss={loss}]" in drawn, tty.getvalue()
    assert after == "epoch 1/1: val_acc=0.875\n"
    assert pipe.getvalue() == f"epoch 1/1: loss={loss}\nepoch 1/1: val_acc=0.875\n"
    assert quiet.getvalue() == ""
    # sinks without ``show`` (the app's bar, silent, a lambda) are left alone
    show(silent, "x", loss=1.0)
    show(None, "x", loss=1.0)
    Meter(lambda done, total, label: None, "x").add(loss=1.0)


def test_a_window_meter_shows_the_last_steps():
    rec = Shown()
    meter = Meter(rec, "steps", window=2)
    for v in (10.0, 1.0, 2.0, 3.0):
        meter.add(loss=v)
    assert [v["loss"] for _, v in rec.shown] == [10.0, 5.5, 1.5, 2.5]


def test_track_reports_zero_then_each_item():
    rec = Recorder()
    assert list(track("abc", "letters", rec)) == ["a", "b", "c"]
    assert rec.calls == [(0, 3, "letters"), (1, 3, "letters"), (2, 3, "letters"), (3, 3, "letters")]
    assert list(track([], "nothing", rec)) == [] and len(rec.calls) == 4


def _on_a_terminal(cmd: list[str], timeout: float = 300) -> tuple[str, str]:
    """(stdout, what the command wrote to a 120-column terminal on stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "COLUMNS": "120"}
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read().decode()
    proc.wait(timeout=timeout)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return out, b"".join(chunks).decode(errors="replace")


def _train_cmd(out_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engine.train",
        "multi_exit_cnn",
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--max-train",
        "256",
        "--max-test",
        "100",
        "--batch-size",
        "32",
        "--out-dir",
        str(out_dir),
        *extra,
    ]


def test_cli_trainer_draws_a_bar_per_epoch_with_the_time_left(tmp_path):
    out, err = _on_a_terminal(_train_cmd(tmp_path))
    for epoch in ("epoch 1/2", "epoch 2/2"):
        assert f"{epoch}: 100%" in err, err
        assert "8/8" in err  # 256 images in batches of 32: the bar counts steps
    assert ETA.search(err), err
    assert re.search(r"8/8 \[[^]]*loss=\d", err), err  # the epoch's loss on its finished bar
    assert "per-exit test accuracy" in out and "trained in" in out  # the summary stays
    assert "loss" not in out  # no hand-written per-epoch lines any more


def test_cli_trainer_logs_each_epochs_loss_off_a_terminal_and_nothing_when_quiet(tmp_path):
    run = subprocess.run(_train_cmd(tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "%|" not in run.stderr  # no bar drawn into a log
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"], run.stderr
    assert all(re.fullmatch(r"epoch \d/2: loss=[\d.e+-]+", ln) for ln in lines), lines
    assert "per-exit test accuracy" in run.stdout
    quiet = subprocess.run(
        _train_cmd(tmp_path, "--quiet"), cwd=ROOT, capture_output=True, text=True
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "epoch" not in quiet.stderr and "loss" not in quiet.stderr


def test_training_reports_every_step_of_every_epoch(tmp_path):
    from engine.families.multi_exit_cnn import train

    rec = Recorder()
    argv = _train_cmd(tmp_path)[4:]
    train.main(argv, progress=rec)
    assert rec.labels() == ["epoch 1/2", "epoch 2/2"]
    rec.assert_monotone()
    assert rec.calls[-1] == (8, 8, "epoch 2/2")


def test_the_image_loop_shows_each_epochs_loss_with_its_value():
    """run_epochs (every image trainer's loop) on a tiny CNN: the line each epoch leaves is
    the batch-size-weighted mean of that epoch's losses."""
    import argparse

    from tqdm import tqdm

    from engine.families.multi_exit_cnn.loop import run_epochs

    torch.manual_seed(0)
    x, y = torch.randn(70, 1, 8, 8), torch.randint(0, 3, (70,))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    seen: list[tuple[float, int]] = []

    def loss_fn(xb, yb):
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        seen.append((loss.item(), len(yb)))
        return loss

    out = io.StringIO()
    args = argparse.Namespace(
        lr=1e-2, weight_decay=0.0, batch_size=32, quiet=False, progress=Bars(file=out)
    )
    run_epochs(list(net.parameters()), loss_fn, [net], x, y, args, 2, 0)
    assert len(seen) == 6  # 3 steps (32, 32, 6) per epoch
    want = [
        f"epoch {e + 1}/2: loss="
        + tqdm.format_num(sum(v * n for v, n in seen[3 * e : 3 * e + 3]) / 70)
        for e in range(2)
    ]
    assert out.getvalue().splitlines() == want


TRAINERS = ["act", "pondernet", "skipnet", "moe", "early_exit_lm", "multi_exit_bert", "jei"]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_shows_its_loss_beside_its_bar(trainer, tmp_path):
    """The other trainers, each for a few steps: every bar gets a finite loss beside it."""
    import argparse
    import math

    import numpy as np

    torch.set_num_threads(1)
    rec = Shown()
    if trainer == "act":
        from engine.families.act import model as act
        from engine.families.act import train

        args = train.parser().parse_args(["--num-bits", "6", "--hidden", "8", "--steps", "3"])
        cfg = act.Config(num_bits=6, hidden=8, max_steps=4)
        train.train(act.ACTNet(cfg), args, rec)
    elif trainer == "pondernet":
        from engine.families.pondernet import model as pn
        from engine.families.pondernet import train

        args = train.parser().parse_args(["--num-bits", "6", "--hidden", "8"])
        train.train(pn.build({"num_bits": 6, "hidden": 8, "max_steps": 4}), args, 3, rec)
    elif trainer == "skipnet":
        from engine.families.skipnet import train

        train.main(
            ["--dataset", "digits", "--max-train", "64", "--max-test", "16",
             "--warmup-epochs", "1", "--epochs", "1", "--max-steps-train", "2",
             "--out-dir", str(tmp_path), "--traces-dir", str(tmp_path), "--model-id", "t"],
            progress=rec,
        )  # fmt: skip
    elif trainer == "moe":
        from engine.families.moe import train

        params = [torch.nn.Parameter(torch.ones(3))]
        args = argparse.Namespace(lr=1e-2, weight_decay=0.0, batch_size=4, seed=0, quiet=False)
        train.train_loop(params, lambda idx, step: (params[0] ** 2).sum(), 8, args, 1, "t", rec)
    elif trainer == "early_exit_lm":
        from engine.families.early_exit_lm import model as lm
        from engine.families.early_exit_lm import train

        m = lm.build({"n_layer": 2, "n_head": 2, "d_model": 16, "block_size": 32})
        data = train.encode_array("the cat sat on the mat. " * 50, m.config.vocab)
        args = train.parse(["--steps", "3", "--batch", "4", "--seq", "16"])
        train.train(m, data, args, rec)
    elif trainer == "multi_exit_bert":
        from engine.families.multi_exit_bert import train

        class Head(torch.nn.Linear):
            def from_features(self, f):
                return self(f)

        heads = torch.nn.ModuleList([Head(4, 2) for _ in range(2)])
        model = argparse.Namespace(heads=heads)
        args = argparse.Namespace(lr=1e-2, weight_decay=0.0, epochs=2, seed=0)
        feats = np.random.default_rng(0).normal(size=(10, 2, 4)).astype(np.float32)
        train.train_heads(model, feats, np.arange(10) % 2, args, rec)
    else:
        from engine.families.multi_exit_cnn import train_jei
        from engine.families.multi_exit_cnn.model import JointGates

        feats = [torch.randn(20, 4) for _ in range(3)]
        heads = [torch.nn.Linear(4, 2) for _ in range(3)]
        cfg = train_jei.JointConfig(warmup_epochs=1, epochs=1, batch_size=8)
        y = torch.arange(20) % 2
        train_jei.fit_joint(feats, y, heads, JointGates(3, 2), np.array([0.2, 0.5, 1.0]), cfg, rec)
    bars = [lab for lab in rec.labels() if "epoch" in lab or lab == "steps"]
    assert bars, rec.labels()
    for label in bars:
        assert math.isfinite(rec.last(label)["loss"]), (label, rec.shown)


def test_build_reports_the_trace_batches(tmp_path):
    from engine.build import build

    rec = Recorder()
    line = build(MODEL, tmp_path / "t.parquet", "test", None, False, progress=rec)
    assert "450 samples" in line
    rec.assert_monotone()
    assert rec.labels() == ["trace"] and rec.calls[-1] == (2, 2, "trace")  # 450 in 256s


def test_gates_report_every_exit():
    from engine.core import gates
    from engine.trace_store import load_trace

    rec = Recorder()
    trace = load_trace(MODEL, build_if_missing=False)
    gates.fit(trace, progress=rec)
    rec.assert_monotone()
    assert rec.calls[-1] == (trace.num_exits - 1, trace.num_exits - 1, "gates (exits)")


def test_onnx_export_and_quantisation_report_every_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.families import load_model
    from engine.run.onnx_export import export_chain, quantize_chain

    torch.set_num_threads(1)
    model = load_model(MODEL)
    rec = Recorder()
    chain = export_chain(model, directory=tmp_path, progress=rec)
    quantize_chain(model, chain, torch.zeros(8, 1, 28, 28), progress=rec)
    rec.assert_monotone()
    k = len(model.stages)
    assert rec.labels() == ["ONNX export (stages)", "int8 quantisation (graphs)"]
    assert rec.calls[k][:2] == (k, k) and rec.calls[-1][:2] == (2 * k, 2 * k)


def test_page_bar_shows_the_loss_beside_the_meter(monkeypatch):
    from app import progress as page_progress
    from engine.core.progress import Meter

    drawn = []

    class FakeBar:
        def progress(self, fraction, text=""):
            drawn.append((fraction, text))

    monkeypatch.setattr(page_progress.st, "progress", lambda *a, **k: FakeBar())
    bar = page_progress.PageBar("training")
    m = Meter(bar, "epoch 1/2")
    bar(0, 4, "epoch 1/2")
    m.add(2, loss=0.5)
    bar(1, 4, "epoch 1/2")
    m.add(2, loss=0.25)
    assert drawn[-1][1].startswith("epoch 1/2: 25%") and drawn[-1][1].endswith("loss=0.375")
    bar(0, 4, "epoch 2/2")  # a new bar: no loss until its first step
    assert "loss" not in drawn[-1][1]


def test_page_meter_is_tqdms_with_the_time_left():
    assert meter(0, 10, 0.0, "trace") == "trace: starting…"
    assert meter(4, 10, 4.0, "trace") == "trace: 40% · 00:04 so far, about 00:06 left"


@pytest.fixture
def user_copy(tmp_path, monkeypatch):
    """The bundled digits CNN registered again as a user's model, so it has no trace yet."""
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    card = json.loads((MODELS_DIR / f"{MODEL}.json").read_text())
    card["model_id"] = "digits_copy"
    (models / "digits_copy.json").write_text(json.dumps(card))
    shutil.copy(MODELS_DIR / f"{MODEL}.safetensors", models / "digits_copy.safetensors")
    st.cache_data.clear()
    st.cache_resource.clear()
    yield "digits_copy"
    st.cache_data.clear()
    st.cache_resource.clear()


def test_page_builds_a_missing_trace_with_a_bar_and_the_time_left(user_copy, tmp_path):
    at = AppTest.from_file(str(ROOT / "pages" / "inspector.py"), default_timeout=120)
    at.query_params["model"] = user_copy
    at.run()
    assert not at.exception, at.exception
    box = [s for s in at.status if user_copy in s.label]
    assert len(box) == 1 and box[0].state == "complete", [s.label for s in at.status]
    assert box[0].label.startswith(f"Built the trace of {user_copy}")
    bars = [p for p in at.get("progress") if p.text.startswith("trace:")]
    assert bars and bars[-1].value == 100 and bars[-1].text.endswith(" left"), bars
    assert (tmp_path / "data" / "traces" / f"{user_copy}__test.parquet").exists()
    assert not at.error, [e.value for e in at.error]
    # built once: the next run reads it, with no box
    at.run()
    assert not at.exception and not [s for s in at.status if user_copy in s.label]


def test_language_page_shows_the_models_first_load(tmp_path, monkeypatch):
    from tests.helpers_lm import N_LAYER, save_tiny_lm

    card = save_tiny_lm(tmp_path / "tiny_lm")
    raw = json.loads(card.read_text())
    raw["config"]["n_layer"] = N_LAYER  # as SmolLM2's card: the page needs no load to draw
    card.write_text(json.dumps(raw))
    monkeypatch.setenv("AIE_LM_CARD", str(card))
    st.cache_resource.clear()  # a first load in this process
    at = AppTest.from_file(str(ROOT / "pages" / "language.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    at.button(key="slm.go").click().run()
    assert not at.exception, at.exception
    box = [s for s in at.status if s.label.startswith("Loaded ")]
    assert len(box) == 1 and box[0].state == "complete", [s.label for s in at.status]
    bars = [p for p in at.get("progress") if p.text.startswith("Loading weights:")]
    assert bars and bars[-1].value == 100 and bars[-1].text.endswith(" left"), bars
    st.cache_resource.clear()
