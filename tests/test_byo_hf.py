"""``python -m engine.byo hf``: a user's Hugging Face checkpoint, from files made here.

A tiny random BERT classifier + a keyword CSV -> exit heads trained -> a trace the tuning page
lists -> the real runtime agrees with it; a tiny Llama -> per-layer logit-lens results in its
card and a tuned lens trained on the text, in the user's lens folder; every bad input -> exit
code 2, one line on stderr, the user folder untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import streamlit as st  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from app.progress import meter  # noqa: E402
from engine.byo import __main__ as cli  # noqa: E402
from engine.byo import hf  # noqa: E402
from engine.core.policies import Policy, exit_index  # noqa: E402
from engine.families import cards_of_kind, get, load_model  # noqa: E402
from engine.families.hf_causal_lm import tuned_lens as TL  # noqa: E402
from engine.families.hf_encoder import model as hfe  # noqa: E402
from engine.registry import (  # noqa: E402
    RegistryError,
    get_card,
    list_cards,
    sha256_file,
    verified_weights,
)
from engine.run.runtime import EarlyExitRunner  # noqa: E402
from engine.trace_store import available_traces, load_trace, user_trace_file  # noqa: E402
from tests import helpers_byo as H  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)
FAST = ["--epochs", "25"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_files")
    return {
        "bert": H.tiny_bert(d / "bert"),
        "csv": H.keyword_csv(d / "reviews.csv"),
        "llama": H.tiny_llama(d / "llama"),
        "text": H.pattern_text(d / "notes.txt"),  # learnable: the tuned lens beats the logit lens
        "short": H.text_file(d / "short.txt", n_words=40),
        "dir": d,
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One user data folder for the module: the models below are trained once."""
    d = tmp_path_factory.mktemp("aie_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIE_DATA_DIR", str(d))
        mp.setenv("AIE_CACHE_DIR", str(d / "cache"))
        yield d


