"""Threshold tuning: pick a trace and an exit policy, move the sliders, see the trade-off.

Every number comes from engine/ (policies, tradeoff, calibration); the curve of each policy
kind is computed once per trace (cached), and a slider move only re-evaluates the policy inside
the fragment below. The URL holds model, policy and parameters (see app/widgets.py).
"""

from __future__ import annotations

import io
import time

import numpy as np
import polars as pl
import streamlit as st

from app import figures, loaders, navigation, progress, widgets
from engine.core import calibration, costs, tradeoff
from engine.core.policies import POLICY_LABELS, Policy
from engine.core.trace import Trace, TraceError
from engine.policy_store import PolicyStore, PolicyStoreError, SavedPolicy

TIMING_KEY = "aie.tuning_fragment_ms"  # server-side time of the last fragment run (bench)
CPU_KEY = "aie.tuning_fragment_cpu_ms"  # its CPU time (a busy machine inflates only the above)
MSG_KEY = "aie.tuning_msg"
SOLVE_FOR = "aie.solve_acc_for"  # the trace the accuracy target's default was set for
W_NEVER = "w.oracle_never_correct"
NEVER_LABELS = {
    "first": "the first exit (the cheapest way to be wrong: a lower bound)",
    "last": "the last exit (they ran the whole network)",
}
MAX_TABLE_ROWS = 5000

navigation.require_router()  # first: a deep link may have run this page alone
st.title("Threshold tuning")
st.caption(
    "Choose when each input may leave the network. Every slider move re-evaluates the policy "
    "on the whole test split from the cached trace; the curve shows every setting at once."
)


def _store() -> PolicyStore | None:
    try:
        return PolicyStore()
    except OSError as e:
        st.sidebar.error(f"The policy store is not writable: {e}")
        return None


def _model_id(source: str) -> str:
    if loaders.is_upload(source):
        return source
    return loaders.split_source(source)[0]


# --- sidebar: upload a trace, saved policies ---------------------------------------------------


TRACE_FORMAT = """
One row per sample, Parquet or CSV, with these columns (exits `k = 0 … K−1` ordered by depth,
classes `c = 0 … C−1`):

- `sample_id`: a unique id, integer or text
- `label`: the class index; empty or `-1` when unknown
- `prob_e{k}_c{c}`: probability of class c at exit k, or `logit_e{k}_c{c}` (soft-maxed on load)
- `cost_e{k}`: cumulative cost of reaching exit k (must not decrease over k)
- optional: `latency_e{k}` (cumulative ms), `gate_e{k}` (a learned exit score in [0, 1]),
  `extra.<name>` (any per-sample column)

A CSV may start with `# key: value` lines that say what the columns cannot: `cost_unit`
(default FLOPs), `exit_names` and `class_names` (comma-separated, or a JSON list), `model_id`,
`dataset`, `split`. A Parquet file carries the same fields as JSON in its file metadata under
the key `aie.trace`. For example:
"""

TRACE_EXAMPLE = """\
# cost_unit: trees
# exit_names: 10 trees, 100 trees
# class_names: stays, leaves
sample_id,label,prob_e0_c0,prob_e0_c1,prob_e1_c0,prob_e1_c1,cost_e0,cost_e1
0,1,0.40,0.60,0.10,0.90,10,100
1,0,0.95,0.05,0.97,0.03,10,100
"""


TOKEN_FORMATS = """
**Per-token traces from another tool** (`.npz` or `.safetensors`; tokens are the samples,
decoder layers the exits, cost in layers):

- *CALM* (t5x CALM's decoding outputs): `exits` (layers run per token, 1…L; −1 = padding) and
  `confidences` (at the exit), both `[batch, length]`; optional `mask` or `lengths`,
  `num_layers`, `threshold`, `agree` (the exit's token is the full model's). It holds one
  run: exact at the run's threshold only (the page says what the other settings assume).
- *Per-token LM trace*: `top1` (token id) and `confidence` per token and layer,
  `[tokens, layers]` or `[batch, length, layers]`; optional `mask`/`lengths`, `reference`
  (default: the last layer's token). Fully re-tunable.

The same files load from the command line: `python -m engine.byo trace FILE --name ID`.
"""


