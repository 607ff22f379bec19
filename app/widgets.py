"""Shared widgets: the model picker and the exit-policy controls, bound to the URL.

The current model, policy and parameters live in the query string, so a tuned setting can be
shared as a link and reopens exactly. These names are a stable interface (other pages, such as
the guided tour, link into the tuning and inspector pages with them):

==========  ===============================================================================
``model``   source id: ``<model_id>`` (its test-split trace, e.g. ``mnist_multi_exit_cnn``),
            ``<model_id>@<split>`` for another split, ``upload:<name>`` for a trace uploaded
            in this browser session
``policy``  ``max_prob`` | ``entropy`` | ``margin`` | ``patience`` | ``per_exit`` | ``gate``
``t``       threshold of max_prob / entropy / margin / gate, a float (e.g. ``0.9``);
            above 1 (max_prob, margin) or below 0 (entropy) never exits early
``p``       patience (PABEE), an integer >= 0
``ts``      per-exit thresholds, comma-separated floats, one per exit (the last one is never
            consulted and may be omitted), e.g. ``0.99,0.95,0.9``
``sample``  inspector only: the sample id from the test split to show
``pin``     inspector only: the sample id pinned for side-by-side comparison
==========  ===============================================================================

Example: ``/tuning?model=mnist_multi_exit_cnn&policy=max_prob&t=0.9``.

Only the parameters of the current policy are kept in the URL. The URL is read once per page
visit (a link opened, a page switched to; see ``app/navigation.py``) and wins then; after that
the widgets own the values and the URL only follows them. Reading it on every rerun made the
browser and the server fight: during a burst of key presses each rerun request carries the URL
of a few presses ago, which then moved the slider back. The values are also remembered across
pages in ``st.session_state`` under ``aie.*`` keys.
"""

from __future__ import annotations

import math
import re

import streamlit as st

from app import figures, loaders, navigation
from engine.core import costs
from engine.core.policies import POLICY_LABELS, Policy
from engine.core.trace import Trace, TraceError

QP_MODEL = "model"
QP_POLICY = "policy"
QP_THRESHOLD = "t"
QP_PATIENCE = "p"
QP_THRESHOLDS = "ts"
QP_SAMPLE = "sample"
QP_PIN = "pin"

TUNABLE_KINDS = ("max_prob", "entropy", "margin", "patience", "per_exit", "gate")
THRESHOLD_KINDS = ("max_prob", "entropy", "margin", "gate")
DEFAULT_THRESHOLD = {"max_prob": 0.9, "entropy": 0.2, "margin": 0.5, "gate": 0.5}
# slider ranges: a little past the natural range, so "never exit early" is reachable
T_RANGE = {
    "max_prob": (0.0, 1.001),
    "margin": (0.0, 1.001),
    "gate": (0.0, 1.001),
    "entropy": (-0.001, 1.0),
}
T_STEP = 0.001

W_MODEL = "w.model"
W_KIND = "w.kind"
W_PATIENCE = "w.patience"
STATE = "aie.state"  # persistent (non-widget) copy of the current choices
READ = "aie.qp_read"  # the visit in which each query param was last read


def w_threshold(kind: str) -> str:
    return f"w.t.{kind}"


def w_per_exit(k: int) -> str:
    return f"w.ts.{k}"


def _state() -> dict:
    return st.session_state.setdefault(STATE, {})


def _read() -> dict:
    return st.session_state.setdefault(READ, {})


def fmt_float(x: float) -> str:
    """Shortest text that reads back to the same float (so links reopen exactly)."""
    return repr(float(x))


def _link_value(name: str) -> str | None:
    """The query param's value the first time it is asked for in this page visit, else None."""
    visit = navigation.visit()
    if _read().get(name) == visit:
        return None
    _read()[name] = visit
    return st.query_params.get(name)


def _write_qp(name: str, value: str | None) -> None:
    """Make the URL show the value. Always sent: the request's query string may be stale."""
    if value is None:
        if name in st.query_params:
            del st.query_params[name]
        return
    st.query_params[name] = value


def _clamp(kind: str, t: float) -> float:
    lo, hi = T_RANGE[kind]
    return min(hi, max(lo, t))


# --- model picker ------------------------------------------------------------------------------


