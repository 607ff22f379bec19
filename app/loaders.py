"""Cached loaders for the pages: traces (``st.cache_data``), models (``st.cache_resource``).

A *source* is what the model picker offers: a trace on disk (``"<model_id>"`` for the test
split, ``"<model_id>@<split>"`` for another split) or a trace uploaded in this session
(``"upload:<name>"``), or a trace file on this machine (``"file:<name>"``, read from its
path: the way to load traces over the upload limit). Uploaded bytes live in ``st.session_state`` (per browser session) and
are parsed once per content hash. Math stays in ``engine/``; these functions only call it and
cache the answers.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from app import progress
from engine import compare, compare_sources
from engine.byo import foreign
from engine.core import calibration, costs, policies, tradeoff
from engine.core.policies import NeverCorrect, Policy, ThresholdIndex
from engine.core.trace import Trace, TraceError
from engine.core.trace import read as read_trace
from engine.data import images as image_data
from engine.families.moe import analysis as moe
from engine.families.multi_exit_bert import analysis as language
from engine.families.skipnet import records as skipping
from engine.run import inspection

UPLOAD_PREFIX = "upload:"
UPLOADS_KEY = "aie.uploaded_traces"  # session_state: name -> (bytes, filename)
MAX_TRACE_MB = 200
LOCAL_PREFIX = "file:"
LOCAL_KEY = "aie.local_traces"  # session_state: name -> absolute path of a trace file
LOCAL_SUFFIXES = (".parquet", ".pq", ".csv")
# "1" shows the "load from a path on this machine" input, "0" hides it; unset: shown only when
# the server listens on a loopback address (``make app`` binds 127.0.0.1), since whoever can
# reach the app could otherwise read any trace file the server's user can
LOCAL_PATHS_ENV = "AIE_LOCAL_PATHS"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- sources ---------------------------------------------------------------------------------


def bundled_sources() -> list[str]:
    """Every trace on disk, and the test split of every model whose family builds traces but
    has none yet (``get_trace`` builds it, with a progress bar, when it is picked)."""
    from engine.trace_store import available_traces

    out = []
    for model_id, split in available_traces():
        out.append(model_id if split == "test" else f"{model_id}@{split}")
    out += [m for m in buildable_models() if m not in out]
    # test splits first, then others
    return sorted(out, key=lambda s: ("@" in s, s))


def buildable_models() -> list[str]:
    """Models with a card whose family builds traces, without a test trace on disk."""
    from engine import families
    from engine.registry import list_cards
    from engine.trace_store import available_traces

    have = {m for m, split in available_traces() if split == "test"}
    return [
        c.model_id
        for c in list_cards()
        if c.model_id not in have and families.get(c.family).traces and c.family != "foreign_trace"
    ]


def uploaded_sources() -> list[str]:
    return [UPLOAD_PREFIX + name for name in st.session_state.get(UPLOADS_KEY, {})]


def local_sources() -> list[str]:
    return [LOCAL_PREFIX + name for name in st.session_state.get(LOCAL_KEY, {})]


def all_sources() -> list[str]:
    return bundled_sources() + uploaded_sources() + local_sources()


def is_local(source: str) -> bool:
    return source.startswith(LOCAL_PREFIX)


def is_upload(source: str) -> bool:
    return source.startswith(UPLOAD_PREFIX)


def split_source(source: str) -> tuple[str, str]:
    """(model_id, split) of a bundled source."""
    model_id, _, split = source.partition("@")
    return model_id, split or "test"


def source_label(source: str) -> str:
    if is_upload(source):
        return f"{source[len(UPLOAD_PREFIX) :]} (uploaded trace)"
    if is_local(source):
        return f"{source[len(LOCAL_PREFIX) :]} (file on this machine)"
    model_id, split = split_source(source)
    title = _card_title(model_id)
    return f"{title} [{split}]" if split != "test" else title


@st.cache_data(show_spinner=False)
def _card_title(model_id: str) -> str:
    from engine.registry import RegistryError, get_card

    try:
        card = get_card(model_id)
    except RegistryError:
        return model_id
    return f"{card.title} ({model_id})" if card.title != model_id else model_id


# --- traces ----------------------------------------------------------------------------------


def _warm(trace: Trace) -> Trace:
    """Compute the derived arrays once so the cached copy carries them."""
    _ = trace.pred, trace.max_prob, trace.correct, trace.labelled, trace.uniform_cost
    _ = trace.num_labelled, trace.full_cost
    return trace


@st.cache_data(show_spinner="Loading trace…", max_entries=16)
def load_bundled_trace(model_id: str, split: str = "test") -> Trace:
    from engine.trace_store import load_trace

    return _warm(load_trace(model_id, split, build_if_missing=False))


@st.cache_data(show_spinner="Checking the uploaded trace…", max_entries=8)
def parse_uploaded_trace(data: bytes, filename: str) -> Trace:
    """Validate and parse an uploaded trace; raises TraceError with a readable message."""
    if len(data) > MAX_TRACE_MB * 1024 * 1024:
        raise TraceError("file", f"larger than {MAX_TRACE_MB} MB")
    if not data:
        raise TraceError("file", "the file is empty")
    if foreign.is_token_file(filename, data):  # per-token arrays from another tool
        return _warm(foreign.read(data, filename))
    return _warm(read_trace(data, filename))


def add_upload(data: bytes, filename: str) -> str:
    """Parse (raising TraceError) and register an uploaded trace; returns its source id."""
    trace = parse_uploaded_trace(data, filename)
    name = trace.meta.model_id if trace.meta.model_id != "uploaded" else filename
    name = name.replace(":", "_")
    st.session_state.setdefault(UPLOADS_KEY, {})[name] = (data, filename)
    return UPLOAD_PREFIX + name


def local_paths_allowed() -> bool:
    """Whether this app may read trace files from paths typed into it (``LOCAL_PATHS_ENV``)."""
    flag = os.environ.get(LOCAL_PATHS_ENV, "").strip()
    if flag:
        return flag == "1"
    return st.get_option("server.address") in _LOOPBACK


def local_trace_path(text: str) -> Path:
    """The trace file a typed path names; TraceError("path", why) when it cannot be one."""
    from engine.registry import is_pickle

    text = text.strip().strip("'\"")
    if not text:
        raise TraceError("path", "type the path of a .parquet or .csv trace file")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if is_pickle(path):
        raise TraceError(
            "path",
            f"{path.name} is a pickle, which is never loaded (unpickling can run any code); "
            "write the trace as Parquet or CSV",
        )
    if not path.exists():
        raise TraceError("path", f"there is no file at {path}")
    if path.is_dir():
        raise TraceError("path", f"{path} is a folder; give the trace file inside it")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise TraceError(
            "path", f"expected a .parquet, .pq or .csv file, got {path.suffix or 'no suffix'!r}"
        )
    if not os.access(path, os.R_OK):
        raise TraceError("path", f"{path} is not readable by the user running this app")
    return path.resolve()


@st.cache_resource(show_spinner="Reading the trace file…", max_entries=2)
def load_local_trace(path: str, mtime_ns: int, size: int) -> Trace:
    """A trace file read from disk, compactly when big (``engine.core.trace.read``).

    Shared, not copied (``cache_resource``): ``cache_data`` would pickle hundreds of MB of a
    million-sample trace on every rerun. ``mtime_ns``/``size`` re-read a rewritten file."""
    return _warm(read_trace(path))


def add_local(text: str) -> str:
    """Read (raising TraceError) and register a trace file from a path; returns its source."""
    path = local_trace_path(text)
    st_ = path.stat()
    trace = load_local_trace(str(path), st_.st_mtime_ns, st_.st_size)
    name = trace.meta.model_id if trace.meta.model_id != path.stem else path.name
    name = name.replace(":", "_").replace("@", "_")
    st.session_state.setdefault(LOCAL_KEY, {})[name] = str(path)
    return LOCAL_PREFIX + name


def _local_entry(source: str) -> tuple[str, int, int]:
    path = st.session_state.get(LOCAL_KEY, {}).get(source[len(LOCAL_PREFIX) :])
    if path is None:
        raise FileNotFoundError(
            "this trace file was loaded in another browser session; load it again from its path"
        )
    try:
        stat = os.stat(path)
    except OSError:
        raise FileNotFoundError(f"the trace file {path} is no longer there") from None
    return path, stat.st_mtime_ns, stat.st_size


def source_key(source: str) -> str:
    """A cache key that changes when an uploaded trace's content changes."""
    if is_local(source):
        path, mtime, size = _local_entry(source)
        return f"{source}:{path}:{mtime}:{size}"
    if is_upload(source):
        data, _ = st.session_state.get(UPLOADS_KEY, {}).get(source[len(UPLOAD_PREFIX) :], (b"", ""))
        return source + ":" + hashlib.sha256(data).hexdigest()[:16]
    return source


