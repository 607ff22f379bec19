"""A small bundled gallery of test images per data set, so the app works without the data sets.

``assets/gallery/<dataset>.npz`` holds ~200 test-split images (20 per class, chosen with a fixed
seed), their labels and their indices in the official test split, so a gallery image lines up
with the same sample in the bundled test-split traces (``sample_id`` = test index).

``test_images(dataset)`` is what pages call: the full test split when the data set is installed,
else the gallery, with a flag saying which and a note with the one command that adds the set.

Rebuild the galleries (needs the data sets)::

    python -m engine.data.gallery mnist fashion_mnist
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data import images

GALLERY_DIR = Path(__file__).resolve().parents[2] / "assets" / "gallery"
GALLERY_DATASETS = ("mnist", "fashion_mnist")
PER_CLASS = 20
SEED = 0


@dataclass(frozen=True)
class TestImages:
    data: images.ImageSet  # images uint8 [N, 28, 28], labels [N], class_names
    indices: np.ndarray  # [N] int64, index of each image in the official test split
    source: str  # "full" (the installed data set) or "gallery" (bundled subset)
    note: str  # empty when full; else what is missing and the command that adds it

    @property
    def is_full(self) -> bool:
        return self.source == "full"


def gallery_file(dataset: str) -> Path:
    return GALLERY_DIR / f"{dataset}.npz"


def missing_note(dataset: str) -> str:
    hint = images.INSTALL_HINT.get(dataset, "")
    return (
        f"The {dataset} data set is not installed; showing the bundled gallery of "
        f"{PER_CLASS} test images per class instead. Add the full set with: {hint}"
    )


def load_gallery(dataset: str) -> tuple[images.ImageSet, np.ndarray]:
    """(ImageSet of the bundled gallery, test-split indices). Raises FileNotFoundError."""
    path = gallery_file(dataset)
    if not path.exists():
        raise FileNotFoundError(f"no bundled gallery for {dataset!r} ({path.name})")
    with np.load(path, allow_pickle=False) as z:
        imgs = z["images"].astype(np.uint8)
        labels = z["labels"].astype(np.int64)
        idx = z["indices"].astype(np.int64)
    names = images.CLASS_NAMES[dataset]
    return images.ImageSet(dataset, "test", imgs, labels, names), idx


def test_images(dataset: str) -> TestImages:
    """The full test split when installed, else the bundled gallery (``source`` says which)."""
    try:
        data = images.load(dataset, "test")
        return TestImages(data, np.arange(len(data), dtype=np.int64), "full", "")
    except images.DatasetUnavailable:
        data, idx = load_gallery(dataset)
        return TestImages(data, idx, "gallery", missing_note(dataset))


def build_gallery(dataset: str, per_class: int = PER_CLASS, seed: int = SEED) -> Path:
    """Pick ``per_class`` test images per class (seeded), write assets/gallery/<dataset>.npz."""
    data = images.load(dataset, "test")
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(data.labels == c), per_class, replace=False)
        for c in range(len(data.class_names))
    ]
    idx = np.sort(np.concatenate(picks)).astype(np.int64)
    path = gallery_file(dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, images=data.images[idx], labels=data.labels[idx].astype(np.int64), indices=idx
    )
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or GALLERY_DATASETS:
        print(build_gallery(name))