def _added(add, *args) -> str | None:
    """The source of a trace added by ``add`` (an upload or a local path), or None after
    saying in one line why it was refused."""
    try:
        return add(*args)
    except TraceError as e:
        st.error(f"This trace was rejected: {widgets.trace_error(e)}")
    except Exception as e:  # anything else a malformed file can trigger
        st.error(f"This trace could not be read ({widgets.literal(f'{type(e).__name__}: {e}')})")
    return None


def upload_section() -> None:
    with st.sidebar.expander("Upload a trace", expanded=False):
        st.markdown(TRACE_FORMAT)
        st.code(TRACE_EXAMPLE, language=None)
        st.markdown(TOKEN_FORMATS)
        up = st.file_uploader(
            "Trace file",
            type=["parquet", "pq", "csv", "npz", "safetensors"],
            key="w.trace_upload",
            max_upload_size=loaders.MAX_TRACE_MB,
        )
        st.caption(big_file_hint())
        if up is None:
            return
        source = _added(loaders.add_upload, up.getvalue(), up.name)
        if source is None:
            return
        if st.session_state.get("aie.last_upload") != up.file_id:
            st.session_state["aie.last_upload"] = up.file_id
            st.session_state[widgets.W_MODEL] = source  # select it (picker renders next)
        label = widgets.literal(loaders.source_label(source))
        if st.session_state.get(widgets.W_MODEL) == source:
            st.success(f"Loaded {widgets.literal(up.name)}: it is the selected trace now.")
        else:
            st.success(
                f"Loaded {widgets.literal(up.name)}: pick **{label}** in the model picker below."
            )


def big_file_hint() -> str:
    """What the uploader says about files over its limit."""
    how = (
        "type its path in **Load a trace file from this machine** below: it is read from disk "
        "(lazily, one exit's columns at a time), with no size limit"
        if loaders.local_paths_allowed()
        else f"run the app on the machine that holds the file (`make app`, or set "
        f"`{loaders.LOCAL_PATHS_ENV}=1`) and type its path in **Load a trace file from this "
        "machine**: it is read from disk (lazily), with no size limit"
    )
    return f"Uploads are limited to {loaders.MAX_TRACE_MB} MB. For a larger trace, {how}."


def local_path_section() -> None:
    """Read a trace file from a path on the server's machine (traces over the upload limit).

    Offered only when the app is run locally (``loaders.local_paths_allowed``): anyone who
    can reach a public app could otherwise read the server's files."""
    if not loaders.local_paths_allowed():
        return
    with st.sidebar.expander("Load a trace file from this machine", expanded=False):
        st.caption(
            "A Parquet or CSV trace in the layout above, of any size: big files are read "
            "lazily (only the columns each view needs) and kept compact in memory."
        )
        text = st.text_input("Path", key="w.trace_path", placeholder="/data/my_trace.parquet")
        if not st.button("Load", key="b.trace_path") or not text.strip():
            return
        source = _added(loaders.add_local, text)
        if source is None:
            return
        st.session_state[widgets.W_MODEL] = source  # select it (the picker renders next)
        st.success(f"Loaded {widgets.literal(text.strip())}: it is the selected trace now.")


def _apply_saved(name: str, num_exits: int) -> None:
    store = PolicyStore()
    try:
        sp = store.get(name)
        widgets.set_policy(sp.policy, num_exits)
        st.session_state[MSG_KEY] = ("success", f"Applied saved policy {name!r}.")
    except (KeyError, PolicyStoreError) as e:
        st.session_state[MSG_KEY] = ("error", f"Could not apply {name!r}: {e}")


def _delete_saved(name: str) -> None:
    PolicyStore().delete(name)
    st.session_state[MSG_KEY] = ("info", f"Deleted saved policy {name!r}.")


