"""Per-token traces from other tools (engine.byo.foreign): CALM-style arrays and per-layer LM
traces, through ``python -m engine.byo trace`` and through the tuning page's upload, with one
sentence for every bad file."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app import figures, loaders
from engine.byo import foreign
from engine.byo.__main__ import main as byo_main
from engine.core import tradeoff
from engine.core.policies import Policy, exit_index
from engine.core.trace import TraceError
from engine.core.trace import read as read_trace
from engine.registry import get_card
from engine.trace_store import available_traces, load_trace, user_trace_file

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "pages" / "tuning.py")
L = 8  # decoder layers of the CALM run below


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def calm_arrays(b: int = 6, t: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """A plausible CALM run at threshold 0.8: most tokens leave early and confident, some run
    all layers; t5x's -1 pads the end of every row but the first."""
    rng = np.random.default_rng(seed)
    exits = rng.integers(1, L + 1, (b, t)).astype(np.int32)
    conf = np.where(exits < L, rng.uniform(0.8, 1.0, (b, t)), rng.uniform(0.2, 1.0, (b, t)))
    agree = rng.uniform(size=(b, t)) < np.where(conf > 0.9, 0.95, 0.6)
    lengths = rng.integers(t // 2, t + 1, b)
    lengths[0] = t
    pad = np.arange(t)[None, :] >= lengths[:, None]
    exits[pad] = -1
    conf = np.where(pad, -1.0, conf).astype(np.float32)
    return {
        "exits": exits,
        "confidences": conf,
        "agree": agree & ~pad,
        "num_layers": np.array(L),
        "threshold": np.array(0.8),
    }


# 3 tokens x 4 layers whose answer is known by hand
TOP1 = np.array([[5, 7, 7, 7], [1, 2, 3, 3], [9, 9, 9, 4]])
CONF = np.array([[0.2, 0.6, 0.9, 0.95], [0.5, 0.55, 0.7, 0.8], [0.9, 0.3, 0.4, 0.99]])


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("AIE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    st.cache_data.clear()
    st.cache_resource.clear()
    yield tmp_path
    st.cache_data.clear()
    st.cache_resource.clear()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = byo_main(["trace", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _app(**qp) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    for k, v in qp.items():
        at.query_params[k] = v
    return at.run()


def _shown(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _expected(trace, policy: Policy) -> dict[str, str]:
    s = tradeoff.evaluate(trace, exit_index(trace, policy))
    return {
        "Mean layers": figures.fmt_flops(s.mean_cost) + "layers",
        "Accuracy": f"{s.accuracy:.4f}",
    }


# --- the formats -------------------------------------------------------------------------------


def test_lm_token_trace_by_hand():
    trace = foreign.read(npz(top1=TOP1, confidence=CONF), "lens.npz")
    assert (trace.num_samples, trace.num_exits, trace.meta.cost_unit) == (3, 4, "layers")
    # at 0.6: token 0 passes at layer 2 (7 = last layer's 7), token 1 at layer 3 (3 = 3),
    # token 2 at layer 1 (9, the last layer says 4)
    exits = exit_index(trace, Policy("max_prob", threshold=0.6))
    assert exits.tolist() == [1, 2, 0]
    stats = tradeoff.evaluate(trace, exits)
    assert stats.accuracy == pytest.approx(2 / 3) and stats.mean_cost == pytest.approx(2.0)
    # at 0.95 only token 0's layer 4 and token 2's layer 4 pass; token 1 falls back to the last
    exits = exit_index(trace, Policy("max_prob", threshold=0.95))
    assert exits.tolist() == [3, 3, 3]
    assert tradeoff.evaluate(trace, exits).accuracy == 1.0
    # a slice (the page's linked selection) keeps each token's own confidences
    np.testing.assert_array_equal(trace.subset(np.array([2])).max_prob, CONF[[2]])
    # the same tokens as [batch, length, layers] with a padded slot and a reference text
    top1 = np.array([[TOP1[0], TOP1[1]], [TOP1[2], TOP1[0]]])  # slot [1, 1] is padding
    conf = np.array([[CONF[0], CONF[1]], [CONF[2], [np.nan] * 4]])  # padding may hold anything
    mask = np.array([[1, 1], [1, 0]])
    ref = np.array([[7, 2], [9, 0]])  # the text's tokens: token 1 is right at layer 2 only
    trace = foreign.read(npz(top1=top1, confidence=conf, mask=mask, reference=ref), "b.npz")
    assert trace.sample_id.tolist() == ["0:0", "0:1", "1:0"]
    exits = exit_index(trace, Policy("max_prob", threshold=0.6))
    assert exits.tolist() == [1, 2, 0]
    assert trace.correct[np.arange(3), exits].tolist() == [True, False, True]


def test_lm_token_trace_from_safetensors_round_trips_through_parquet():
    from safetensors.numpy import save

    data = save({"top1": TOP1.astype(np.int64), "confidence": CONF.astype(np.float32)})
    trace = foreign.read(data, "lens.safetensors")
    again = read_trace(trace.to_parquet_bytes(), "lens.parquet")
    np.testing.assert_array_equal(again.max_prob, CONF.astype(np.float32))
    for t in (0.3, 0.6, 0.85):
        p = Policy("max_prob", threshold=t)
        assert exit_index(again, p).tolist() == exit_index(trace, p).tolist()


def test_calm_file_is_exact_at_its_threshold_and_says_what_it_assumes():
    arrays = calm_arrays()
    trace = foreign.read(npz(**arrays), "calm.npz")
    real = arrays["exits"] != -1
    assert trace.num_samples == int(real.sum()) and trace.num_exits == L
    # at the run's threshold every token leaves where the run left it
    exits = exit_index(trace, Policy("max_prob", threshold=0.8))
    assert (exits + 1).tolist() == arrays["exits"][real].tolist()
    stats = tradeoff.evaluate(trace, exits)
    assert stats.mean_cost == pytest.approx(arrays["exits"][real].mean())
    assert stats.accuracy == pytest.approx(arrays["agree"][real].mean())
    # above it a token whose exit confidence is below the threshold is charged the last layer
    exits = exit_index(trace, Policy("max_prob", threshold=0.9))
    c, e = arrays["confidences"][real], arrays["exits"][real]
    assert (exits + 1).tolist() == np.where(c >= 0.9, e, L).tolist()
    agree = arrays["agree"][real]
    assert tradeoff.evaluate(trace, exits).accuracy == pytest.approx(
        # a token sent to the last layer counts as agreeing there (the full model agrees with
        # itself); one that ran all layers keeps the file's answer
        np.where((c >= 0.9) | (e == L), agree, True).mean()
    )
    note = trace.meta.extra["note"]
    assert "exact at the run's threshold 0.8" in note and "upper bound" in note
    with pytest.raises(Exception, match="entropy needs the whole output distribution"):
        _ = trace.entropy_norm


def test_upload_limit_is_the_tuning_pages():
    assert foreign.MAX_FILE_MB == loaders.MAX_TRACE_MB


# --- the command line and the tuning page ------------------------------------------------------


def test_calm_file_through_the_cli_is_tuned_on_the_page(env, capsys):
    path = env / "calm_run.npz"
    path.write_bytes(npz(**calm_arrays()))
    rc, out, err = _cli(capsys, str(path), "--name", "my-calm")
    assert rc == 0 and not err, err
    assert "saved my-calm" in out and "exact at the run's threshold" in out
    assert ("my-calm", "test") in available_traces()
    card = get_card("my-calm")
    assert card.user and card.family == "foreign_trace" and not card.weights_path.exists()
    trace = load_trace("my-calm")

    at = _app(model="my-calm", policy="max_prob", t="0.8")
    assert not at.exception, at.exception
    assert at.selectbox(key="w.model").value == "my-calm"
    assert any("exact at the run's threshold 0.8" in i.value.replace("\\", "") for i in at.info)
    # only the rules that need nothing but the top-1 confidence are offered
    assert at.selectbox(key="w.kind").options == [
        "Max probability (BranchyNet / MSDNet)",
        "Per-exit thresholds",
    ]
    before = _shown(at)
    for label, value in _expected(trace, Policy("max_prob", threshold=0.8)).items():
        assert before[label] == value, (label, before)
    at.slider(key="w.t.max_prob").set_value(0.95).run()
    assert not at.exception, at.exception
    after = _shown(at)
    for label, value in _expected(trace, Policy("max_prob", threshold=0.95)).items():
        assert after[label] == value, (label, after)
    assert after["Mean layers"] != before["Mean layers"]


def test_same_calm_file_uploaded_through_the_page(env):
    data = npz(**calm_arrays(seed=1))
    at = _app()
    at.file_uploader(key="w.trace_upload").upload("calm_run.npz", data, "application/zip")
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="w.model").value == "upload:calm_run"
    assert any("exact at the run's threshold" in i.value.replace("\\", "") for i in at.info)
    at.slider(key="w.t.max_prob").set_value(0.9).run()
    trace = foreign.read(data, "calm_run.npz")
    shown = _shown(at)
    for label, value in _expected(trace, Policy("max_prob", threshold=0.9)).items():
        assert shown[label] == value, (label, shown)


def test_nothing_is_overwritten_without_overwrite(env, capsys):
    first, second = env / "a.npz", env / "b.npz"
    first.write_bytes(npz(top1=TOP1, confidence=CONF))
    second.write_bytes(npz(top1=TOP1[:2], confidence=CONF[:2]))
    assert _cli(capsys, str(first), "--name", "lens")[0] == 0
    rc, _, err = _cli(capsys, str(second), "--name", "lens")
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert load_trace("lens").num_samples == 3
    assert _cli(capsys, str(second), "--name", "lens", "--overwrite")[0] == 0
    assert read_trace(user_trace_file("lens").read_bytes(), "x.parquet").num_samples == 2


# --- bad files: one sentence each, on the command line and on the page ------------------------


def _obj_npz() -> bytes:
    buf = io.BytesIO()
    exits = np.array([[1, None]], dtype=object)
    np.savez(buf, exits=exits, confidences=np.array([[0.9, 0.9]]))
    return buf.getvalue()


def _good() -> dict[str, np.ndarray]:
    return {"exits": np.array([[2, 3, -1]]), "confidences": np.array([[0.9, 0.5, -1.0]])}


BAD = [
    (
        "shape.npz",
        npz(exits=np.array([1, 2]), confidences=np.array([0.9, 0.9])),
        "exits`: must be [batch, length], got shape (2,)",
    ),
    (
        "bt.npz",
        npz(exits=np.array([[1, 2]]), confidences=np.array([[0.9, 0.9, 0.9]])),
        "confidences`: has shape (1, 3), but exits has (1, 2)",
    ),
    (
        "range.npz",
        npz(**_good(), num_layers=np.array(2)),
        "exits`: 3 at token [0, 1] is outside 1..2",
    ),
    (
        "over1.npz",
        npz(exits=np.array([[2, 3]]), confidences=np.array([[0.9, 1.5]])),
        "confidences`: 1.5 at token [0, 1] is outside [0, 1]",
    ),
    (
        "nan.npz",
        npz(exits=np.array([[2, 3]]), confidences=np.array([[np.nan, 0.5]])),
        "confidences`: NaN or infinity at token [0, 0]",
    ),
    (
        "empty.npz",
        npz(**_good(), mask=np.zeros((1, 3), dtype=bool)),
        "mask`: no tokens are left after masking",
    ),
    ("pickled.npz", _obj_npz(), "exits`: holds Python objects (pickled)"),
    (
        "below.npz",
        npz(**_good(), threshold=np.array(0.95)),
        "left at layer 2 below the run's threshold 0.95",
    ),
    ("broken.npz", b"PK\x03\x04 not a zip at all", "file`: not a readable .npz file"),
    ("other.npz", npz(logits=np.zeros((2, 3))), "neither a CALM file"),
    ("floats.npz", npz(top1=CONF, confidence=CONF), "top1`: must be integers, got float64"),
    (
        "lens_nan.npz",
        npz(top1=TOP1, confidence=np.where(np.eye(3, 4, 2) > 0, np.nan, CONF)),
        "confidence`: NaN or infinity at token [0] at layer 3",
    ),
    (
        "lens.npz",
        npz(top1=TOP1, confidence=CONF[:, :3]),
        "confidence`: has shape (3, 3), but top1 has (3, 4)",
    ),
    (
        "bad.safetensors",
        b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
        "file`: not a readable safetensors file",
    ),
]


@pytest.mark.parametrize("name,data,sentence", BAD, ids=[b[0] for b in BAD])
def test_bad_file_on_the_command_line(env, capsys, name, data, sentence):
    path = env / name
    path.write_bytes(data)
    rc, out, err = _cli(capsys, str(path), "--name", "bad")
    assert rc == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}: "), err
    assert sentence.replace("`", "") in lines[0]
    assert not user_trace_file("bad").exists()
    assert not (env / "data" / "models" / "bad.json").exists()


def test_too_large_and_unknown_files_on_the_command_line(env, capsys):
    big = env / "big.npz"
    with open(big, "wb") as f:
        f.truncate(foreign.MAX_FILE_MB * 1024 * 1024 + 1)  # sparse: nothing is written
    rc, _, err = _cli(capsys, str(big), "--name", "big")
    assert rc == 2 and f"larger than {foreign.MAX_FILE_MB} MB" in err
    text = env / "trace.txt"
    text.write_text("hello")
    rc, _, err = _cli(capsys, str(text), "--name", "txt")
    assert rc == 2 and "expected a .npz or .safetensors file" in err


def test_bad_file_as_a_real_process_is_one_line_and_no_traceback(env):
    path = env / "over1.npz"
    path.write_bytes(BAD[3][1])
    r = subprocess.run(
        [sys.executable, "-m", "engine.byo", "trace", str(path), "--name", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "AIE_DATA_DIR": str(env / "data")},
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: over1.npz: confidences: 1.5 at token [0, 1] is outside [0, 1]"
    ]


def test_bad_files_on_the_page(env, monkeypatch):
    at = _app()
    for name, data, sentence in BAD:
        at.file_uploader(key="w.trace_upload").upload(name, data, "application/octet-stream")
        at.run()
        assert not at.exception, (name, at.exception)
        errors = [e.value for e in at.error]
        assert any("rejected" in e and sentence in e.replace("\\", "") for e in errors), (
            name,
            errors,
        )
    # a file over the limit: the uploader (max_upload_size) drops it before the page sees it,
    # and the page's parser refuses it too, should one arrive
    monkeypatch.setattr(loaders, "MAX_TRACE_MB", 1)
    with pytest.raises(TraceError, match="larger than 1 MB"):
        loaders.parse_uploaded_trace(b"PK" + bytes(2 << 20), "big.npz")