def run_cli(*argv) -> tuple[int, str, str]:
    """The CLI in this process (``python -m engine.byo`` is ``cli.main``)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def encoder(files, data_dir):
    rc, out, err = run_cli("hf", files["bert"], "--name", "kw_bert", "--csv", files["csv"], *FAST)
    assert rc == 0, err
    assert "added kw_bert" in out
    return get_card("kw_bert")


@pytest.fixture(scope="module")
def decoder(files, data_dir):
    rc, out, err = run_cli("hf", files["llama"], "--name", "my_llama", "--text", files["text"])
    assert rc == 0, err
    assert "tuned lens: " in out and "held-out KL at layer 1" in out
    # the CLI's progress (engine.core.progress): off a terminal no bar, the lens's last KL
    assert "translators: kl_per_layer=" in err and "%|" not in err, err
    return get_card("my_llama")


# --- encoder ---------------------------------------------------------------------------------


def test_encoder_card_heads_and_trace(encoder, files):
    c = encoder
    assert c.user and c.family == "hf_encoder"
    assert c.config["path"] == str(files["bert"].resolve())
    assert c.config["num_layers"] == 3 and c.config["joint"] is False
    assert c.raw["class_names"] == ["negative", "positive"]
    assert c.raw["seed"] == 0 and "--csv" in c.raw["training_command"]
    assert c.raw["data"]["rows"] == 200 and c.raw["data"]["test_rows"] == 40
    acc = c.raw["metrics"]["test_accuracy_per_exit"]
    assert len(acc) == 3 and max(acc) >= 0.8  # the keyword is learnable by some exit
    # frozen backbone: the weights file holds the exit heads only
    keys = load_file(c.weights_path).keys()
    assert keys and all(k.startswith("heads.") for k in keys)
    assert ("kw_bert", "test") in available_traces()
    trace = load_trace("kw_bert")
    assert user_trace_file("kw_bert").exists()
    assert trace.num_samples == 40 and trace.num_exits == 3
    assert np.allclose(trace.correct.mean(0), acc, atol=1e-4)
    assert trace.meta.class_names == ("negative", "positive")
    assert (np.diff(trace.cost, axis=1) > 0).all()


def test_runtime_agrees_with_trace(encoder):
    trace = load_trace("kw_bert")
    model = load_model("kw_bert")
    x = hfe.encode(model.tokenizer, list(trace.extra["text"]), model.config.seq_length)
    runner = EarlyExitRunner(model, "torch", device="cpu", input_shape=tuple(x.shape[1:]))
    policies = [Policy("max_prob", threshold=t) for t in (0.55, 0.7, 0.8, 0.9, 0.97)]
    policies += [Policy("entropy", threshold=0.4), Policy("patience", patience=1)]
    spread = set()
    for p in policies:
        out = runner.run(x, p, batch_size=16)  # small batches: compaction and padding at work
        want = exit_index(trace, p)
        assert np.array_equal(out.exit, want), p
        at_exit = trace.probs[np.arange(len(want)), want]
        assert np.array_equal(out.pred, at_exit.argmax(-1))
        assert np.array_equal(out.probs, at_exit)  # bit for bit, not only the decisions
        spread |= set(want.tolist())
    assert len(spread) >= 2  # some texts leave early, some late: the check bites


def test_family_rebuilds_the_same_trace_and_runs_one_text(encoder):
    fam = get("hf_encoder")
    trace = load_trace("kw_bert")
    again = fam.trace(encoder, "test")
    assert np.array_equal(again.probs, trace.probs)
    model = load_model("kw_bert")
    live = fam.run_one(model, encoder, str(trace.extra["text"][0]), 0.0)
    assert live.decision == "left at layer 1 of 3"
    assert live.prediction == int(trace.probs[0, 0].argmax())


def test_tuning_page_lists_and_shows_the_user_model(encoder):
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "pages" / "tuning.py"), default_timeout=120)
    at.query_params["model"] = "kw_bert"
    at.run()
    assert not at.exception, at.exception
    picker = at.sidebar.selectbox[0]
    assert picker.value == "kw_bert"
    assert any(o.startswith(encoder.title) for o in picker.options), picker.options
    assert len(at.get("plotly_chart")) >= 1


def test_inspector_shows_the_user_encoders_recorded_exits(encoder):
    """Text inputs are explained on the language page; the inspector shows the trace."""
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "pages" / "inspector.py"), default_timeout=120)
    at.query_params["model"] = "kw_bert"
    at.run()
    assert not at.exception, at.exception
    assert any("takes reviews inputs, not images" in i.value for i in at.info)


def test_language_page_classifies_and_explains_with_the_user_encoder(encoder):
    """The classifier tab's picker has the user's encoder: its classes, its exits, Captum."""
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "pages" / "language.py"), default_timeout=240).run()
    assert not at.exception, at.exception
    at.selectbox(key="lang.model").set_value("kw_bert").run()
    assert not at.exception, at.exception
    texts = ["the movie was wonderful", "terrible food", "a wonderful city"]
    at.text_area(key="lang.text").input("\n".join(texts)).run()
    table = at.dataframe[0].value
    # what the engine says under the tab's default policy (entropy <= 0.5)
    from engine.families.hf_encoder import analysis

    probs = analysis.classify(load_model("kw_bert"), texts).probs
    exits = exit_index(probs, Policy("entropy", threshold=0.5))
    classes = encoder.raw["class_names"]
    assert list(table["exit"]) == [f"layer {e + 1}" for e in exits]
    assert list(table["prediction"]) == [classes[probs[i, e].argmax()] for i, e in enumerate(exits)]
    at.button(key="lang.explain").click().run()
    assert not at.exception, at.exception
    html = " ".join(m.value for m in at.markdown)
    assert "wonderful" in html and "layer 3 → positive" in html


def test_joint_fine_tuning_saves_the_backbone(files, data_dir):
    rc, _, err = run_cli(
        "hf",
        files["bert"],
        "--name",
        "kw_bert_joint",
        "--csv",
        files["csv"],
        "--joint",
        "--epochs",
        "20",
    )
    assert rc == 0, err
    card = get_card("kw_bert_joint")
    assert card.config["joint"] is True and card.raw["backbone"]["shipped"] is True
    keys = set(load_file(card.weights_path))
    assert any(k.startswith("stages.") for k in keys) and any(k.startswith("heads.") for k in keys)
    tuned = load_model("kw_bert_joint")
    frozen = hfe.load_backbone(files["bert"])
    w_tuned = tuned.stages[1].layer.output.dense.weight
    w_orig = frozen.encoder.layer[1].output.dense.weight
    assert not torch.equal(w_tuned, w_orig)  # the saved backbone is the fine-tuned one
    assert ("kw_bert_joint", "test") in available_traces()


# --- decoder ---------------------------------------------------------------------------------


def test_decoder_logit_lens_in_the_card(decoder, files):
    assert decoder.user and decoder.family == "hf_causal_lm"
    assert decoder.config == {"path": str(files["llama"].resolve())}
    lens = decoder.raw["metrics"]["logit_lens"]
    assert lens["tokens"] > 2
    for key in ("agreement_per_layer", "kl_per_layer", "perplexity_per_layer"):
        assert len(lens[key]) == 3
    assert lens["agreement_per_layer"][-1] == 1.0 and lens["kl_per_layer"][-1] == 0.0
    # the engine's list of language models (the language page's) has it, and it loads
    assert "my_llama" in [c.model_id for c, _ in cards_of_kind("lm")]
    lm = get("hf_causal_lm").load(decoder)
    assert lm.n_layer == 3


def _kl(df) -> dict[str, list[float]]:
    return {n: df.filter(df["lens"] == n).sort("layer")["kl"].to_list() for n in ("logit", "tuned")}


def test_decoder_gets_a_tuned_lens_that_beats_the_logit_lens_on_the_held_out_tail(
    decoder, files, data_dir
):
    lens = TL.lens_for(decoder)
    assert lens is not None and lens.path.parent == data_dir / "models" / "lenses"
    assert lens.model_id == "my_llama_tuned_lens" and lens.config["base"] == "my_llama"
    assert lens.model_id not in [c.model_id for c in list_cards()]  # a read-out, not a model
    assert lens.raw["weights_sha256"] == sha256_file(lens.weights_path)
    verified_weights(lens)  # the SHA in its card is checked on load
    stored = decoder.raw["metrics"]["tuned_lens"]
    assert stored["weights_sha256"] == lens.raw["weights_sha256"]
    assert stored["card"] == lens.model_id
    df = TL.lens_comparison(lens)  # the shipped lens's layout: the page reads both alike
    assert set(df.columns) >= {"dataset", "lens", "layer", "agreement", "kl", "perplexity"}
    assert df.height == 2 * 3 and set(df["dataset"]) == {"notes"}
    assert df.to_dicts() == stored["comparison"]["rows"]
    kl = _kl(df)
    assert kl["tuned"][-1] == pytest.approx(kl["logit"][-1])  # the last layer is the output
    for j in range(2):
        assert kl["tuned"][j] < 0.9 * kl["logit"][j], (j, kl)
    data = lens.raw["data"]
    assert data["sha256"] == decoder.raw["data"]["sha256"]
    assert data["train_tokens"] == 4 * data["held_out_tokens"] > 0  # the last fifth held out
    # the file holds what was measured: the held-out tail read again through the loaded lens
    from engine.families.hf_causal_lm.model import encode

    lm = get("hf_causal_lm").load(decoder)
    ids = encode(lm, files["text"].read_text())
    tail = ids[len(ids) - data["held_out_tokens"] :]
    again = TL.compare(
        lm, TL.load(lens), [tail[i : i + 128] for i in range(0, len(tail), 128)], "notes"
    )
    assert _kl(again)["tuned"] == pytest.approx(kl["tuned"], rel=1e-6)


def test_a_lens_is_never_replaced_without_overwrite(decoder, files, data_dir):
    lens = TL.lens_for(decoder)
    before = (lens.path.read_bytes(), lens.weights_path.read_bytes())
    rc, _, err = run_cli("hf", files["llama"], "--name", "my_llama", "--text", files["text"])
    assert rc == 2 and "pass --overwrite" in err
    with pytest.raises(RegistryError, match="pass --overwrite"):
        TL.save_user_lens(TL.load(lens), dict(lens.raw))
    assert (lens.path.read_bytes(), lens.weights_path.read_bytes()) == before


def test_a_lens_left_without_its_model_is_not_replaced_without_overwrite(decoder, files, data_dir):
    lens = TL.lens_for(decoder)
    orphan = data_dir / "models" / "lenses" / "orphan_tuned_lens.safetensors"
    orphan.write_bytes(lens.weights_path.read_bytes())
    argv = ["hf", files["llama"], "--name", "orphan", "--text", files["text"]]
    rc, _, err = run_cli(*argv)
    assert rc == 2 and "orphan_tuned_lens.json exists; pass --overwrite" in err
    assert orphan.read_bytes() == lens.weights_path.read_bytes()
    with pytest.raises(RegistryError):
        get_card("orphan")
    rc, _, err = run_cli(*argv, "--no-tuned-lens")  # nor deleted without it
    assert rc == 0 and orphan.read_bytes() == lens.weights_path.read_bytes(), err
    orphan.unlink()


def test_an_encoder_replacing_a_decoder_leaves_no_lens(files, data_dir):
    rc, _, err = run_cli("hf", files["llama"], "--name", "swap", "--text", files["text"])
    assert rc == 0 and TL.lens_for(get_card("swap")) is not None, err
    argv = ["hf", files["bert"], "--name", "swap", "--csv", files["csv"], "--overwrite", *FAST]
    rc, _, err = run_cli(*argv)
    assert rc == 0, err
    assert get_card("swap").family == "hf_encoder"
    assert not any((data_dir / "models" / "lenses").glob("swap_*"))


def test_no_tuned_lens_measures_the_logit_lens_only(files, data_dir):
    argv = ["hf", files["llama"], "--name", "llama_nolens", "--text", files["text"]]
    rc, out, err = run_cli(*argv, "--no-tuned-lens")
    assert rc == 0, err
    card = get_card("llama_nolens")
    assert "logit_lens" in card.raw["metrics"] and "tuned_lens" not in card.raw["metrics"]
    assert "--no-tuned-lens" in card.raw["training_command"]
    assert TL.lens_for(card) is None and "translators" not in err
    assert not (data_dir / "models" / "lenses" / "llama_nolens_tuned_lens.json").exists()


def test_progress_reaches_the_page_with_the_time_left(files, data_dir):
    seen = []
    hf.add_checkpoint(
        files["llama"],
        "llama_progress",
        text=files["text"],
        report=lambda w, f: seen.append((w, f)),
    )
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    training = [f for w, f in seen if w == "training the tuned lens"]
    assert len(training) >= 50 and training == sorted(training)
    # the page's bar (app.progress) turns each report into tqdm's meter with the time left
    assert meter(training[10], 1.0, 2.0, "training the tuned lens").endswith(" left")


def test_a_bundled_model_finds_its_shipped_lens(encoder):
    assert TL.lens_for(get_card("smollm2_135m")).path == TL.lens_card().path
    assert TL.lens_for(get_card("mnist_act")) is None and TL.lens_for(encoder) is None


# --- bad input -------------------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file of the user's models and traces."""
    return {
        str(p.relative_to(d)): p.read_bytes()
        for sub in ("models", "traces")
        for p in sorted((d / sub).rglob("*"))
        if p.is_file()
    }