def saved_section(source: str, trace: Trace) -> None:
    store = _store()
    if store is None:
        return
    with st.sidebar.expander("Saved policies", expanded=True):
        try:
            saved = store.list()
        except PolicyStoreError as e:
            st.error(str(e))
            return
        mine = [s for s in saved if s.model_id == _model_id(source)]
        others = [s for s in saved if s.model_id != _model_id(source)]
        names = [s.name for s in mine] + [s.name for s in others]
        if not names:
            st.caption(f"None yet. Saved policies are kept in {store.path}.")
        else:
            name = st.selectbox(
                "Saved policy",
                names,
                key="w.saved_pick",
                format_func=lambda n: (
                    n if n in {s.name for s in mine} else f"{n} (tuned on another model)"
                ),
            )
            c1, c2 = st.columns(2)
            c1.button(
                "Apply",
                key="b.apply_saved",
                on_click=_apply_saved,
                args=(name, trace.num_exits),
                width="stretch",
            )
            c2.button(
                "Delete",
                key="b.delete_saved",
                on_click=_delete_saved,
                args=(name,),
                width="stretch",
            )
        imported = st.file_uploader("Import a policy (JSON)", type=["json"], key="w.import")
        if imported is not None:
            try:
                sp = SavedPolicy.from_json(imported.getvalue())
                if sp.policy.kind not in widgets.available_kinds(trace):
                    raise PolicyStoreError(f"policy {sp.policy.kind!r} does not fit this trace")
            except PolicyStoreError as e:
                st.error(f"This policy file was rejected: {e}")
            else:
                st.caption(f"{sp.name}: {sp.policy.describe()}")
                if st.button("Save imported policy", key="b.save_imported"):
                    store.put(SavedPolicy(sp.name, _model_id(source), sp.policy, sp.metrics))
                    st.session_state[MSG_KEY] = ("success", f"Imported {sp.name!r}.")
                    st.rerun()


# --- the fast part: controls, metrics, charts -------------------------------------------------


def _on_axis(source: str, unit: str | None = None) -> tuple[Trace, str]:
    """The source's trace with its cost on the chosen axis (FLOPs or measured ms), and the
    cache key of that pair."""
    return loaders.source_on_axis(
        source, unit or st.session_state.get(widgets.W_COST_AXIS, costs.FLOPS)
    )


def _ms_budget_key(unit: str) -> str:
    return f"w.solve_ms.{unit}"


def _solve(source: str, mode: str) -> None:
    """Solver callback: move the sliders to the chosen point of the current kind's curve."""
    trace, key = _on_axis(source)
    kind = st.session_state.get(widgets.W_KIND, "max_prob")
    curve_kind = "max_prob" if kind == "per_exit" else kind
    summary = loaders.curve_summary(key, curve_kind, trace)
    c = summary.curve
    unit = trace.meta.cost_unit
    if mode == "accuracy":
        target = float(st.session_state["w.solve_acc"]) / 100
        i = tradeoff.cheapest_with_accuracy(c, target)
        what = f"accuracy ≥ {target:.2%}"
    elif costs.is_time(unit):  # "best within X ms"
        budget = float(st.session_state[_ms_budget_key(unit)])
        i = tradeoff.best_within_budget(c, budget)
        what = f"mean cost ≤ {budget:.4g} {unit}"
    else:
        budget = tradeoff.budget_target(
            trace, float(st.session_state["w.solve_budget"]) / 100, True
        )
        i = tradeoff.best_within_budget(c, budget)
        what = f"mean cost ≤ {figures.fmt_flops(budget)}{trace.meta.cost_unit}"
    if i is None:
        st.session_state[MSG_KEY] = ("warning", f"No {POLICY_LABELS[kind]} setting reaches {what}.")
        return
    p = c.policy(i)
    if kind == "per_exit":
        p = Policy("per_exit", thresholds=(p.threshold,) * trace.num_exits)
    widgets.set_policy(p, trace.num_exits)
    st.session_state[MSG_KEY] = (
        "success",
        f"Solver: {p.describe()} gives accuracy {c.accuracy[i]:.4f} at "
        f"{figures.fmt_flops(c.mean_cost[i])}{trace.meta.cost_unit} ({what}).",
    )


