"""The guided tour (pages/tour.py) through the router, with AppTest: every chapter in both views,
stepping and the URL, draw-a-digit against the engine, and the quiz's score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app.tour.chapters import CHAPTERS, draw
from app.tour.chapters.guess import QUIZ_SAMPLE
from app.tour.frame import W_PRESENT
from engine.core.policies import Policy, exit_index
from engine.data import images
from engine.data.drawing import to_canvas_rgba, to_mnist
from engine.paths import MODELS_DIR
from engine.trace_store import trace_file

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
MODEL = "mnist_multi_exit_cnn"
HAVE_MULTI_EXIT = (MODELS_DIR / f"{MODEL}.json").exists() and trace_file(MODEL).exists()
SKIP_BUNDLED = (MODELS_DIR / "mnist_skipnet.json").exists()
ACT_BUNDLED = (MODELS_DIR / "mnist_act.json").exists()
needs_model = pytest.mark.skipif(not HAVE_MULTI_EXIT, reason=f"{MODEL} is not bundled yet")


def tour(chapter: str | None = None, present: bool = False) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    if chapter:
        at.query_params["chapter"] = chapter
    if present:
        at.query_params["present"] = "1"
    return at.run()


def texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


@pytest.mark.parametrize("present", [False, True], ids=["normal", "presenter"])
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.key for c in CHAPTERS])
def test_every_chapter_renders(chapter, present):
    at = tour(chapter.key, present)
    assert not at.exception, at.exception
    assert at.header[0].value == chapter.title
    charts = at.get("plotly_chart")
    missing = [i.value for i in at.info if "not bundled yet" in i.value]
    if chapter.find() is None:
        # says so plainly, and nothing else: no placeholder figure
        assert missing == [f"This chapter needs {chapter.needs}, which is not bundled yet."]
        assert len(charts) == 0
    else:
        assert not missing
        if chapter.key == "draw":  # nothing drawn yet: an invitation, no figure
            assert "Draw a digit on the black square" in texts(at)
        elif chapter.key == "real-lm":  # a 25 s model load waits for the student's click
            assert at.button(key="tour.w.slm_load").label.startswith("Load ")
        else:
            assert len(charts) >= 1
    # presenter view hides the sidebar's chapter list; the normal view has it
    assert (len(at.sidebar.radio) == 0) == present


def test_tour_is_the_landing_page():
    at = tour()
    assert not at.exception
    assert at.header[0].value == CHAPTERS[0].title
    assert "1 / " in texts(at)


def test_next_and_previous_step_through_every_chapter_in_the_url():
    at = tour(present=True)
    assert at.button(key="tour.prev").disabled
    seen = [at.header[0].value]
    for c in CHAPTERS[1:]:
        at.button(key="tour.next").click().run()
        assert not at.exception, at.exception
        assert at.query_params["chapter"] == [c.key] or at.query_params["chapter"] == c.key
        seen.append(at.header[0].value)
        assert at.toggle(key=W_PRESENT).value  # presenter view survives stepping
    assert seen == [c.title for c in CHAPTERS]
    assert at.button(key="tour.next").disabled
    at.button(key="tour.prev").click().run()
    assert at.header[0].value == CHAPTERS[-2].title


def test_presenter_toggle_writes_the_url():
    at = tour(CHAPTERS[1].key)
    assert not at.toggle(key=W_PRESENT).value
    assert len(at.sidebar.radio) == 1
    at.toggle(key=W_PRESENT).set_value(True).run()
    assert at.query_params.get("present") in ("1", ["1"])
    assert len(at.sidebar.radio) == 0
    assert at.header[0].value == CHAPTERS[1].title  # same chapter
    at.toggle(key=W_PRESENT).set_value(False).run()
    assert "present" not in at.query_params


def test_sidebar_chapter_list_jumps():
    at = tour()
    at.sidebar.radio[0].set_value(CHAPTERS[4].key).run()
    assert at.header[0].value == CHAPTERS[4].title
    assert at.query_params.get("chapter") in (CHAPTERS[4].key, [CHAPTERS[4].key])


def test_unknown_chapter_falls_back_to_the_first():
    at = tour("no-such-chapter")
    assert not at.exception
    assert at.header[0].value == CHAPTERS[0].title


# --- with the bundled multi-exit model -----------------------------------------------------------


@pytest.fixture(scope="module")
def engine_side():
    from app.tour.live import make_runner
    from engine.families import load_model
    from engine.trace_store import load_trace

    trace = load_trace(MODEL, "test", build_if_missing=False)
    data = images.load(trace.meta.dataset, "test")
    return trace, data, make_runner(load_model(MODEL))


def robust_rows(trace, t: float, per_exit: int = 2) -> list[int]:
    """Rows whose exit under threshold t is far from the threshold (a few pixels of
    resampling blur cannot move them), from every exit that has such rows."""
    exits = exit_index(trace, Policy("max_prob", threshold=t))
    conf = trace.max_prob
    at_exit = conf[np.arange(len(exits)), exits]
    last = trace.num_exits - 1
    rows = []
    for k in range(trace.num_exits):
        ok = (exits == k) & (at_exit >= (0.98 if k == last else min(t + 0.09, 0.999)))
        if k > 0:
            ok &= conf[:, :k].max(axis=1) <= t - 0.3
        ok &= trace.pred[:, k] == trace.pred[:, -1]
        rows += [int(r) for r in np.flatnonzero(ok)[:per_exit]]
    return rows


@needs_model
def test_draw_path_matches_the_engine_on_test_digits(engine_side):
    """A test digit in the canvas's RGBA format, through the draw-a-digit path, gives the
    prediction and exit of the engine's runtime run directly on the 28x28 image."""
    from app.tour.live import run

    trace, data, runner = engine_side
    if ACT_BUNDLED:
        from engine.families import load_model
        from engine.families.act.model import run_act

        act_model = load_model("mnist_act")
    t = 0.9
    rows = robust_rows(trace, t)
    assert len(rows) >= 3
    at = tour("draw")
    exits = exit_index(trace, Policy("max_prob", threshold=t))
    seen_exits = set()
    for row in rows:
        img = data.images[int(trace.sample_id[row])]
        at.session_state[draw.LOADED] = to_canvas_rgba(img)
        at.run()
        assert not at.exception, at.exception
        got = at.session_state[draw.RESULT]
        direct = run(runner, img, Policy("max_prob", threshold=t))
        assert got["pred"] == int(direct.pred[0])
        assert got["exit"] == int(direct.exit[0])
        assert got["exit"] == int(exits[row])  # and the bundled trace agrees
        seen_exits.add(got["exit"])
        if SKIP_BUNDLED:  # the same canvas drives the skip model (blocks executed)
            assert 0 <= got["skip_blocks_run"] <= 6
        if ACT_BUNDLED:  # ... and the image ACT model (ponder steps, real halting)
            seen = to_mnist(to_canvas_rgba(img))  # what the canvas path hands the models
            act_run = run_act(act_model, images.to_model_input(seen[None]).numpy())
            assert got["act_steps"] == int(act_run["steps"][0])
        assert len(at.get("plotly_chart")) == 1 + SKIP_BUNDLED + ACT_BUNDLED
        assert f"at **{trace.meta.exit_names[got['exit']]}**" in texts(at)
    assert len(seen_exits) >= 2  # easy digits stop early, hard ones go deeper