def get_trace(source: str) -> Trace:
    """The trace behind a source; FileNotFoundError when it is not (or no longer) available."""
    if is_upload(source):
        entry = st.session_state.get(UPLOADS_KEY, {}).get(source[len(UPLOAD_PREFIX) :])
        if entry is None:
            raise FileNotFoundError(
                "this uploaded trace is not in this browser session; upload it again"
            )
        return parse_uploaded_trace(*entry)
    if is_local(source):
        return load_local_trace(*_local_entry(source))
    model_id, split = split_source(source)
    if split == "test" and model_id in buildable_models():
        build_trace(model_id, split)
    return load_bundled_trace(model_id, split)


def build_trace(model_id: str, split: str = "test") -> None:
    """Run the model over its split once and store the trace where ``load_trace`` finds it,
    showing how far the run has got and the time left; FileNotFoundError (one sentence)
    when it cannot be built here."""
    from engine.core.family import FamilyError
    from engine.data.images import DatasetUnavailable
    from engine.registry import RegistryError
    from engine.trace_store import load_trace

    label = f"Building the trace of {model_id} ({split} split)…"
    try:
        with progress.status(label, f"Built the trace of {model_id}") as bar:
            load_trace(model_id, split, progress=bar)
    except (FamilyError, RegistryError, DatasetUnavailable, OSError, ValueError, RuntimeError) as e:
        raise FileNotFoundError(f"its trace could not be built here: {e}") from None


