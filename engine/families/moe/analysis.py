"""Routing records, routing statistics and the routing sweep for the MoE models.

``run`` executes a MoE model (sparsely, FLOPs counted per sample) and returns a
``RoutingRecord``: per sample, layer, token and expert, the router score and whether the expert
ran, plus dropped tokens and FLOPs. ``stats`` reduces a record to the data-set views (expert load
per layer, per-class usage, experts-per-token histogram, accuracy and mean FLOPs); ``sweep``
does that for a list of routing settings (a tau grid, or top-k x capacity) with a progress
callback, and ``save_sweep`` / ``load_sweep`` keep the result as small JSON so the app can ship
it in ``assets/traces/`` and answer a slider instantly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.progress import Progress, track
from engine.core.stats import seeded_subset
from engine.data import images as image_data
from engine.families.moe.model import FlopMeter, MoEViT, Routing
from engine.paths import GALLERY_DIR, RECORDS_DIR, TRACES_DIR

TAU_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CAPACITY_GRID = (1.0, 1.25, 2.0, None)
SWEEP_SAMPLES = 2000  # test images used by the sweep (a seeded subset)
GALLERY_FILE = GALLERY_DIR / "moe_examples.npz"


@dataclass
class RoutingRecord:
    """Everything one routing run measured, as numpy (N samples, L layers, T tokens, E experts)."""

    routing: Routing
    probs: np.ndarray  # [N, C] class probabilities
    scores: np.ndarray  # [N, L, T, E] router probability / predicted norm over the max
    chosen: np.ndarray  # [N, L, T, E] bool: the expert ran on the token
    dropped: np.ndarray  # [N, L, T] int: router choices dropped by expert capacity
    flops: np.ndarray  # [N] FLOPs counted for the sample, as executed

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def experts_per_token(self) -> np.ndarray:
        """[N, L, T] how many experts ran on each token."""
        return self.chosen.sum(-1)

    def __len__(self) -> int:
        return len(self.probs)


def routing_setting(
    k: int | None = None, capacity_factor: float | None = None, tau: float | None = None
) -> Routing:
    """The routing the page's controls describe: dynamic-k at ``tau`` (norm router), or top-``k``
    with a per-image ``capacity_factor`` (None: no limit) for the softmax router."""
    return Routing(k=k, capacity_factor=capacity_factor, tau=tau)


def settings_for(model: MoEViT) -> list[Routing]:
    """The sweep grid of a model: tau for the norm router, k x capacity for the softmax one."""
    if model.config.router == "norm":
        return [Routing(tau=t) for t in TAU_GRID]
    return [Routing(k=k, capacity_factor=c) for k in (1, 2) for c in CAPACITY_GRID]


@torch.no_grad()
def run(model: MoEViT, imgs: np.ndarray, routing: Routing, batch_size: int = 500) -> RoutingRecord:
    """Run ``model`` sparsely on uint8 images [N, 28, 28] and record its routing and FLOPs."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in RoutingRecord.__dataclass_fields__}
    for i in range(0, len(imgs), batch_size):
        x = image_data.to_model_input(imgs[i : i + batch_size])
        meter = FlopMeter(len(x))
        out = model(x, routing, meter=meter)
        parts["probs"].append(torch.softmax(out.logits, -1).numpy())
        parts["scores"].append(torch.stack([r.scores for r in out.layers], 1).half().numpy())
        parts["chosen"].append(torch.stack([r.chosen for r in out.layers], 1).numpy())
        parts["dropped"].append(torch.stack([r.dropped for r in out.layers], 1).numpy())
        parts["flops"].append(meter.flops.numpy())
    cat = {k: np.concatenate(v) for k, v in parts.items() if v}
    return RoutingRecord(routing=routing, **cat)


def dense_flops(model: MoEViT) -> float:
    """FLOPs per sample of the dense-equivalent model (all experts as one MLP, no router)."""
    meter = FlopMeter(1)
    with torch.no_grad():
        model.forward_dense(torch.zeros(1, 1, image_data.SIZE, image_data.SIZE), meter)
    return float(meter.flops[0])