@needs_model
def test_clear_button_empties_the_drawing(engine_side):
    trace, data, _ = engine_side
    at = tour("draw")
    at.session_state[draw.LOADED] = to_canvas_rgba(data.images[0])
    at.run()
    assert draw.RESULT in at.session_state
    at.button(key="tour.draw.clear").click().run()
    assert draw.RESULT not in at.session_state
    assert "Draw a digit on the black square" in texts(at)
    assert len(at.get("plotly_chart")) == 0


@needs_model
def test_load_test_digit_button_uses_the_canvas_path(engine_side):
    trace, data, runner = engine_side
    from app.tour.live import run

    at = tour("draw")
    at.number_input(key="tour.w.draw_sample").set_value(7).run()
    at.button(key="tour.draw.load").click().run()
    got = at.session_state[draw.RESULT]
    assert got["pred"] in range(10)
    direct = run(runner, data.images[7], Policy("max_prob", threshold=0.9))
    assert 0 <= got["exit"] < trace.num_exits and direct.exit.shape == (1,)


@needs_model
def test_quiz_scores_correctly(engine_side):
    trace, _, _ = engine_side
    exits = exit_index(trace, Policy("max_prob", threshold=0.9))
    names = list(trace.meta.exit_names)
    at = tour("guess")

    def current():
        row = at.session_state[QUIZ_SAMPLE]
        return at.radio(key=f"tour.w.quiz.{at.session_state['tour.quiz.q']}"), int(exits[row])

    assert at.metric[0].value == "0 / 0"
    at.session_state["tour.quiz.q"] = 0
    radio, truth = current()
    radio.set_value(names[truth]).run()
    assert at.metric[0].value == "1 / 1"
    assert "Right!" in texts(at)
    assert len(at.get("plotly_chart")) == 2  # the digit and, revealed, its exits
    # changing the answer after the reveal does not change the score
    radio, truth = current()
    radio.set_value(names[(truth + 1) % len(names)]).run()
    assert at.metric[0].value == "1 / 1"

    at.button(key="tour.quiz.next").click().run()
    radio, truth = current()
    assert radio.value is None
    radio.set_value(names[(truth + 1) % len(names)]).run()
    assert at.metric[0].value == "1 / 2"
    assert "Not quite" in texts(at)