def _show_msg() -> None:
    msg = st.session_state.pop(MSG_KEY, None)
    if msg:
        getattr(st, msg[0])(msg[1])


def sample_table(
    trace: Trace, exits: np.ndarray, mask: np.ndarray | None, limit: int | None = None
) -> pl.DataFrame:
    """The selected samples (all without ``mask``), the first ``limit`` of them only: the
    page shows a few thousand rows, and building a million on every rerun would dominate it."""
    rows = np.arange(trace.num_samples) if mask is None else np.flatnonzero(mask)
    if limit is not None:
        rows = rows[:limit]
    ex = exits[rows]
    cls = np.asarray(trace.meta.class_names, dtype=object)
    names = np.asarray(trace.meta.exit_names, dtype=object)
    label = trace.label[rows]
    cols = {
        "sample_id": trace.sample_id[rows],
        "label": np.where(label >= 0, cls[np.maximum(label, 0)], "?"),
        "exit": names[ex],
        "exit_index": ex,
        "prediction": cls[trace.pred[rows, ex]],
        "correct": trace.correct[rows, ex],
        "cost": trace.cost[rows, ex],
    }
    for e, name in enumerate(trace.meta.exit_names):
        cols[f"conf {name}"] = trace.max_prob[rows, e]
    return pl.DataFrame(cols)


def _metrics_row(stats: tradeoff.PolicyStats, last: tradeoff.PolicyStats, unit: str, label=""):
    c = st.columns(4)
    c[0].metric(
        f"Accuracy{label}",
        f"{stats.accuracy:.4f}" if np.isfinite(stats.accuracy) else "n/a (no labels)",
        delta=f"{stats.accuracy - last.accuracy:+.4f} vs last exit"
        if np.isfinite(stats.accuracy) and not label
        else None,
    )
    c[1].metric(
        f"Mean {unit}{label}",
        figures.fmt_flops(stats.mean_cost) + unit,
        **(
            widgets.cost_delta(stats.mean_cost, last.mean_cost, "the last exit")
            if not label
            else {}
        ),
    )
    c[2].metric(f"p95 {unit}{label}", figures.fmt_flops(stats.p95_cost) + unit)
    c[3].metric(f"Speed-up vs last exit{label}", f"{stats.speedup:.2f}×")


def _compared_kinds(trace: Trace) -> list[str]:
    """The kinds drawn together on the trade-off chart: thresholds, patience, the learned gate."""
    kinds = ["max_prob", "entropy", "patience", "gate"]
    return [k for k in kinds if k in widgets.available_kinds(trace)]