def model_picker(container=None, label: str = "Model / trace") -> str | None:
    """Select a bundled trace or an uploaded one; bound to ``?model=``. None when none exist."""
    container = container or st.sidebar
    sources = loaders.all_sources()
    wanted = _link_value(QP_MODEL)
    if wanted is not None:
        if wanted in sources:
            st.session_state[W_MODEL] = wanted
        else:
            container.warning(
                f"The link names {wanted!r}, which is not available here"
                + (
                    " (uploaded traces live only in the browser session that uploaded them)."
                    if loaders.is_upload(wanted)
                    else "."
                )
            )
    if not sources:
        return None
    if st.session_state.get(W_MODEL) not in sources:
        remembered = _state().get("model")
        st.session_state[W_MODEL] = remembered if remembered in sources else sources[0]
    source = container.selectbox(label, sources, key=W_MODEL, format_func=loaders.source_label)
    _state()["model"] = source
    _write_qp(QP_MODEL, source)
    return source


# --- policy controls ---------------------------------------------------------------------------


def available_kinds(trace: Trace) -> list[str]:
    kinds = [k for k in TUNABLE_KINDS if k != "gate" or trace.gate is not None]
    if trace.confidence is not None:  # top-1 confidence only: no entropy, margin, patience
        kinds = [k for k in kinds if k in ("max_prob", "per_exit", "gate")]
    if trace.num_exits < 2:
        kinds = [k for k in kinds if k not in ("patience", "per_exit")]
    return kinds


def _parse_thresholds(text: str, k: int) -> list[float]:
    vals = [float(v) for v in text.split(",") if v.strip()]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(text)
    vals = vals[:k] + [vals[-1]] * max(0, k - len(vals))
    return [_clamp("max_prob", v) for v in vals]


def _apply_query_params(trace: Trace, kinds: list[str]) -> None:
    """Copy a link's query params into the widget state (once per visit, before the widgets)."""
    k = trace.num_exits
    kind = _link_value(QP_POLICY)
    if kind is not None:
        if kind in kinds:
            st.session_state[W_KIND] = kind
        else:
            st.warning(f"Policy {kind!r} from the link is not available for this trace.")
    current = st.session_state.get(W_KIND, _state().get("kind", kinds[0]))
    t = _link_value(QP_THRESHOLD)
    if t is not None and current in THRESHOLD_KINDS:
        try:
            st.session_state[w_threshold(current)] = _clamp(current, float(t))
        except ValueError:
            st.warning(f"Ignoring threshold {t!r} from the link: not a number.")
    p = _link_value(QP_PATIENCE)
    if p is not None:
        try:
            st.session_state[W_PATIENCE] = min(max(0, int(p)), max(1, k - 1))
        except ValueError:
            st.warning(f"Ignoring patience {p!r} from the link: not an integer.")
    ts = _link_value(QP_THRESHOLDS)
    if ts is not None:
        try:
            for e, v in enumerate(_parse_thresholds(ts, k)):
                st.session_state[w_per_exit(e)] = v
        except ValueError:
            st.warning(f"Ignoring per-exit thresholds {ts!r} from the link.")


def _ensure_defaults(trace: Trace, kinds: list[str]) -> None:
    """Widget keys cleared by a page switch are restored from the remembered state."""
    s = _state()
    k = trace.num_exits
    if st.session_state.get(W_KIND) not in kinds:
        st.session_state[W_KIND] = s.get("kind") if s.get("kind") in kinds else kinds[0]
    for kind in THRESHOLD_KINDS:
        key = w_threshold(kind)
        if key not in st.session_state:
            st.session_state[key] = s.get(key, DEFAULT_THRESHOLD[kind])
    patience = min(st.session_state.get(W_PATIENCE, s.get(W_PATIENCE, 1)), max(1, k - 1))
    if st.session_state.get(W_PATIENCE) != patience:  # a write overrides the browser's value
        st.session_state[W_PATIENCE] = patience
    for e in range(k):
        key = w_per_exit(e)
        if key not in st.session_state:
            st.session_state[key] = s.get(key, DEFAULT_THRESHOLD["max_prob"])