@needs_model
def test_quiz_questions_mix_easy_and_hard(engine_side):
    from app.tour.quiz import question_sample

    trace, _, _ = engine_side
    exits = exit_index(trace, Policy("max_prob", threshold=0.9))
    asked = [int(exits[question_sample(exits, q)]) for q in range(8)]
    assert len(set(asked)) == len(np.unique(exits))  # every exit that occurs comes up


@needs_model
def test_overthinking_gallery_shows_only_overthinking_samples(engine_side):
    from app.tour.data import overthinking_rows

    trace, _, _ = engine_side
    rows = overthinking_rows(MODEL)
    c = trace.correct
    assert (~c[rows, -1]).all() and c[rows, :-1].any(axis=1).all()
    at = tour("overthinking")
    assert f"**{len(rows)} of the" in texts(at) or len(rows) == 0


@needs_model
def test_go_deeper_link_carries_model_and_threshold():
    at = tour("early-exit")
    at.slider(key="tour.w.t").set_value(0.95).run()
    links = at.get("page_link")
    if not (ROOT / "pages" / "tuning.py").exists():
        pytest.skip("the tuning page is not there yet")
    assert links, "no go-deeper link"
    proto = links[0].proto
    target = f"{proto.page} {getattr(proto, 'query_string', '')}"
    assert "tuning" in target and MODEL in target and "t=0.95" in target


@needs_model
def test_guess_and_overthinking_use_the_bundled_gallery_without_mnist(monkeypatch, engine_side):
    """Without the MNIST package the quiz and the gallery show bundled test images only."""
    from app.tour import data as tour_data
    from engine.data.gallery import gallery_file, load_gallery

    if not gallery_file("mnist").exists():
        pytest.skip("no bundled MNIST gallery")
    trace = engine_side[0]

    def unavailable():
        raise images.DatasetUnavailable("MNIST is not installed")

    monkeypatch.setitem(images._LOADERS, "mnist", unavailable)
    tour_data.test_set.clear()
    try:
        _, indices = load_gallery("mnist")
        at = tour("guess")
        assert not at.exception, at.exception
        assert int(trace.sample_id[at.session_state[QUIZ_SAMPLE]]) in set(indices.tolist())
        assert len(at.get("plotly_chart")) == 1  # the digit, from the gallery
        at = tour("overthinking")
        assert not at.exception, at.exception
        assert len(at.get("plotly_chart")) == 1
    finally:
        tour_data.test_set.clear()
