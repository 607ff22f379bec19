"""The tour's chapters, in order: one per family of dynamic networks, each with a plain
explanation, the defining paper and its headline result (shared/FIELD.md), one live control on
a bundled model, one figure, and a "go deeper" link into the full page with the same setting.

A chapter whose model is not bundled says so in one line and shows nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import streamlit as st

from app import figures_tour as ft
from app.palette import CORRECT, exit_color
from app.tour import data
from engine.core import stats
from engine.registry import ModelCard

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_T = 0.9
T_KEY = "tour.threshold"  # the threshold the student chose, kept across chapters


@dataclass(frozen=True)
class Ctx:
    present: bool
    fig_height: int


@dataclass(frozen=True)
class Chapter:
    key: str
    title: str
    needs: str  # "the X model", for the "not bundled yet" line
    find: Callable[[], ModelCard | None]
    body: Callable[[Ctx, ModelCard], None]

    def show(self, ctx: Ctx) -> None:
        st.header(self.title, anchor=False)
        card = self.find()
        if card is None:
            st.info(f"This chapter needs {self.needs}, which is not bundled yet.")
            return
        self.body(ctx, card)


# --- shared pieces -------------------------------------------------------------------------


def text_and_figure(ctx: Ctx, explain: str, paper: str):
    """Left: the explanation and the paper; right: the figure. Returns (left, right)."""
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown(explain)
        st.caption(paper)
    return left, right


def deeper(page: str, label: str, params: dict) -> None:
    """A link that opens the full page with the same model and setting (query parameters)."""
    if not (ROOT / page).exists():
        st.caption(f"({label}: that page is not in the app yet.)")
        return
    params = {k: str(v) for k, v in params.items()}
    try:
        st.page_link(page, label=label, icon=":material/open_in_new:", query_params=params)
    except Exception:  # the page is not registered (the tour run on its own, outside the router)
        st.markdown(f"[{label}](/{Path(page).stem}?{urlencode(params)})")


def threshold_slider(label: str = "Confidence threshold") -> float:
    """The one control of the early-exit chapters; remembered across chapters."""

    def keep():
        st.session_state[T_KEY] = st.session_state["tour.w.t"]

    return st.slider(
        label,
        min_value=0.5,
        max_value=1.0,
        value=float(st.session_state.get(T_KEY, DEFAULT_T)),
        step=0.005,
        format="%.3f",
        key="tour.w.t",
        on_change=keep,
        help="An input stops at the first exit whose top class probability reaches this.",
    )


def current_threshold() -> float:
    return float(st.session_state.get(T_KEY, DEFAULT_T))


def show_figure(fig, key: str) -> None:
    """Every tour figure: the palette's colours and the figure's own fonts (no theme)."""
    st.plotly_chart(fig, key=key, theme=None, config={"displayModeBar": False})


def pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%"


# --- early exit ------------------------------------------------------------------------------

EARLY_EXIT_TEXT = (
    "A deep network is a stack of layers, and every input normally goes through all of them. "
    "**Early exit** adds small classifiers (*exits*) after some of the layers. An input stops "
    "at the first exit that is confident enough — its top class probability reaches a "
    "*threshold* — and skips the rest. Clean, easy digits stop early; odd ones go deeper. The "
    "price: a confident exit can still be wrong, so a lower threshold saves compute and loses "
    "some accuracy. The **oracle** knows the answer and stops every input at the first exit "
    "that gets it right (inputs that no exit gets right are charged at the first exit): no "
    "real policy can do better."
)
EARLY_EXIT_PAPER = (
    "BranchyNet (Teerapittayanon et al., 2016); Shallow-Deep Networks (Kaya et al., 2019): "
    "more than 50% of the average inference cost saved at preserved accuracy on CIFAR-10/100 "
    "and Tiny ImageNet."
)


def early_exit(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    left, right = text_and_figure(ctx, EARLY_EXIT_TEXT, EARLY_EXIT_PAPER)
    with right:
        t = threshold_slider()
    with left:
        s = data.policy_stats(card.model_id, "max_prob", t)
        last = data.policy_stats(card.model_id, "fixed", trace.num_exits - 1)
        oracle = data.oracle_stats(card.model_id)
        st.markdown(
            f"At threshold **{t:.3f}**: **{pct(s.accuracy, 1)}** correct with "
            f"**{pct(s.cost_fraction)}** of the compute; "
            f"{pct(s.exit_fraction[0])} of the test digits stop at the first exit. "
            f"The whole network: {pct(last.accuracy, 1)}. "
            f"The oracle: {pct(oracle.accuracy, 1)} with {pct(oracle.cost_fraction)}."
        )
        deeper(
            "pages/tuning.py",
            "Go deeper: tune the threshold on the whole test set",
            {"model": card.model_id, "policy": "max_prob", "t": t},
        )
    with right:
        cost_frac, acc = data.curve_points(card.model_id, "max_prob")
        fig = ft.tradeoff_chart(
            {"every threshold": (cost_frac, acc)},
            {
                f"threshold {t:.3f}": (s.cost_fraction, s.accuracy, exit_color(1)),
                "oracle": (oracle.cost_fraction, oracle.accuracy, CORRECT),
                "whole network": (1.0, last.accuracy, "black"),
            },
            height=ctx.fig_height,
            present=ctx.present,
        )
        show_figure(fig, "tour.fig.early_exit")


# --- draw a digit ----------------------------------------------------------------------------


def draw_a_digit(ctx: Ctx, card: ModelCard) -> None:
    from app.tour.draw import draw_chapter

    draw_chapter(ctx, card)


# --- guess first -----------------------------------------------------------------------------

QUIZ_Q = "tour.quiz.q"
QUIZ_ANSWERS = "tour.quiz.answers"
QUIZ_SAMPLE = "tour.quiz.sample"  # trace row of the current question (read by the tests)


def _next_question() -> None:
    st.session_state[QUIZ_Q] = st.session_state.get(QUIZ_Q, 0) + 1


def guess_first(ctx: Ctx, card: ModelCard) -> None:
    from app.tour.quiz import question_sample, record, score

    trace = data.get_trace(card.model_id)
    t = current_threshold()
    exits = data.exits_at(card.model_id, t)
    q = st.session_state.get(QUIZ_Q, 0)
    answers = st.session_state.setdefault(QUIZ_ANSWERS, {})
    pool = data.rows_with_images(card, trace)  # the whole test split, or the bundled gallery
    pool = pool if len(pool) else np.arange(trace.num_samples)
    row = int(pool[question_sample(exits[pool], q)])
    st.session_state[QUIZ_SAMPLE] = row
    truth = int(exits[row])
    names = list(trace.meta.exit_names)
    imgs = data.sample_images(card, trace, np.array([row]))

    left, right = st.columns([2, 3], gap="large")
    with left:
        st.markdown(
            f"Look at the digit. The network stops at the first of its {len(names)} exits whose "
            f"confidence reaches **{t:.3f}**. **Where will this one stop?** Guess first, then "
            "see the answer."
        )
        guess = st.radio(
            "Your guess",
            names,
            index=None,
            horizontal=True,
            key=f"tour.w.quiz.{q}",
        )
        if guess is not None:
            right_now = record(answers, q, names.index(guess), truth)
            first_guess = names[answers[q][0]]
            verdict = "Right!" if right_now else f"Not quite (you said {first_guess})."
            label = trace.meta.class_names[trace.label[row]]
            said = trace.meta.class_names[trace.pred[row, truth]]
            st.markdown(
                f"**{verdict}** It stops at **{names[truth]}** and answers **{said}** "
                f"(the true label is {label})."
            )
        got, asked = score(answers)
        st.metric("Your score this session", f"{got} / {asked}")
        st.button("Next image →", key="tour.quiz.next", on_click=_next_question)
    with right:
        img_col, fig_col = st.columns([1, 2])
        with img_col:
            if imgs is not None:
                st.plotly_chart(
                    ft.digit_image(imgs[0], height=240),
                    key="tour.fig.quiz_img",
                    config={"displayModeBar": False, "staticPlot": True},
                )
            else:
                st.caption(f"Test image #{trace.sample_id[row]} (data set not installed).")
        with fig_col:
            if guess is not None:
                fig = ft.exit_ladder(
                    trace.probs[row],
                    trace.cost[row],
                    truth,
                    t,
                    names,
                    trace.meta.class_names,
                    height=ctx.fig_height,
                    present=ctx.present,
                )
                show_figure(fig, "tour.fig.quiz")


# --- overthinking ----------------------------------------------------------------------------

OVER_PAGE = "tour.over.page"
OVER_PER_PAGE = 3


def _more_overthinking() -> None:
    st.session_state[OVER_PAGE] = st.session_state.get(OVER_PAGE, 0) + 1


def overthinking(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    rows = data.overthinking_rows(card.model_id)
    shown = np.intersect1d(rows, data.rows_with_images(card, trace))
    n_wrong = int((~trace.correct[:, -1] & (trace.label != -1)).sum())
    left, right = text_and_figure(
        ctx,
        "More layers are not always better. Sometimes an early exit gets a digit **right** and "
        "the last exit, after thinking longer, gets it **wrong**: the network *overthinks*. "
        "Each curve shows, exit by exit, how sure the network is of the true class "
        "(solid line) and of the last exit's wrong answer (dotted line).",
        "Shallow-Deep Networks (Kaya et al., 2019): in their experiments, half of the "
        "misclassifications were *destructive overthinking* — an earlier exit had been right.",
    )
    with left:
        if n_wrong:
            st.markdown(
                f"Here: **{len(rows)} of the {n_wrong}** test digits the last exit gets wrong "
                f"(**{pct(len(rows) / n_wrong)}**) were right at an earlier exit."
            )
        st.button("Show other examples", key="tour.over.more", on_click=_more_overthinking)
        deeper(
            "pages/inspector.py",
            "Go deeper: inspect this sample exit by exit",
            {"model": card.model_id, "policy": "max_prob", "t": current_threshold()}
            | ({"sample": trace.sample_id[rows[0]]} if len(rows) else {}),
        )
    with right:
        if len(rows) == 0:
            st.markdown("This model never overthinks on its test set.")
            return
        gallery = shown if len(shown) else rows  # rows whose image the app has, if any
        page = st.session_state.get(OVER_PAGE, 0)
        start = (page * OVER_PER_PAGE) % len(gallery)
        pick = np.take(gallery, range(start, start + min(OVER_PER_PAGE, len(gallery))), mode="wrap")
        imgs = data.sample_images(card, trace, pick)
        fig = ft.overthinking_grid(
            None if imgs is None else list(imgs),
            [trace.probs[i] for i in pick],
            [int(trace.label[i]) for i in pick],
            trace.meta.exit_names,
            trace.meta.class_names,
            height=ctx.fig_height,
            present=ctx.present,
        )
        show_figure(fig, "tour.fig.overthinking")


# --- patience --------------------------------------------------------------------------------


def patience(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    k = trace.num_exits
    left, right = text_and_figure(
        ctx,
        "Confidence can be misleading. **Patience** ignores it and watches the answers instead: "
        "stop as soon as *p* exits in a row have given the same answer. A network that keeps "
        "changing its mind keeps going; one that has settled stops. Patience 0 stops at the "
        "first exit; a larger patience is slower and safer.",
        "PABEE (Zhou et al., 2020): a better accuracy–speed trade-off than earlier exit methods, "
        "and higher accuracy than the full ALBERT on GLUE.",
    )
    with right:
        p = st.slider(
            "Patience (exits in a row that must agree)",
            0,
            k - 1,
            value=min(2, k - 1),
            key="tour.w.patience",
        )
    with left:
        s = data.policy_stats(card.model_id, "patience", p)
        st.markdown(
            f"With patience **{p}**: **{pct(s.accuracy, 1)}** correct with "
            f"**{pct(s.cost_fraction)}** of the compute."
        )
        deeper(
            "pages/tuning.py",
            "Go deeper: patience on the whole test set",
            {"model": card.model_id, "policy": "patience", "p": p},
        )
    with right:
        cost_t, acc_t = data.curve_points(card.model_id, "max_prob")
        cost_p, acc_p = data.curve_points(card.model_id, "patience")
        fig = ft.tradeoff_chart(
            {"confidence threshold": (cost_t, acc_t), "patience 0…K-1": (cost_p, acc_p)},
            {f"patience {p}": (s.cost_fraction, s.accuracy, exit_color(1))},
            height=ctx.fig_height,
            present=ctx.present,
        )
        show_figure(fig, "tour.fig.patience")


# --- cascades --------------------------------------------------------------------------------


def cascade(ctx: Ctx, card: ModelCard) -> None:
    trace = data.get_trace(card.model_id)
    names = list(trace.meta.exit_names)
    left, right = text_and_figure(
        ctx,
        "Instead of exits inside one network, a **cascade** runs a sequence of separate models, "
        "from small and cheap to big and slow. The small one answers first; only when it is "
        "not confident enough is the input passed to the next, bigger one. Most inputs never "
        "reach the big model.",
        "Cascades date back to Viola & Jones's face detector (2001); model cascades stop at the "
        "first model that is confident.",
    )
    with right:
        t = st.slider(
            "Confidence threshold", 0.5, 1.0, 0.9, 0.005, format="%.3f", key="tour.w.cascade_t"
        )
    s = data.policy_stats(card.model_id, "max_prob", t)
    last = data.policy_stats(card.model_id, "fixed", trace.num_exits - 1)
    with left:
        st.markdown(
            f"At threshold **{t:.3f}**: **{pct(s.accuracy, 1)}** correct with "
            f"**{pct(s.cost_fraction)}** of the compute of running every model "
            f"(the biggest model alone: {pct(last.accuracy, 1)}); "
            f"**{pct(s.exit_fraction[0])}** of the digits are answered by {names[0]}."
        )
        deeper(
            "pages/tuning.py",
            "Go deeper: tune the cascade on the whole test set",
            {"model": card.model_id, "policy": "max_prob", "t": t},
        )
    with right:
        fig = ft.exit_share_bars(
            s.exit_counts, names, height=ctx.fig_height - 60, present=ctx.present
        )
        show_figure(fig, "tour.fig.cascade")


# --- layer skipping ----------------------------------------------------------------------------


def skipping(ctx: Ctx, card: ModelCard) -> None:
    rec = data.skip_records(card.model_id)
    blocks = list(rec.meta.get("block_names", [f"block {b + 1}" for b in range(rec.num_blocks)]))
    left, right = text_and_figure(
        ctx,
        "Instead of stopping, a network can **skip** layers it does not need. A tiny *gate* in "
        "front of each residual block looks at the input and decides: run this block, or pass "
        "the input straight through. A higher gate threshold skips more blocks; every input "
        "still reaches the final classifier.",
        "SkipNet (Wang et al., 2018): 30–90% less computation at the original accuracy on four "
        "benchmarks.",
    )
    with right:
        t = st.select_slider(
            "Gate threshold (a block runs when its gate says at least this)",
            options=[float(x) for x in rec.thresholds],
            value=float(rec.thresholds[rec.index_of(0.5)]),
            key="tour.w.skip_t",
        )
    from engine.families.skipnet import records as sk

    i = rec.index_of(t)
    summ = sk.summary(rec, i)
    with left:
        st.markdown(
            f"At gate threshold **{t:.2f}**: **{pct(summ['accuracy'], 1)}** correct with "
            f"**{pct(summ['cost_fraction'])}** of the compute; on average "
            f"**{summ['mean_blocks_run']:.1f} of {rec.num_blocks}** blocks run."
        )
        deeper("pages/skipping.py", "Go deeper: the layer-skipping page", {"t": t})
    with right:
        run_rate = rec.executed[i].mean(axis=0)
        fig = ft.steps_bars(
            run_rate,
            blocks,
            [exit_color(b) for b in range(rec.num_blocks)],
            "share of test digits that run the block",
            height=ctx.fig_height - 60,
            present=ctx.present,
            y_range=(0, 1.15),
        )
        show_figure(fig, "tour.fig.skipping")


# --- adaptive computation time -----------------------------------------------------------------


def halting(ctx: Ctx, card: ModelCard) -> None:
    from engine.families.act import records as hl

    rec = data.halt_records(card.model_id)
    left, right = text_and_figure(
        ctx,
        "**Adaptive computation time** lets a network repeat the same step as often as it "
        "needs. After every step a *halting unit* adds a little to a running total; when the "
        "total reaches 1 − ε, the network stops. Here the task is parity (is the number of +1s "
        "odd?): strings with more non-zero entries are harder. Does the network think longer "
        "about them? The bars answer it, measured on the test strings.",
        "ACT (Graves, 2016): learns parity with an input-dependent number of steps; "
        "PonderNet (Banino et al., 2021) refines the halting rule.",
    )
    grid = [float(e) for e in hl.EPS_GRID if e <= 0.5]
    with right:
        eps = st.select_slider(
            "ε (stop when the halting total reaches 1 − ε)",
            options=grid,
            value=min(grid, key=lambda e: abs(e - float(rec.meta.get("eps", 0.01)))),
            key="tour.w.eps",
        )
    r = hl.at_eps(rec, eps)
    lengths, mean, _, acc, _ = stats.by_level(rec.difficulty, r.steps, r.correct)
    with left:
        st.markdown(
            f"At ε = **{eps:g}**: **{pct(float(r.correct.mean()), 1)}** correct, "
            f"**{r.steps.mean():.2f}** steps on average (from {r.steps.min()} to "
            f"{r.steps.max()}); rank correlation between steps and length "
            f"**{stats.spearman(r.steps, rec.difficulty):.2f}**."
        )
        deeper(
            "pages/halting.py",
            "Go deeper: the halting page",
            {"eps": eps, "model": card.model_id},
        )
    with right:
        fig = ft.steps_bars(
            mean,
            [str(int(x)) for x in lengths],
            [exit_color(0)] * len(lengths),
            "mean steps taken",
            height=ctx.fig_height - 60,
            present=ctx.present,
        )
        fig.update_xaxes(title="input difficulty (number of bits that matter)")
        show_figure(fig, "tour.fig.halting")


# --- mixture of experts ------------------------------------------------------------------------


def experts(ctx: Ctx, card: ModelCard) -> None:
    sweep = data.moe_sweep(card.model_id)
    dense = float(sweep["dense_flops"])
    dyn = [p for p in sweep["points"] if p.get("tau") is not None]
    n_exp = len(dyn[0]["experts_per_token_hist"]) if dyn else 0
    left, right = text_and_figure(
        ctx,
        "A **mixture of experts** splits a layer into several smaller networks (*experts*) and "
        "a *router* that sends each piece of the input (a *token*; here a patch of the image) "
        "to only some of them. **Top-k** routing always uses k experts per token. "
        "**Dynamic-k** routing predicts how much each expert would contribute and runs only "
        "those above a fraction τ of the largest: easy tokens use few experts, hard ones many.",
        "Sparsely-gated MoE (Shazeer et al., 2017); Switch Transformer (Fedus et al., 2021, "
        "k = 1); D2DMoE (Szatkowski et al., 2024): up to 60% lower inference cost without "
        "significant quality loss.",
    )
    taus = [float(p["tau"]) for p in dyn]
    with right:
        tau = st.select_slider(
            "τ (run the experts above this fraction of the largest)",
            options=taus,
            value=taus[len(taus) // 2],
            key="tour.w.tau",
        )
    point = dyn[taus.index(tau)]
    with left:
        st.markdown(
            f"At τ = **{tau:g}**: **{pct(point['accuracy'], 1)}** correct, "
            f"**{point['experts_per_token_mean']:.1f} of {n_exp}** experts per token on average, "
            f"**{pct(point['flops_mean'] / dense)}** of the dense model's compute."
        )
        deeper("pages/routing.py", "Go deeper: route one image yourself", {"model": card.model_id})
    curves = {
        "dynamic-k (τ)": (
            np.array([p["flops_mean"] / dense for p in dyn]),
            np.array([p["accuracy"] for p in dyn]),
        )
    }
    topk = data.moe_sweep("fashion_moe_vit")
    if topk is not None:
        pts = [p for p in topk["points"] if p.get("k") is not None]
        dense_k = float(topk["dense_flops"])
        curves["top-k (k, capacity)"] = (
            np.array([p["flops_mean"] / dense_k for p in pts]),
            np.array([p["accuracy"] for p in pts]),
        )
    with right:
        fig = ft.tradeoff_chart(
            curves,
            {f"τ = {tau:g}": (point["flops_mean"] / dense, point["accuracy"], exit_color(3))},
            height=ctx.fig_height - 60,
            present=ctx.present,
            markers=True,
        )
        fig.update_xaxes(title="compute (share of the dense model)")
        show_figure(fig, "tour.fig.experts")


# --- per-token early exit in a language model --------------------------------------------------


def language(ctx: Ctx, card: ModelCard) -> None:
    metrics = card.raw.get("metrics", {})
    pts = sorted(
        (p for p in metrics["sweep"] if p.get("mode") == "exit" and p.get("measure") == "max_prob"),
        key=lambda p: p["threshold"],
    )
    n_layer = int(card.config.get("n_layer", 0)) or None
    left, right = text_and_figure(
        ctx,
        "A language model writes one token (here: one character) at a time, and every token "
        "normally goes through every layer. But many tokens are easy: after “th”, an “e” is "
        "likely. **Per-token early exit** lets each token leave at the first layer whose "
        "prediction is confident enough, and measures how often the text still matches what "
        "the full model would have written.",
        "CALM (Schuster et al., 2022): up to ×3 faster on T5 across three generation tasks "
        "while provably maintaining quality; LayerSkip (Elhoushi et al., 2024): up to 2.16× "
        "on summarisation.",
    )
    ts = [float(p["threshold"]) for p in pts]
    with right:
        t = st.select_slider(
            "Confidence threshold per token", options=ts, value=ts[len(ts) // 2], key="tour.w.lm_t"
        )
    p = pts[ts.index(t)]
    layers = f" of {n_layer} layers" if n_layer else " of the layers"
    with left:
        st.markdown(
            f"At threshold **{t:g}**: tokens run **{pct(p['fraction'])}**{layers} on "
            f"average, and **{pct(p['agreement'], 1)}** of them are the character the full "
            f"model would have chosen (perplexity {p['perplexity']:.2f} against "
            f"{metrics.get('full_perplexity', float('nan')):.2f} for the full model)."
        )
        st.caption("Measured on held-out BBC News text when the model was trained (model card).")
        deeper("pages/language.py", "Go deeper: generate text and watch each character", {})
    with right:
        fig = ft.tradeoff_chart(
            {"every threshold": (np.array([q["fraction"] for q in pts]),
                                 np.array([q["agreement"] for q in pts]))},
            {f"threshold {t:g}": (p["fraction"], p["agreement"], exit_color(1)),
             "full model": (1.0, 1.0, "black")},
            height=ctx.fig_height - 60,
            present=ctx.present,
            markers=True,
        )  # fmt: skip
        fig.update_xaxes(title="layers run (share of the full depth)")
        fig.update_yaxes(title="same character as the full model")
        show_figure(fig, "tour.fig.language")


# --- the registry of chapters ----------------------------------------------------------------


CHAPTERS: list[Chapter] = [
    Chapter("early-exit", "Early exit: stop when confident", "the multi-exit CNN",
            data.multi_exit_card, early_exit),
    Chapter("draw", "Draw a digit", "the multi-exit CNN", data.multi_exit_card, draw_a_digit),
    Chapter("guess", "Guess first: easy or hard?", "the multi-exit CNN",
            data.multi_exit_card, guess_first),
    Chapter("overthinking", "Overthinking", "the multi-exit CNN",
            data.multi_exit_card, overthinking),
    Chapter("patience", "Patience: stop when the answers agree", "the multi-exit CNN",
            data.multi_exit_card, patience),
    Chapter("cascade", "Cascades: small model first", "a cascade model",
            data.cascade_card, cascade),
    Chapter("skipping", "Layer skipping: gates", "the layer-skipping (SkipNet) model",
            data.skip_card, skipping),
    Chapter("halting", "Adaptive computation time: halting", "the ACT model",
            data.act_card, halting),
    Chapter("experts", "Mixture of experts: top-k and dynamic-k", "a mixture-of-experts model",
            data.moe_card, experts),
    Chapter("language", "Early exit per token in a language model",
            "the early-exit language model", data.lm_card, language),
]  # fmt: skip