# --- per-trace summaries (computed once per trace and policy kind) ----------------------------


@dataclass(frozen=True)
class CurveSummary:
    curve: tradeoff.Curve  # every distinct setting of the kind
    front: np.ndarray  # indices into curve, the Pareto front by cost
    last: tradeoff.PolicyStats
    fixed: list  # [K] PolicyStats of "every sample leaves at exit k"
    plot_cost: np.ndarray  # a few hundred points of the curve, for drawing
    plot_accuracy: np.ndarray
    plot_front: np.ndarray  # indices into the plot arrays: the front, by cost


def curve_summary(key: str, kind: str, trace: Trace) -> CurveSummary:
    """The whole curve of one policy kind on one trace (``key`` identifies the trace).

    A compact (big) trace's curves have millions of points: they are shared
    (``cache_resource``), not unpickled afresh on every rerun as ``cache_data`` would."""
    if trace.is_compact:
        return _shared_curve_summary(key, kind, trace)
    return _copied_curve_summary(key, kind, trace)


@st.cache_data(show_spinner="Computing the trade-off curve…", max_entries=64)
def _copied_curve_summary(key: str, kind: str, _trace: Trace) -> CurveSummary:
    return _curve_summary(_trace, kind)


@st.cache_resource(show_spinner="Computing the trade-off curve…", max_entries=8)
def _shared_curve_summary(key: str, kind: str, _trace: Trace) -> CurveSummary:
    return _curve_summary(_trace, kind)


def _curve_summary(_trace: Trace, kind: str) -> CurveSummary:
    c = tradeoff.curve(_trace, kind)
    k = _trace.num_exits
    fixed_stats = [
        tradeoff.evaluate(_trace, np.full(_trace.num_samples, e, dtype=np.int64)) for e in range(k)
    ]
    front = tradeoff.pareto_front(c.mean_cost, c.accuracy)
    drawn = tradeoff.front_to_draw(front)  # solvers read the whole curve; charts a few points
    idx = tradeoff.thin(len(c), drawn)
    plot_front = np.searchsorted(idx, drawn)  # front is ordered by cost already
    return CurveSummary(
        curve=c,
        front=front,
        plot_cost=c.mean_cost[idx],
        plot_accuracy=c.accuracy[idx],
        plot_front=plot_front,
        last=tradeoff.last_exit_stats(_trace),
        fixed=fixed_stats,
    )


@st.cache_data(show_spinner=False, max_entries=64)
def oracle_stats(key: str, never_correct: NeverCorrect, _trace: Trace) -> tradeoff.PolicyStats:
    """The oracle under one convention for samples no exit gets right (both are cheap)."""
    return tradeoff.oracle_stats(_trace, never_correct)


def outcome_table(key: str, trace: Trace) -> calibration.OutcomeTable:
    """Every sample's reliability bin, correctness and confidence at every exit
    (``calibration.outcome_table``), once per trace: shared for a compact (big) trace, copied
    (``cache_data``) for the others."""
    if trace.is_compact:
        return _shared_outcome_table(key, trace)
    return _copied_outcome_table(key, trace)


@st.cache_data(show_spinner=False, max_entries=16)
def _copied_outcome_table(key: str, _trace: Trace) -> calibration.OutcomeTable:
    return calibration.outcome_table(_trace)


@st.cache_resource(show_spinner=False, max_entries=4)
def _shared_outcome_table(key: str, _trace: Trace) -> calibration.OutcomeTable:
    return calibration.outcome_table(_trace)


def threshold_index(key: str, kind: str, trace: Trace) -> ThresholdIndex:
    """``kind``'s exits at any threshold (``policies.threshold_index``), prepared once per
    trace and kind: shared for a compact (big) trace, copied (``cache_data``) for the others."""
    if trace.is_compact:
        return _shared_threshold_index(key, kind, trace)
    return _copied_threshold_index(key, kind, trace)