def _pts(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{100 * x:+.1f}"


def _gap_columns(gaps: calibration.ExitGaps, name: str) -> dict[str, list]:
    return {
        f"{name}: samples": [int(c) for c in gaps.count] + [int(gaps.count.sum())],
        f"{name}: mean confidence": [
            "–" if not np.isfinite(v) else f"{v:.4f}"
            for v in [*gaps.confidence, gaps.overall_confidence]
        ],
        f"{name}: accuracy": [
            "–" if not np.isfinite(v) else f"{v:.4f}"
            for v in [*gaps.accuracy, gaps.overall_accuracy]
        ],
        f"{name}: gap (points)": [_pts(v) for v in [*gaps.gap, gaps.overall_gap]],
    }


def _direction(gap: float) -> str:
    if not np.isfinite(gap):
        return "no samples"
    return "over-confident" if gap > 0 else "under-confident" if gap < 0 else "calibrated"


def bias_section(
    trace: Trace,
    key: str,
    policy: Policy,
    exits: np.ndarray,
    stats: tradeoff.PolicyStats,
    outputs: calibration.PolicyOutputs,
    gaps: calibration.ExitGaps,
    reliability: calibration.Reliability,
) -> None:
    """Signed gap (mean confidence − accuracy) of the samples that exit, per exit and overall,
    for the current policy and, at matched cost, for the learned gate (or max-prob, when the
    gate is the current policy). JEI-DNN says thresholding biases it upwards; this shows it.

    ``outputs``, ``gaps`` and ``reliability`` are the current policy's, computed once by the
    panel (each is tens of milliseconds on a million samples)."""
    st.subheader("Confidence bias of the samples that exit")
    outcome = loaders.outcome_table(key, trace)
    has_gate = "gate" in widgets.available_kinds(trace)
    other_kind = "max_prob" if policy.kind == "gate" else "gate" if has_gate else None
    columns = {"exit": [*trace.meta.exit_names, "whole policy"]}
    columns |= _gap_columns(gaps, "current")
    panels = [
        (
            f"current: {policy.describe()}",
            calibration.exited_reliability(trace, exits, outputs=outputs),
            reliability,
        )
    ]
    line = (
        f"Current policy ({policy.describe()}): the exited samples are "
        f"**{_direction(gaps.overall_gap)}** by {_pts(gaps.overall_gap)} points overall"
    )
    if other_kind is not None:
        c = loaders.curve_summary(key, other_kind, trace).curve
        other = c.policy(tradeoff.nearest_cost(c, stats.mean_cost))
        o_exits = loaders.policy_exits(key, trace, other)
        o_outputs = calibration.policy_outputs(trace, o_exits, outcome=outcome)
        o_stats = tradeoff.evaluate(trace, o_exits, labelled_correct=o_outputs.correct)
        o_gaps = calibration.exit_gaps(trace, o_exits, outputs=o_outputs)
        columns |= _gap_columns(o_gaps, "matched")
        panels.append(
            (
                f"{other.describe()} at matched cost",
                calibration.exited_reliability(trace, o_exits, outputs=o_outputs),
                calibration.of_policy(trace, o_exits, outputs=o_outputs),
            )
        )
        line += (
            f"; {POLICY_LABELS[other_kind]} at matched cost ({other.describe()}, accuracy "
            f"{o_stats.accuracy:.4f} at {o_stats.cost_fraction:.1%} of the full cost, vs "
            f"{stats.accuracy:.4f} at {stats.cost_fraction:.1%}): "
            f"**{_direction(o_gaps.overall_gap)}** by {_pts(o_gaps.overall_gap)} points."
        )
    else:
        line += ". This trace has no learned gate scores to compare with."
    st.markdown(line)
    st.table(pl.DataFrame(columns).to_arrow())
    gate_info = trace.meta.extra.get("gate") if isinstance(trace.meta.extra, dict) else None
    st.caption(
        "Gap = mean max-probability − accuracy of the samples that leave at that exit, in "
        "points: positive is over-confident (the positive bias JEI-DNN attributes to "
        "thresholding), negative under-confident. ECE above has no sign."
        + (
            f" The learned gate was fitted post hoc on the frozen model ({gate_info['fitted_on']};"
            " logistic regression per exit on the exit's sorted probabilities, entropy, margin "
            "and agreement with the previous exit; not trained jointly with the heads)."
            if isinstance(gate_info, dict)
            and "fitted_on" in gate_info
            and not gate_info.get("joint")
            else " The learned gate was trained jointly with the heads (JEI-DNN: the expected "
            "loss under the gates' exit distribution plus a cost term, on the train split), and "
            "the model carries it: the real runtime runs it too."
            if isinstance(gate_info, dict) and gate_info.get("joint")
            else ""
        )
    )
    widgets.chart(
        figures.exited_reliability_figure(panels, trace.meta.exit_names),
        "chart.exited_reliability",
        "exited_reliability",
    )


@st.fragment
def profile_section(model_id: str, profile) -> None:
    """Time the model again on this machine at the user's batch size (the time cost axis)."""
    with st.expander("Time profile (measured on this machine)"):
        if profile is not None and profile.reason:
            st.caption(widgets.literal(profile.reason))
            return
        shown = [b for b in (profile.batches if profile else []) if b != 1]
        b1, b2 = st.columns([1, 2])
        batch = b1.number_input(
            "Batch size", 1, 4096, value=shown[0] if shown else 256, key="w.profile_batch"
        )
        if b2.button("Re-profile at this batch size", key="b.reprofile"):
            with progress.status(
                f"Timing {model_id} at batch 1 and {batch}…", f"Timed {model_id}"
            ) as bar:
                p = loaders.reprofile(model_id, int(batch), lambda f, t: bar(f, 1.0, t))
            if p.reason:
                st.warning(widgets.literal(p.reason))
            else:
                st.rerun()


def tuning_panel(source: str) -> None:
    t0, cpu0 = time.perf_counter(), time.thread_time()
    try:
        trace = loaders.get_trace(source)
    except FileNotFoundError as e:
        st.error(widgets.literal(e))
        return
    except TraceError as e:
        st.error(widgets.trace_error(e))
        return
    profile = loaders.source_profile(source)
    widgets.cost_axis(profile)
    trace, key = _on_axis(source)
    unit = trace.meta.cost_unit
    timed = costs.is_time(unit)

    left, right = st.columns([1, 1])
    with left:
        policy = widgets.policy_controls(trace)
    kind = policy.kind
    curve_kind = "max_prob" if kind == "per_exit" else kind
    summary = loaders.curve_summary(key, curve_kind, trace)
    with right:
        # the accuracy target starts half a point below this trace's last exit, and starts
        # there again when another trace is chosen (the previous trace's value means nothing)
        if st.session_state.get(SOLVE_FOR) != key or "w.solve_acc" not in st.session_state:
            last_acc = float(summary.last.accuracy)
            acc_default = round(100 * last_acc - 0.5, 2) if trace.has_labels else 90.0
            st.session_state["w.solve_acc"] = max(0.0, acc_default)
            st.session_state[SOLVE_FOR] = key
        st.session_state.setdefault("w.solve_budget", 50.0)
        s1, s2 = st.columns(2)
        s1.number_input("Accuracy at least (%)", 0.0, 100.0, step=0.1, key="w.solve_acc")
        s1.button(
            "Cheapest setting with this accuracy",
            key="b.solve_acc",
            on_click=_solve,
            args=(source, "accuracy"),
            disabled=not trace.has_labels,
            width="stretch",
        )
        if timed:
            st.session_state.setdefault(
                _ms_budget_key(unit), float(f"{summary.last.mean_cost / 2:.3g}")
            )
            s2.number_input(
                f"Mean {unit} at most", 0.0, step=0.001, format="%.4f", key=_ms_budget_key(unit)
            )
        else:
            s2.number_input(
                f"Mean {unit} at most (% of full model)",
                0.0,
                100.0,
                step=1.0,
                key="w.solve_budget",
            )
        s2.button(
            "Best accuracy within this budget",
            key="b.solve_budget",
            on_click=_solve,
            args=(source, "budget"),
            disabled=not trace.has_labels,
            width="stretch",
        )
    _show_msg()
    if not loaders.is_upload(source):
        profile_section(_model_id(source), profile)

    exits = loaders.policy_exits(key, trace, policy)
    # each sample's confidence and correctness at its exit, gathered once for the metrics and
    # every chart, and what the charts read of them, computed once each
    outputs = calibration.policy_outputs(trace, exits, outcome=loaders.outcome_table(key, trace))
    stats = tradeoff.evaluate(trace, exits, labelled_correct=outputs.correct)
    gaps = calibration.exit_gaps(trace, exits, outputs=outputs)
    _metrics_row(stats, summary.last, unit)
    never = st.radio(
        "Oracle: samples no exit gets right are charged at",
        list(NEVER_LABELS),
        format_func=NEVER_LABELS.get,
        key=W_NEVER,
        horizontal=True,
        help="The oracle stops every sample at its earliest correct exit. Work on early exit "
        "charges the samples that no exit gets right either at the first exit (so the oracle "
        "is a lower bound on cost) or at the last (they needed everything and still failed); "
        "on a trace with many such samples the oracle's speed-up differs a lot.",
    )
    oracle = loaders.oracle_stats(key, never, trace)
    n_never = loaders.never_right(key, trace)
    st.caption(
        f"{policy.describe()} · {trace.num_samples} samples ({stats.n_labelled} labelled) · "
        f"full model {figures.fmt_flops(stats.full_cost)}{unit} · oracle "
        f"{oracle.accuracy:.4f} at {figures.fmt_flops(oracle.mean_cost)}{unit} "
        f"(**{oracle.speedup:.2f}×**; {n_never} sample{'' if n_never == 1 else 's'} that no "
        f"exit gets right, charged at the {never} exit)"
    )

    # linked selection: bars picked in the charts below filter the metrics and the table
    masks = [
        figures.selection_mask(st.session_state.get("sel.exits"), exits, trace.label, "exits"),
        figures.selection_mask(st.session_state.get("sel.classes"), exits, trace.label, "classes"),
    ]
    masks = [m for m in masks if m is not None]
    mask = np.logical_and.reduce(masks) if masks else None
    if mask is not None:
        n_sel = int(mask.sum())
        st.markdown(f"**Selected slice: {n_sel} samples** (double-click a chart to clear)")
        if n_sel:
            _metrics_row(
                tradeoff.evaluate_slice(trace, exits, mask), summary.last, unit, " (slice)"
            )

    col1, col2 = st.columns(2)
    with col1:
        widgets.chart(
            figures.tradeoff_figure(
                summary.plot_cost,
                summary.plot_accuracy,
                summary.plot_front,
                stats,
                oracle,
                summary.last,
                summary.fixed,
                kind_label=POLICY_LABELS[curve_kind],
                cost_unit=unit,
                oracle_name=f"oracle (never-right at the {never} exit)",
                others=[
                    (
                        POLICY_LABELS[k],
                        loaders.curve_summary(key, k, trace).plot_cost,
                        loaders.curve_summary(key, k, trace).plot_accuracy,
                    )
                    for k in _compared_kinds(trace)
                    if k != curve_kind
                ],
            ),
            "chart.tradeoff",
            "tradeoff",
        )
    with col2:
        widgets.chart(
            figures.exit_histogram(stats.exit_counts, gaps.accuracy, trace.meta.exit_names),
            "sel.exits",
            "exit_histogram",
            select=True,
        )
    col3, col4 = st.columns(2)
    with col3:
        if trace.has_labels:
            widgets.chart(
                figures.per_class_figure(
                    tradeoff.per_class_exit_rates(trace, exits),
                    trace.meta.class_names,
                    trace.meta.exit_names,
                ),
                "sel.classes",
                "per_class_exit_rates",
                select=True,
            )
    pol_rel = calibration.of_policy(trace, exits, outputs=outputs) if trace.has_labels else None
    with col4:
        if trace.has_labels:
            per_exit = loaders.per_exit_reliability(key, trace)
            widgets.chart(
                figures.reliability_figure(per_exit, pol_rel, trace.meta.exit_names),
                "chart.reliability",
                "reliability",
            )
            st.caption(
                "ECE: "
                + " · ".join(
                    f"{n} {r.ece:.3f}" for n, r in zip(trace.meta.exit_names, per_exit, strict=True)
                )
                + f" · **policy's outputs {pol_rel.ece:.3f}**"
            )

    if trace.has_labels:
        bias_section(trace, key, policy, exits, stats, outputs, gaps, pol_rel)

    st.subheader("Samples" + (" in the selected slice" if mask is not None else ""))
    table = sample_table(trace, exits, mask, limit=MAX_TABLE_ROWS)
    n_rows = trace.num_samples if mask is None else int(mask.sum())
    # as Arrow: Streamlit converts a polars frame through pandas, ten times slower
    st.dataframe(table.to_arrow(), hide_index=True, height=280, key="table.samples")
    if n_rows > MAX_TABLE_ROWS:
        st.caption(f"Showing the first {MAX_TABLE_ROWS} of {n_rows} rows; exports hold all.")
    d1, d2, _ = st.columns([1, 1, 4])
    d1.download_button(
        "Table as CSV",
        data=lambda: sample_table(trace, exits, mask).write_csv().encode(),
        file_name="samples.csv",
        mime="text/csv",
        key="dl.table_csv",
        on_click="ignore",
    )

    def parquet_bytes() -> bytes:
        buf = io.BytesIO()
        sample_table(trace, exits, mask).write_parquet(buf)
        return buf.getvalue()

    d2.download_button(
        "Table as Parquet",
        data=parquet_bytes,
        file_name="samples.parquet",
        mime="application/octet-stream",
        key="dl.table_parquet",
        on_click="ignore",
    )

    st.subheader("Save this policy")
    n1, n2, n3 = st.columns([2, 1, 1])
    name = n1.text_input("Name", key="w.save_name", placeholder="e.g. fast-but-safe")
    metrics = {
        "accuracy": stats.accuracy,
        "mean_cost": stats.mean_cost,
        "p95_cost": stats.p95_cost,
        "speedup": stats.speedup,
    }
    if n2.button("Save policy", key="b.save", type="primary", width="stretch"):
        store = _store()
        if store is not None:
            try:
                store.save(name, _model_id(source), policy, metrics)
            except PolicyStoreError as e:
                st.error(f"Not saved: {e}")
            else:
                st.session_state[MSG_KEY] = ("success", f"Saved policy {name.strip()!r}.")
                st.rerun()  # the whole app, so the sidebar list shows it
    n3.download_button(
        "Export as JSON",
        data=lambda: SavedPolicy(
            name.strip() or "policy", _model_id(source), policy, metrics
        ).to_json(),
        file_name=f"{(name.strip() or 'policy').replace(' ', '_')}.json",
        mime="application/json",
        key="dl.policy_json",
        on_click="ignore",
        width="stretch",
    )
    st.session_state[TIMING_KEY] = (time.perf_counter() - t0) * 1e3
    st.session_state[CPU_KEY] = (time.thread_time() - cpu0) * 1e3


def training_variants_section(source: str) -> None:
    """When the trace is one of the Fashion-MNIST CNN's three trainings (SDN, FastBERT, JEI-DNN),
    their accuracy–cost curves and oracles on one chart, with a budget table."""
    from app.figures_variants import variants_figure
    from engine.training_variants import BUDGETS, is_variant

    model_id = _model_id(source)
    if loaders.is_upload(source) or not is_variant(model_id):
        return
    curves = loaders.training_variants()
    if len(curves) < 2:
        return
    st.subheader("The same CNN trained three ways")
    widgets.chart(variants_figure(curves, model_id), "chart.variants", "training_variants")
    rows = {"training": [c.label for c in curves]}
    for b in BUDGETS:
        rows[f"≤ {b:.0%} of the cost"] = [
            "–" if c.within_budget[f"{b:g}"] is None else f"{c.within_budget[f'{b:g}']:.4f}"
            for c in curves
        ]
    rows["last exit"] = [f"{c.last_accuracy:.4f}" for c in curves]
    rows["oracle"] = [f"{c.oracle_accuracy:.4f} at {c.oracle_cost_fraction:.0%}" for c in curves]
    st.table(pl.DataFrame(rows))
    st.caption(
        "Best test accuracy of each training's policy sweep within each budget (mean cost as a "
        "fraction of the full model). Joint (SDN) and self-distilled (FastBERT) exits are chosen "
        "by max-probability thresholds, the JEI-DNN model by its jointly trained gates (new heads "
        "and gates on the SDN model's frozen backbone). Stars: each model's oracle."
    )


# --- page ------------------------------------------------------------------------------------

upload_section()
local_path_section()
source = widgets.model_picker()
if source is None:
    st.info("No traces yet: train a bundled model (see README) or upload a trace in the sidebar.")
    st.stop()
try:
    trace = loaders.get_trace(source)
except (FileNotFoundError, TraceError) as e:
    why = widgets.trace_error(e) if isinstance(e, TraceError) else widgets.literal(e)
    st.error(f"Could not load {widgets.literal(repr(source))}: {why}")
    st.stop()
st.sidebar.caption(
    f"{trace.num_samples} samples · {trace.num_exits} exits · {trace.num_classes} classes · "
    f"data set {trace.meta.dataset} ({trace.meta.split})"
)
if note := trace.meta.extra.get("note"):  # what a converted trace cannot tell (CALM runs)
    st.info(widgets.literal(note))
saved_section(source, trace)
tuning_panel(source)
training_variants_section(source)