def set_policy(policy: Policy, num_exits: int) -> None:
    """Move the controls to a policy (call from a callback, before the widgets render)."""
    s = _state()
    st.session_state[W_KIND] = policy.kind
    s["kind"] = policy.kind
    if policy.kind in THRESHOLD_KINDS:
        st.session_state[w_threshold(policy.kind)] = _clamp(policy.kind, policy.threshold)
        s[w_threshold(policy.kind)] = st.session_state[w_threshold(policy.kind)]
    elif policy.kind == "patience":
        st.session_state[W_PATIENCE] = min(policy.patience, max(1, num_exits - 1))
        s[W_PATIENCE] = st.session_state[W_PATIENCE]
    elif policy.kind == "per_exit":
        vals = list(policy.thresholds)[:num_exits]
        vals += [vals[-1] if vals else 1.0] * (num_exits - len(vals))
        for e, v in enumerate(vals):
            st.session_state[w_per_exit(e)] = _clamp("max_prob", v)
            s[w_per_exit(e)] = st.session_state[w_per_exit(e)]


def _policy_of(kind: str, k: int) -> Policy:
    ss = st.session_state
    if kind in THRESHOLD_KINDS:
        return Policy(kind, threshold=float(ss[w_threshold(kind)]))
    if kind == "patience":
        return Policy("patience", patience=int(ss[W_PATIENCE]))
    thresholds = [float(ss[w_per_exit(e)]) for e in range(k - 1)] + [1.0]
    return Policy("per_exit", thresholds=tuple(thresholds))


def policy_controls(trace: Trace, container=None, compact: bool = False) -> Policy:
    """Policy kind and its parameter sliders, bound to ``?policy=&t=&p=&ts=``."""
    c = container or st
    kinds = available_kinds(trace)
    _apply_query_params(trace, kinds)
    _ensure_defaults(trace, kinds)
    exit_names = trace.meta.exit_names
    k = trace.num_exits
    kind = c.selectbox(
        "Exit policy", kinds, key=W_KIND, format_func=lambda x: POLICY_LABELS.get(x, x)
    )
    if kind in THRESHOLD_KINDS:
        lo, hi = T_RANGE[kind]
        help_text = {
            "max_prob": "Exit at the first exit whose max softmax probability is at least this. "
            "Above 1: never exit early.",
            "entropy": "Exit at the first exit whose normalised entropy is at most this. "
            "Below 0: never exit early.",
            "margin": "Exit when top-1 minus top-2 probability is at least this.",
            "gate": "Exit when the learned gate score is at least this.",
        }[kind]
        c.slider(
            "Threshold",
            min_value=lo,
            max_value=hi,
            step=T_STEP,
            format="%.4f",
            key=w_threshold(kind),
            help=help_text,
        )
    elif kind == "patience":
        c.slider(
            "Patience (consecutive exits that must agree)",
            min_value=0,
            max_value=max(1, k - 1),
            step=1,
            key=W_PATIENCE,
            help="PABEE: exit once the prediction has stayed the same for this many exits.",
        )
    else:
        cols = c.columns(max(1, k - 1)) if not compact else [c] * (k - 1)
        for e in range(k - 1):
            cols[e].slider(
                f"Threshold at {exit_names[e]}",
                min_value=0.0,
                max_value=1.001,
                step=T_STEP,
                format="%.4f",
                key=w_per_exit(e),
            )
    policy = _policy_of(kind, k)
    remember(policy, k)
    return policy


def remember(policy: Policy, k: int) -> None:
    """Store the policy in the session and write it to the URL."""
    s = _state()
    s["kind"] = policy.kind
    _write_qp(QP_POLICY, policy.kind)
    if policy.kind in THRESHOLD_KINDS:
        s[w_threshold(policy.kind)] = policy.threshold
        _write_qp(QP_THRESHOLD, fmt_float(policy.threshold))
    else:
        _write_qp(QP_THRESHOLD, None)
    if policy.kind == "patience":
        s[W_PATIENCE] = policy.patience
        _write_qp(QP_PATIENCE, str(policy.patience))
    else:
        _write_qp(QP_PATIENCE, None)
    if policy.kind == "per_exit":
        for e, v in enumerate(policy.thresholds[: k - 1]):
            s[w_per_exit(e)] = v
        _write_qp(QP_THRESHOLDS, ",".join(fmt_float(v) for v in policy.thresholds[: k - 1]))
    else:
        _write_qp(QP_THRESHOLDS, None)


def query_int(name: str) -> str | None:
    """A query param for page-specific use (e.g. ``sample``), once per page visit."""
    return _link_value(name)


def write_query(name: str, value: str | None) -> None:
    _write_qp(name, value)