@st.cache_data(show_spinner=False, max_entries=32)
def _copied_threshold_index(key: str, kind: str, _trace: Trace) -> ThresholdIndex:
    return policies.threshold_index(_trace, kind)


@st.cache_resource(show_spinner=False, max_entries=4)
def _shared_threshold_index(key: str, kind: str, _trace: Trace) -> ThresholdIndex:
    return policies.threshold_index(_trace, kind)


def policy_exits(key: str, trace: Trace, policy: Policy) -> np.ndarray:
    """``policies.exit_index(trace, policy)``, through the prepared index for threshold kinds."""
    if policy.kind in policies.SCORE_KINDS:
        prepared = threshold_index(key, policy.kind, trace)
        return policies.exit_index(trace, policy, prepared=prepared)
    return policies.exit_index(trace, policy)


@st.cache_data(show_spinner=False, max_entries=64)
def never_right(key: str, _trace: Trace) -> int:
    """Labelled samples that no exit gets right."""
    return int((~_trace.correct[_trace.label != -1].any(axis=1)).sum())


@st.cache_data(show_spinner=False, max_entries=64)
def per_exit_reliability(key: str, _trace: Trace) -> list[calibration.Reliability]:
    return calibration.per_exit(_trace)


# --- models and images -----------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the model…", max_entries=8)
def load_model(model_id: str):
    """The bundled network (weights checked against the card). Shared: never mutate it."""
    from engine.families import load_model as _load

    return _load(model_id)


@st.cache_data(show_spinner=False)
def model_card(model_id: str) -> dict | None:
    """The card as a dict, or None when the model has no card (external traces)."""
    from engine.registry import RegistryError, get_card

    try:
        return get_card(model_id).raw
    except RegistryError:
        return None


def forget_model(model_id: str) -> None:
    """After the user added or replaced a model: every page sees the new card, trace and
    weights (the caches are keyed by model id, which an ``--overwrite`` keeps)."""
    st.cache_data.clear()
    load_model.clear(model_id)


@st.cache_resource(show_spinner="Loading images…", max_entries=4)
def load_images(dataset: str, split: str = "test"):
    """The image set (read-only arrays, shared between sessions)."""
    from engine.data.images import load

    return load(dataset, split)


@dataclass(frozen=True)
class TestImages:
    """Test-split images addressable by sample id (= index in the official test split)."""

    images: np.ndarray  # uint8 [M, 28, 28]
    labels: np.ndarray  # [M]
    indices: np.ndarray  # [M] test-split index of each image
    note: str  # empty for the full split; else why only a gallery is shown

    def position(self, sid) -> int | None:
        try:
            sid = int(sid)
        except (TypeError, ValueError):
            return None
        if len(self.indices) and self.indices[-1] == len(self.indices) - 1:
            return sid if 0 <= sid < len(self.indices) else None  # the full split
        hit = np.searchsorted(self.indices, sid)
        return int(hit) if hit < len(self.indices) and self.indices[hit] == sid else None

    @property
    def baseline(self) -> np.ndarray:
        """Attributions' baseline: a black image."""
        return inspection.black_image()

    def model_input(self, pos: int) -> np.ndarray:
        """Image ``pos`` as the model takes it (float32 [1, 28, 28])."""
        return image_data.to_model_input(self.images[pos])[0].numpy()

    def picture(self, pos: int) -> np.ndarray:
        return self.images[pos]


@dataclass(frozen=True)
class ModelInputs:
    """A user model's own evaluation data (``Family.inputs``): sample id i is row i."""

    x: np.ndarray  # float32 [N, *input_shape]
    labels: np.ndarray  # [N]
    note: str = ""
    baseline = None  # attributions' baseline: zeros (the user's normalisation is not known)

    def position(self, sid) -> int | None:
        try:
            sid = int(sid)
        except (TypeError, ValueError):
            return None
        return sid if 0 <= sid < len(self.x) else None

    def model_input(self, pos: int) -> np.ndarray:
        return self.x[pos]

    def picture(self, pos: int) -> np.ndarray | None:
        """The input drawn as a picture, None when its shape is not an image's."""
        return inspection.picture(self.x[pos])


@st.cache_resource(show_spinner="Loading the model's data…", max_entries=4)
def model_inputs(model_id: str) -> ModelInputs | None:
    """The evaluation data a user's model was registered with; None for the other models.
    Raises the family's error (one sentence) when the data file is gone or changed."""
    card, fam = family_of(model_id)
    data = fam.inputs(card)
    return None if data is None else ModelInputs(data.x, data.y)


