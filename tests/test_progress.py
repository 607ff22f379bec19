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
from engine.core.progress import Bars, silent, terminal, track
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
    assert "per-exit test accuracy" in out and "trained in" in out  # the summary stays
    assert "loss" not in out  # no hand-written per-epoch lines any more


def test_cli_trainer_is_quiet_off_a_terminal(tmp_path):
    run = subprocess.run(_train_cmd(tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "epoch 1/2" not in run.stderr and "%|" not in run.stderr
    assert "per-exit test accuracy" in run.stdout


def test_training_reports_every_step_of_every_epoch(tmp_path):
    from engine.families.multi_exit_cnn import train

    rec = Recorder()
    argv = _train_cmd(tmp_path)[4:]
    train.main(argv, progress=rec)
    assert rec.labels() == ["epoch 1/2", "epoch 2/2"]
    rec.assert_monotone()
    assert rec.calls[-1] == (8, 8, "epoch 2/2")


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