def stats(record: RoutingRecord, labels: np.ndarray | None, num_classes: int) -> dict:
    """The data-set views of one routing run, as plain JSON-able numbers.

    load[l][e]: number of tokens expert e processed in layer l (sums over e to the number of
    token-expert assignments, i.e. tokens x experts-per-token); usage[c][e]: the fraction of
    class c's token-expert assignments (all layers) that went to expert e; hist[j]: fraction of
    (token, layer) pairs that ran j + 1 experts.
    """
    n, layers, tokens, experts = record.chosen.shape
    ept = record.experts_per_token
    load = record.chosen.sum((0, 2))  # [L, E]
    hist = np.bincount(ept.ravel(), minlength=experts + 1)[1:] / ept.size
    out = {
        "setting": record.routing.label(),
        "k": record.routing.k,
        "capacity_factor": record.routing.capacity_factor,
        "tau": record.routing.tau,
        "samples": int(n),
        "tokens_per_sample": int(tokens),
        "flops_mean": float(record.flops.mean()),
        "experts_per_token_mean": float(ept.mean()),
        "experts_per_token_hist": hist.round(6).tolist(),
        "dropped_fraction": (record.dropped > 0).mean((0, 2)).round(6).tolist(),  # [L]
        "load": load.astype(int).tolist(),
        "accuracy": None,
        "usage": None,
    }
    if labels is not None and len(labels) == n:
        out["accuracy"] = float((record.pred == labels).mean())
        per_sample = record.chosen.sum((1, 2))  # [N, E]
        usage = np.zeros((num_classes, experts))
        np.add.at(usage, labels, per_sample)
        usage /= np.maximum(usage.sum(1, keepdims=True), 1)
        out["usage"] = usage.round(6).tolist()
    return out


def sweep(
    model: MoEViT,
    imgs: np.ndarray,
    labels: np.ndarray | None,
    settings: Sequence[Routing] | None = None,
    progress: Progress | None = None,
    batch_size: int = 500,
) -> list[dict]:
    """``stats`` for each routing setting (re-running the model each time), reporting to
    ``progress`` after every setting."""
    settings = list(settings or settings_for(model))
    out = []
    for routing in track(settings, "routing sweep", progress):
        rec = run(model, imgs, routing, batch_size)
        out.append(stats(rec, labels, model.config.num_classes))
    return out


def compute_score(model: MoEViT, imgs: np.ndarray, tau: float) -> np.ndarray:
    """Per-sample dynamic-k compute score: mean experts per token (over layers) at ``tau``.

    Higher means the router judged more experts worth running: an input-difficulty score to
    compare with other dynamic methods' (exit index, layers executed).
    """
    rec = run(model, imgs, Routing(tau=tau))
    return rec.experts_per_token.mean((1, 2))


def compare_file(model_id: str) -> Path:
    """Per-sample FLOPs and correctness at every tau (the compare page's dynamic-k results)."""
    return RECORDS_DIR / f"{model_id}__compare__test.parquet"


def sweep_file(model_id: str) -> Path:
    return TRACES_DIR / f"{model_id}__routing_sweep.json"


def save_sweep(path: Path, model_id: str, points: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model_id": model_id, **meta, "points": points}, indent=1) + "\n")


def load_sweep(path: Path) -> dict | None:
    """The saved sweep, or None when there is none."""
    if not path.exists():
        return None
    return json.loads(path.read_text())


def sweep_subset(n_total: int, n: int = SWEEP_SAMPLES, seed: int = 0) -> np.ndarray:
    """Sorted indices of the seeded test subset used by sweeps."""
    return seeded_subset(n_total, n, seed)


def gallery(dataset: str) -> tuple[image_data.ImageSet, str]:
    """Test images to pick from: the data set's test split, else the bundled examples.

    Returns (images, where-from text).
    """
    try:
        return image_data.load(dataset, "test"), f"{dataset} test split"
    except image_data.DatasetUnavailable:
        pass
    if GALLERY_FILE.exists():
        with np.load(GALLERY_FILE, allow_pickle=False) as z:
            if f"{dataset}_x" in z:
                imgs, labels = z[f"{dataset}_x"], z[f"{dataset}_y"]
                names = image_data.CLASS_NAMES[dataset]
                return image_data.ImageSet(dataset, "test", imgs, labels, names), (
                    f"{len(labels)} bundled {dataset} test examples (data set not installed)"
                )
    raise image_data.DatasetUnavailable(
        f"{dataset} is not installed and no bundled examples: {image_data.INSTALL_HINT[dataset]}"
    )