@st.cache_resource(show_spinner="Loading images…", max_entries=4)
def test_images(dataset: str) -> TestImages:
    """The full test split when installed, else the bundled gallery (engine.data.gallery).

    Raises DatasetUnavailable when neither is there.
    """
    from engine.data.images import DatasetUnavailable

    try:
        from engine.data.gallery import test_images as _test_images
    except ImportError:
        data = load_images(dataset, "test")
        return TestImages(data.images, data.labels, np.arange(len(data)), "")
    try:
        t = _test_images(dataset)
    except FileNotFoundError as e:
        raise DatasetUnavailable(str(e)) from None
    order = np.argsort(t.indices, kind="stable")
    return TestImages(t.data.images[order], t.data.labels[order], t.indices[order], t.note)


def test_image(dataset: str, sid) -> np.ndarray | None:
    """One test-split image by its index (full split, else the bundled gallery), or None."""
    from engine.data.images import DatasetUnavailable

    try:
        ti = test_images(dataset)
    except DatasetUnavailable:
        return None
    pos = ti.position(sid)
    return None if pos is None else ti.images[pos]


# --- families and their results ----------------------------------------------------------------


@st.cache_data(show_spinner=False)
def halting_models() -> list[str]:
    """Bundled models of the halting kind (ACT, PonderNet, ...) whose results can be read."""
    from engine import families

    out = []
    for card, fam in families.cards_of_kind("halt"):
        try:
            fam.results(card)
        except FileNotFoundError:
            continue  # not built here: the page says how to make them when none is left
        except Exception:  # noqa: BLE001 - a damaged file stays listed; the page explains it
            pass
        out.append(card.model_id)
    return out


def family_of(model_id: str):
    """(card, family) of a bundled model."""
    from engine import families
    from engine.registry import get_card

    card = get_card(model_id)
    return card, families.get(card.family)


@st.cache_data(show_spinner="Loading the per-sample results…", max_entries=16)
def results(model_id: str):
    """The family's per-sample results of a bundled model (engine.core.results.Results)."""
    card, fam = family_of(model_id)
    return fam.results(card)


@st.cache_data(show_spinner=False, max_entries=256)
def record(model_id: str, i: int, value: float):
    """Stored sample ``i`` at setting ``value``, as a ``LiveRun``."""
    card, fam = family_of(model_id)
    return fam.record(card, i, value)


@st.cache_data(show_spinner=False, max_entries=16)
def siblings(model_id: str) -> list[str]:
    """Models of the same kind on the same data set (ACT at other ponder costs, PonderNet)."""
    from engine import families

    card, fam = family_of(model_id)
    ok = set(halting_models()) if fam.kind == "halt" else None
    return [
        c.model_id
        for c, _ in families.cards_of_kind(fam.kind, dataset=card.dataset)
        if ok is None or c.model_id in ok
    ]


# --- the compare page ------------------------------------------------------------------------


@st.cache_data(show_spinner="Loading every method's per-sample compute…")
def compare_sweeps(dataset: str):
    """(methods aligned on their shared inputs, the oracle exit or None, notes on what is
    missing); methods is None when fewer than two are there."""
    found, missing = compare_sources.load_sweeps(dataset)
    if len(found) < 2:
        return None, None, missing
    try:
        oracle = [compare_sources.load_oracle(dataset)]
    except FileNotFoundError:
        oracle = []  # no early-exit model on this data set (e.g. parity)
    aligned = compare.align([*found, *oracle])
    return aligned[: len(found)], (aligned[-1] if oracle else None), missing


@st.cache_data(show_spinner=False)
def compare_sparsity(dataset: str):
    try:
        return compare_sources.load_sparsity(dataset)
    except FileNotFoundError:
        return None


@st.cache_data(show_spinner=False)
def compare_pictures(dataset: str):
    """{test-split index: image} of the test images the app has, and why only some if so."""
    from engine.data.images import DatasetUnavailable

    try:
        t = test_images(dataset)
    except (DatasetUnavailable, ValueError, KeyError):
        return None  # not an image data set, or none installed
    return dict(zip(t.indices.tolist(), t.images, strict=True)), t.note


# --- the sample inspector --------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def exit_cumulative_flops(model_id: str) -> np.ndarray:
    from engine.run.exits import exit_costs

    return exit_costs(load_model(model_id)).cumulative