def _bad_folders(root: Path, files) -> dict[str, Path]:
    import shutil

    out = {}
    d = root / "no_config"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    out["no_config"] = d
    d = root / "pickled"
    shutil.copytree(files["bert"], d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    out["pickled"] = d
    d = root / "bigger_vocab"
    shutil.copytree(files["bert"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 7
    (d / "config.json").write_text(json.dumps(cfg))
    out["bigger_vocab"] = d
    d = root / "more_layers"
    shutil.copytree(files["bert"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    out["more_layers"] = d
    from transformers import DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel

    d = root / "distilbert"
    DistilBertModel(
        DistilBertConfig(
            vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32
        )
    ).save_pretrained(d)
    out["distilbert"] = d
    d = root / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    ).save_pretrained(d)
    out["gpt2"] = d
    d = root / "labelled"
    H.tiny_bert(d, id2label={0: "bad", 1: "good"})
    out["labelled"] = d
    return out


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def bad(files, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    b = _bad_folders(root, files)
    ok = [
        f"word {'wonderful' if i % 2 else 'terrible'},{'positive' if i % 2 else 'negative'}"
        for i in range(30)
    ]
    b["csv_no_text"] = _csv(root / "a.csv", "review,label", ok)
    b["csv_no_label"] = _csv(root / "b.csv", "text,class", ok)
    b["csv_empty_label"] = _csv(root / "c.csv", "text,label", ok[:5] + ["great movie,"] + ok[5:])
    b["csv_few"] = _csv(root / "d.csv", "text,label", ok[:10])
    b["csv_one_class"] = _csv(root / "e.csv", "text,label", [r.split(",")[0] + ",x" for r in ok])
    return b


CASES = {
    # name: (path key, extra args, words the one-line message must hold)
    "missing": ("nowhere", ["--csv", "CSV"], "is not a model folder"),
    "no_config": ("no_config", ["--csv", "CSV"], "no config.json"),
    "pickled": ("pickled", ["--csv", "CSV"], "convert them to safetensors"),
    "bigger_vocab": (
        "bigger_vocab",
        ["--csv", "CSV"],
        "embeddings.word_embeddings.weight has shape",
    ),
    "more_layers": ("more_layers", ["--csv", "CSV"], "encoder.layer.3."),
    "distilbert": ("distilbert", ["--csv", "CSV"], "no layer list this code can walk"),
    "gpt2": ("gpt2", ["--text", "TEXT"], "cannot be walked layer by layer"),
    "no_text_column": ("bert", ["--csv", "csv_no_text"], "no 'text' column"),
    "no_label_column": ("bert", ["--csv", "csv_no_label"], "no 'label' column"),
    "empty_label": ("bert", ["--csv", "csv_empty_label"], "row 7 has an empty label"),
    "few_rows": ("bert", ["--csv", "csv_few"], "has 10 rows; at least 20"),
    "one_class": ("bert", ["--csv", "csv_one_class"], "two classes"),
    "unknown_label": (
        "labelled",
        ["--csv", "CSV"],
        "not one of the checkpoint's labels (bad, good)",
    ),
    "encoder_without_csv": ("bert", [], "give --csv"),
    "decoder_with_csv": ("llama", ["--csv", "CSV"], "give --text"),
    "bundled_name": ("bert", ["--csv", "CSV", "--name", "mnist_act"], "is a bundled model"),
    "existing_name": ("llama", ["--text", "TEXT", "--name", "my_llama"], "pass --overwrite"),
    "text_too_short_for_a_lens": ("llama", ["--text", "SHORT"], "or pass --no-tuned-lens"),
}


def _argv(case, files, bad):
    key, extra, _ = CASES[case]
    path = files.get(key) or bad.get(key) or files["dir"] / key
    subst = {"CSV": files["csv"], "TEXT": files["text"], "SHORT": files["short"]}
    extra = [str(subst.get(a) or bad.get(a) or a) for a in extra]
    name = [] if "--name" in extra else ["--name", f"bad_{case}"]
    return ["hf", str(path), *name, *extra]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_sentence_and_nothing_lost(case, files, bad, decoder, data_dir):
    before = _snapshot(data_dir)
    rc, out, err = run_cli(*_argv(case, files, bad))
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert CASES[case][2] in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(data_dir) == before


def test_overwrite_replaces_only_when_asked(files, decoder, data_dir):
    first = decoder.path.read_text()
    stale = user_trace_file("my_llama")  # as if my_llama had been an encoder before
    stale.write_bytes(b"a trace of the model this one replaces")
    rc, _, err = run_cli("hf", files["llama"], "--name", "my_llama", "--overwrite")
    assert rc == 0, err
    assert get_card("my_llama").raw["metrics"] == {}  # no --text this time: replaced
    assert not stale.exists() and ("my_llama", "test") not in available_traces()
    assert TL.lens_for(get_card("my_llama")) is None  # nor the lens of the model it replaced
    assert not any((data_dir / "models" / "lenses").glob("my_llama_*"))
    rc, _, err = run_cli(
        "hf", files["llama"], "--name", "my_llama", "--text", files["text"], "--overwrite"
    )
    assert rc == 0 and json.loads(first)["metrics"] == get_card("my_llama").raw["metrics"]
    assert TL.lens_for(get_card("my_llama")) is not None


def test_real_command_line_refuses_a_pickle(bad, tmp_path):
    """The module as a user runs it: exit code 2, one line on stderr, never unpickled."""
    env = {**os.environ, "AIE_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.byo",
            "hf",
            str(bad["pickled"]),
            "--name",
            "x",
            "--csv",
            "x.csv",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "pickled weights (pytorch_model.bin)" in p.stderr
    assert not any((tmp_path / "models").glob("*"))


def test_help_explains_the_way_in():
    p = cli.parser()
    sub = next(a for a in p._actions if a.dest == "command")
    text = " ".join(sub.choices["hf"].format_help().split())
    for word in (
        "--csv",
        "--text",
        "--joint",
        "--overwrite",
        "safetensors",
        "logit-lens",
        "exit head",
    ):
        assert word in text
    assert hf.HELP in " ".join(p.format_help().split())


@pytest.mark.slow
def test_a_gguf_file_is_a_decoder(tmp_path, monkeypatch):
    """The installed SmolLM2 GGUF, named by its file path, becomes a user LM card."""
    from engine.families.hf_causal_lm import model as lm_model

    try:
        gguf = lm_model.packaged_file(lm_model.SMOLLM2_SOURCE, lm_model.SMOLLM2_GGUF)
    except lm_model.LoadError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    text = tmp_path / "news.txt"
    text.write_text("The government said on Tuesday that the new rail line would open next year.")
    # one sentence: too short to train a tuned lens on (and SmolLM2's would take minutes here)
    rc, _, err = run_cli("hf", gguf, "--name", "my_smollm2", "--text", text, "--no-tuned-lens")
    assert rc == 0, err
    card = get_card("my_smollm2")
    assert card.config == {"path": str(gguf.parent.resolve()), "gguf": gguf.name}
    lens = card.raw["metrics"]["logit_lens"]
    assert len(lens["agreement_per_layer"]) == 30 and lens["agreement_per_layer"][-1] == 1.0