def chart(fig, key: str, name: str, select: bool = False):
    """A Plotly chart with PNG export (mode-bar camera) and an HTML download button.

    ``select=True`` makes its bars selectable (``on_select="rerun"``); the selection is then
    in ``st.session_state[key]``. The HTML is built only when the button is pressed.
    """
    kwargs = {"on_select": "rerun", "selection_mode": ("points", "box")} if select else {}
    state = st.plotly_chart(fig, key=key, config=figures.PLOT_CONFIG, **kwargs)
    st.download_button(
        "HTML",
        data=lambda: figures.figure_html(fig),
        file_name=f"{name}.html",
        mime="text/html",
        key=f"dl.{key}",
        on_click="ignore",
        help="Interactive chart as a stand-alone HTML file (PNG: camera icon on the chart).",
    )
    return state


# --- text for messages and metrics -------------------------------------------------------------


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$])")


def literal(text: str) -> str:
    """``text`` escaped so Markdown shows it as typed (``prob_e*_c*`` is no longer italics)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def trace_error(e: TraceError) -> str:
    """A rejected trace as Markdown: the offending field in code style, the reason as typed."""
    return f"`{e.field}`: {literal(e.detail)}"


def cost_delta(spent: float, full: float, versus: str = "the full model") -> dict:
    """``st.metric`` keyword arguments comparing a cost with the full model's.

    Lower cost is the good direction, so a saving is a green down-arrow (``delta_color=
    "inverse"``) and an overspend a red up-arrow; the same cost is grey without an arrow.
    """
    if not full > 0:
        return {}
    change = spent / full - 1
    if round(change, 2) == 0:
        return dict(delta=f"same as {versus}", delta_color="off", delta_arrow="off")
    return dict(delta=f"{change:+.0%}", delta_color="inverse", delta_description=f"vs {versus}")


# --- the cost axis: FLOPs or measured time ----------------------------------------------------

W_COST_AXIS = "w.cost_axis"


def cost_axis(profile, container=None, key: str = W_COST_AXIS, native: str = "") -> str:
    """The one FLOPs / time switch of every page with a cost axis; returns the unit chosen
    ("FLOPs", "ms (batch 1)", "ms (batch B)"). Only FLOPs, with the reason, when the model has
    no time profile. ``native``: what the FLOPs option is called where the page counts its
    compute in other units (a decoder: "layers per token"); it still returns "FLOPs"."""
    c = container or st
    profiles = profile if isinstance(profile, list) else [profile]
    options = [u for u in costs.units(profiles[0]) if all(u in costs.units(p) for p in profiles)]
    profile = profiles[0]
    if len(options) == 1:
        why = next((p.reason for p in profiles if p is not None and p.reason), "not profiled")
        c.caption(f"Cost axis: {native or 'FLOPs'} only ({why}).")
        return costs.FLOPS
    if st.session_state.get(key) not in options:
        st.session_state[key] = costs.FLOPS
    unit = c.radio(
        "Cost axis",
        options,
        key=key,
        horizontal=True,
        format_func=lambda u: native if native and u == costs.FLOPS else u,
        help=(
            "Layers are what a decoder's exits count; time is the median wall-clock per "
            "generated token, per sequence, of its KV-cached decode step at each depth, plus "
            "what each confidence read and K/V fill adds, measured on this machine (python -m "
            "engine.profile), alone and with a batch of sequences. On a CPU the two disagree: "
            "every confidence read through the head costs about as much as several layers."
            if native
            else "FLOPs are counted by torch; time is the median wall-clock per sample measured "
            "on this machine (python -m engine.profile), at batch 1 and at a larger batch. On a "
            "CPU the two disagree: a wide early stage is cheap in FLOPs and dear in time."
        ),
    )
    if unit != costs.FLOPS:
        m = profile.machine
        c.caption(
            f"Measured {profile.created[:10]} on {m.get('cpu', '?')} · torch {m.get('torch')} · "
            f"{m.get('torch_threads')} thread(s) · median of {profile.repeats} runs after "
            f"{profile.warmup} warm-up · load {m.get('load_average_1min')}"
        )
    return unit


def axis_key(key: str, unit: str, profile) -> str:
    """A cache key for a trace or results on one cost axis (changes when re-profiled)."""
    if unit == costs.FLOPS or profile is None:
        return key
    return f"{key}|{unit}|{profile.created}"