@st.cache_data(show_spinner=False, max_entries=16)
def difficulty_order(key: str, _trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    easiest, hardest = inspection.difficulty_order(_trace)
    return easiest[:2000], hardest[:2000]


# --- the language page -----------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=4)
def text_trace(model_id: str):
    from engine.trace_store import load_trace

    return load_trace(model_id, "test", build_if_missing=False)


@st.cache_data(show_spinner="Classifying…", max_entries=32)
def classify_texts(model_id: str, items: tuple[str, ...]):
    from engine.families.hf_encoder import analysis as user_encoder
    from engine.registry import get_card

    an = user_encoder if get_card(model_id).family == "hf_encoder" else language
    res = an.classify(load_model(model_id), list(items))
    return res.probs, res.num_tokens


@st.cache_data(show_spinner="Generating…", max_entries=64)
def generate_pair(model_id, prompt, n, measure, mode, threshold):
    from engine.families.early_exit_lm import analysis as lm

    return lm.generate_pair(load_model(model_id), prompt, n, measure, mode, threshold)


# --- the pretrained language model (SmolLM2-135M, or the card AIE_LM_CARD names) ------------

LM_CARD_ENV = "AIE_LM_CARD"  # a model id in assets/models, or the path of a card file
DEFAULT_LM = "smollm2_135m"


def lm_ref(default: str = DEFAULT_LM) -> str:
    """Which causal LM the language page and its tour chapter run (tests point it at a tiny one)."""
    return os.environ.get(LM_CARD_ENV) or default


def lm_card(ref: str):
    """The card behind ``ref`` (RegistryError when there is none)."""
    from engine.registry import get_card

    if ref.endswith(".json"):
        p = Path(ref)
        return get_card(p.stem, p.parent)
    return get_card(ref)


LMS_KEPT = 2


@st.cache_resource(show_spinner=False)
def _lms() -> tuple[dict, threading.Lock]:
    """The causal LMs this process holds, by ref (the newest ``LMS_KEPT``), and the lock one
    load at a time takes."""
    return {}, threading.Lock()


def lm_is_loaded(ref: str) -> bool:
    """Whether this process holds the model: a page shows the load's progress only when due."""
    return ref in _lms()[0]


def causal_lm(ref: str, progress=None):
    """The causal LM, loaded once per process and shared by every session: never mutate it.
    Raises LoadError / RegistryError / FamilyError. ``progress`` (a page's bar) hears how far
    the first load has got: the load runs outside a cached function, whose replay could not
    draw into a box made outside it."""
    from engine import families

    models, lock = _lms()
    with lock:
        if ref not in models:
            card = lm_card(ref)
            models[ref] = families.get(card.family).load(card, progress=progress)
            while len(models) > LMS_KEPT:
                models.pop(next(iter(models)))
        return models[ref]


def lm_depth(ref: str) -> int:
    """The model's layer count, from its card when written there (no load), else the model."""
    n = lm_card(ref).config.get("n_layer")
    return int(n) if n else causal_lm(ref).n_layer


@st.cache_data(show_spinner=False, max_entries=64)
def lm_chat_ids(ref: str, text: str) -> list[int]:
    from engine.families.hf_causal_lm import live

    return live.chat_ids(causal_lm(ref), text)


@st.cache_data(show_spinner=False, max_entries=64)
def lm_run(ref: str, prompt: tuple[int, ...], key: str, _setting):
    """One live generation (engine.families.hf_causal_lm.live.run); ``key``: the setting's repr."""
    from engine.families.hf_causal_lm import live

    tuned = lm_tuned_lens(ref) if _setting.lens == "tuned" else None
    return live.run(causal_lm(ref), prompt, _setting, tuned)


def lm_decoders() -> list:
    """The decoders users added (``python -m engine.byo hf --decoder``; the Your models page)."""
    from engine.registry import list_cards

    return [c for c in list_cards("hf_causal_lm") if c.user]


def lm_study(model_id: str):
    """The stored study of early exit against skipping for this model, or None if none was
    built (engine.families.hf_causal_lm.study); keyed by the file's time, so a study built
    while the app runs is picked up."""
    from engine.families.hf_causal_lm.study import study_card

    path = study_card(model_id)
    return _lm_study(str(path), path.stat().st_mtime_ns) if path.is_file() else None


@st.cache_resource(show_spinner="Loading the study's per-layer records…", max_entries=4)
def _lm_study(path: str, mtime_ns: int):
    """Shared, read-only: every slider move reads it (``mtime_ns``: part of the key)."""
    from engine.families.hf_causal_lm.study import load_study

    return load_study(path)


def lm_study_ms(model_id: str, unit: str):
    """[rows of the study's curves] ms per token of each point on this machine (``timing.
    study_curves_ms``; about a second of re-simulation), or None without a time profile."""
    profile, path = time_profile(model_id), None
    if profile is None or unit not in costs.units(profile):
        return None
    from engine.families.hf_causal_lm.study import study_card

    path = study_card(model_id)
    return _lm_study_ms(str(path), path.stat().st_mtime_ns, model_id, unit, profile.created)


@st.cache_data(show_spinner="Timing the study's curves…", max_entries=8)
def _lm_study_ms(path: str, mtime_ns: int, model_id: str, unit: str, created: str):
    from engine.families.hf_causal_lm.timing import study_curves_ms

    return study_curves_ms(_lm_study(path, mtime_ns), time_profile(model_id), unit)


def lm_lens_card(ref: str):
    """The card of the tuned lens trained for this model (the shipped one, or the one trained
    on the user's text when they added it), or None."""
    from engine.families.hf_causal_lm import tuned_lens

    return tuned_lens.lens_for(lm_card(ref))


@st.cache_resource(show_spinner="Loading the tuned lens…", max_entries=2)
def lm_tuned_lens(ref: str):
    """The model's tuned lens (SHA-checked safetensors), shared and frozen: never mutate it."""
    from engine.families.hf_causal_lm import tuned_lens

    card = lm_lens_card(ref)
    if card is None:
        raise ValueError(f"{ref} has no tuned lens")
    return tuned_lens.load(card)


@st.cache_data(show_spinner=False, max_entries=64)
def lm_message_positions(ref: str, prompt: tuple[int, ...]) -> range:
    from engine.families.hf_causal_lm import live

    return live.message_positions(causal_lm(ref), prompt)


@st.cache_data(show_spinner=False, max_entries=64)
def lm_attribution(ref: str, context: tuple[int, ...], token: int, layer: int, positions: tuple):
    """Captum on the user's message tokens (``positions``), from a neutral baseline token."""
    from engine.families.hf_causal_lm import live
    from engine.families.hf_causal_lm.attribution import attribute

    lm = causal_lm(ref)
    return attribute(lm, context, token, layer, positions, live.neutral_id(lm), n_steps=32)


@st.cache_data(show_spinner=False, max_entries=8)
def lm_answer_lens(ref: str, text: str, n: int):
    """The full model's greedy answer to ``text`` and the logit lens over it (the tour's)."""
    from engine.families.hf_causal_lm import live

    lm = causal_lm(ref)
    return live.answer_lens(lm, lm_chat_ids(ref, text), n)


# --- the mixture-of-experts page -------------------------------------------------------------


@st.cache_data(show_spinner=False)
def moe_bundled_sweep(model_id: str) -> dict | None:
    return moe.load_sweep(moe.sweep_file(model_id))


@st.cache_resource(show_spinner=False)
def moe_gallery(dataset: str):
    """The images to pick from (read once: unzipping the test split took ~0.7 s a rerun)."""
    return moe.gallery(dataset)


@st.cache_data(show_spinner=False)
def moe_sweep_images(dataset: str, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The test subset a sweep runs on (or the bundled examples without the data set)."""
    data, source = moe_gallery(dataset)
    idx = moe.sweep_subset(len(data), n)
    return data.images[idx], data.labels[idx], source


@st.cache_data(show_spinner=False)
def moe_live_sweep(model_id: str, dataset: str, n: int, _progress=None) -> list[dict]:
    imgs, labels, _ = moe_sweep_images(dataset, n)
    return moe.sweep(load_model(model_id), imgs, labels, progress=_progress)


@st.cache_data(show_spinner=False, max_entries=64)
def moe_route_one(model_id: str, image: bytes, k, cf, tau) -> moe.RoutingRecord:
    img = np.frombuffer(image, dtype=np.uint8).reshape(1, image_data.SIZE, image_data.SIZE).copy()
    return moe.run(load_model(model_id), img, moe.routing_setting(k, cf, tau))


@st.cache_data(show_spinner=False)
def moe_dense_flops(model_id: str) -> float:
    return moe.dense_flops(load_model(model_id))


# --- the layer-skipping page -----------------------------------------------------------------


@st.cache_data(show_spinner=False)
def skip_records(model_id: str) -> skipping.SkipRecords:
    return skipping.load_records(model_id)


@st.cache_data(show_spinner=False)
def skip_sweep(model_id: str) -> skipping.GateSweep:
    return skipping.gate_sweep(skip_records(model_id))


@st.cache_data(show_spinner=False)
def skip_variants(model_id: str):
    return skipping.load_variants(model_id)


@st.cache_data(show_spinner=False)
def early_exit_curve(model_id: str, unit: str = costs.FLOPS):
    """(mean cost, accuracy, thresholds) of max-prob early exit on a bundled trace, or None.

    Thinned for drawing (a few hundred points plus the Pareto front): the whole curve has one
    point per distinct score, tens of thousands, which made every slider move send megabytes.
    """
    from engine.core.tradeoff import curve, drawing_indices
    from engine.trace_store import load_trace

    try:
        trace = load_trace(model_id, "test", build_if_missing=False)
    except (FileNotFoundError, ValueError):
        return None
    if unit != costs.FLOPS:  # measured time: None when the model was not timed at this unit
        profile = time_profile(model_id)
        if unit not in costs.units(profile):
            return None
        trace = costs.trace_on_axis(trace, profile, unit)
    c = curve(trace, "max_prob")
    idx = drawing_indices(c.mean_cost, c.accuracy)
    return c.mean_cost[idx], c.accuracy[idx], c.params[idx]


# --- the cost axis: FLOPs or measured time ----------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=64)
def time_profile(model_id: str):
    """The model's measured time per exit / setting (``engine.run.profile``), or None."""
    from engine.run.profile import load_profile

    return load_profile(model_id)


def source_profile(source: str):
    """The time profile behind a tuning-page source (none for an uploaded trace)."""
    return None if is_upload(source) else time_profile(split_source(source)[0])


@st.cache_data(show_spinner=False, max_entries=32)
def trace_on_axis(key: str, unit: str, _trace: Trace, _profile) -> Trace:
    """The trace with its cost in ``unit`` (``key`` identifies the trace and its profile)."""
    return _warm(costs.trace_on_axis(_trace, _profile, unit))


def source_on_axis(source: str, unit: str) -> tuple[Trace, str]:
    """A source's trace with its cost in ``unit`` (FLOPs when the source was not timed there),
    and the cache key of that pair."""
    trace, profile = get_trace(source), source_profile(source)
    if unit not in costs.units(profile):
        unit = costs.FLOPS
    if unit == costs.FLOPS:
        return trace, source_key(source)
    key = f"{source_key(source)}|{unit}|{profile.created}"
    return trace_on_axis(key, unit, trace, profile), key


@st.cache_data(show_spinner=False, max_entries=64)
def results_on_axis(key: str, unit: str, _results, _profile):
    return costs.results_on_axis(_results, _profile, unit)


def reprofile(model_id: str, batch: int, progress=None):
    """Time the model again here at ``batch`` (and 1), into the user's data folder; the new
    profile replaces the shipped one on every page."""
    from engine.registry import get_card
    from engine.run.profile import profile, user_profile_file, write_profile

    p = profile(get_card(model_id), batch=batch, repeats=5, progress=progress)
    write_profile(p, user_profile_file(model_id))
    st.cache_data.clear()  # every curve and table drawn from the old profile
    return p


# --- QuEE (exit / continue in int8 / continue in float32) -------------------------------------


def quee_models() -> list[str]:
    """Models with QuEE records bundled (``python -m engine.quee_build MODEL``)."""
    from engine.paths import RECORDS_DIR

    return sorted(p.name.removesuffix("__quee.npz") for p in RECORDS_DIR.glob("*__quee.npz"))


def _quee_stamp(model_id: str) -> int:
    """The records file's mtime: a rebuilt (or replaced) file is read again."""
    from engine import quee_build

    return quee_build.records_file(model_id).stat().st_mtime_ns


@st.cache_resource(show_spinner=False)
def quee_bundle(model_id: str, stamp: int) -> dict:
    """Records, regressors and cost models of one model (read-only, shared by sessions)."""
    from engine import quee_build

    return quee_build.load(quee_build.records_file(model_id))


@st.cache_data(show_spinner=False)
def quee_card(model_id: str) -> dict:
    import json

    from engine import quee_build

    return json.loads(quee_build.card_file(model_id).read_text())


def quee_curves(model_id: str, cost_model: str, band: float) -> dict:
    """Every rule's curve on the test records (λ of the learned choice solved on the train
    records, as the card's)."""
    return _quee_curves(model_id, cost_model, band, _quee_stamp(model_id))


@st.cache_data(show_spinner="Simulating every rule over the records…")
def _quee_curves(model_id: str, cost_model: str, band: float, stamp: int) -> dict:
    from engine.core import quee

    b = quee_bundle(model_id, stamp)
    return quee.curves(b["test"], b["gains"], b["costs"][cost_model], band, fit_on=b["fit"])


def quee_at(model_id: str, cost_model: str, budget: float):
    """(choice λ, simulated outcome on the test records) of the learned choice at a budget."""
    return _quee_at(model_id, cost_model, budget, _quee_stamp(model_id))


@st.cache_data(show_spinner=False)
def _quee_at(model_id: str, cost_model: str, budget: float, stamp: int):
    from engine.core import quee

    b = quee_bundle(model_id, stamp)
    choice = quee.solve(b["fit"], b["gains"], b["costs"][cost_model], budget)
    return choice.lam, quee.simulate(b["test"], choice)


@st.cache_data(show_spinner="Comparing the three trainings…", max_entries=1)
def training_variants():
    """The Fashion-MNIST CNN trained three ways (``engine.training_variants``), bundled traces."""
    from engine.training_variants import variant_curves

    return variant_curves()
