"""What the slimmable CNN measures: every (width, exit)'s outputs and FLOPs, the width × depth
trace, and a count of what really ran (forward hooks), for the card, the tests and the bench.

Two traces, both ordinary ``Trace`` files, so the tuning page, the solvers and the compare page
read them unchanged:

* the *width cascade* (``<model>__test.parquet``, built by ``engine.run.trace_build`` from the
  multi-exit contract): exits = widths, narrowest first, each width run to its last exit; the
  cumulative cost is every width actually run. This is the per-input width policy.
* *width × depth* (``<model>__width_depth.parquet``, the tuning page's ``@width_depth``
  source): exits = (width, stage) pairs, width-major (all exits of width 0.25, then of 0.5...).
  An input walks the narrow network's exits first and restarts one width up only when the
  narrow network's last exit is unsure; the cost of (w, s) is every width below w run to the
  end, exit heads included, plus width w up to exit s. Width-major keeps the cost honest (a
  wider network cannot reuse a narrower one's activations: the batch norms differ) and keeps
  the cascade's exits as a subset (each width's last exit). ``run_width_depth`` runs it for
  real, with true termination, through the same ``stop_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.core.costs import count_flops
from engine.core.policies import Policy, stop_mask
from engine.core.trace import Trace, TraceMeta
from engine.data import images
from engine.families.slimmable_cnn.model import (
    INPUT_SIZE,
    SlimConv2d,
    SlimLinear,
    SlimmableCNN,
    SwitchableBatchNorm2d,
    grid_names,
)
from engine.paths import TRACES_DIR
from engine.run.runtime import softmax32

WIDTH_DEPTH = "width_depth"  # the split name of the width × depth trace


def width_depth_file(model_id: str):
    return TRACES_DIR / f"{model_id}__{WIDTH_DEPTH}.parquet"


@dataclass(frozen=True)
class GridCosts:
    """FLOPs per sample of each (width, stage) and (width, exit head), counted by torch."""

    stage: np.ndarray  # [W, S]
    head: np.ndarray  # [W, S]

    @property
    def cumulative(self) -> np.ndarray:
        """[W, S] FLOPs of reaching exit s at width w, every exit head on the way included."""
        return np.cumsum(self.stage + self.head, axis=1)

    @property
    def last_exit(self) -> np.ndarray:
        """[W] FLOPs of one width run straight to its last exit (the width cascade's step)."""
        return self.stage.sum(axis=1) + self.head[:, -1]

    @property
    def width_major(self) -> np.ndarray:
        """[W * S] cumulative FLOPs of the width × depth trace's exits, width-major."""
        before = np.concatenate([[0.0], np.cumsum(self.cumulative[:, -1])[:-1]])
        return (before[:, None] + self.cumulative).reshape(-1)


@torch.no_grad()
def grid_costs(model: SlimmableCNN) -> GridCosts:
    stage = np.zeros((model.num_widths, model.num_stages))
    head = np.zeros_like(stage)
    for w in range(model.num_widths):
        h = torch.zeros(1, 1, INPUT_SIZE, INPUT_SIZE)
        for s, (block, exit_head) in enumerate(zip(model.blocks, model.exit_heads, strict=True)):
            stage[w, s], h = count_flops(block, h, w)
            head[w, s] = count_flops(exit_head, h)[0]
    return GridCosts(stage, head)


@torch.no_grad()
def grid_probs(model: SlimmableCNN, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """[N, W, S, C] float32 softmax of every (width, exit)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        g = model.grid(x[i : i + batch_size])
        out.append(torch.stack([torch.stack(row, 1) for row in g], 1).softmax(-1).float())
    return torch.cat(out).numpy()


def grid_accuracy(model: SlimmableCNN, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """[W, S] test accuracy of every (width, exit)."""
    pred = grid_probs(model, x).argmax(-1)
    return (pred == y.numpy()[:, None, None]).mean(axis=0)


def width_depth_trace(model: SlimmableCNN, model_id: str, dataset: str, split: str = "test"):
    """The width × depth trace (width-major exits) of ``model`` on a data split."""
    data = images.load(dataset, split)
    probs = grid_probs(model, images.to_model_input(data.images))
    n, w, s, c = probs.shape
    costs = grid_costs(model)
    meta = TraceMeta(
        model_id=model_id,
        exit_names=tuple(grid_names(model.config)),
        class_names=tuple(data.class_names),
        dataset=data.name,
        split=WIDTH_DEPTH,
        extra={
            "family": "slimmable_cnn",
            "order": "width-major: every exit of a width, then the next width from the input",
            "flops_stage": costs.stage.tolist(),
            "flops_head": costs.head.tolist(),
            "source_split": split,
        },
    )
    return Trace(
        meta=meta,
        sample_id=np.arange(n, dtype=np.int64),
        label=np.asarray(data.labels, dtype=np.int64),
        probs=probs.reshape(n, w * s, c),
        cost=np.broadcast_to(costs.width_major, (n, w * s)).copy(),
    )


@dataclass(frozen=True)
class WidthDepthRun:
    """A real width × depth run: per sample the width-major exit taken, its prediction and the
    FLOPs its trace charges for that exit."""

    exit: np.ndarray  # [N] int64, index into grid_names
    pred: np.ndarray  # [N] int64
    flops: np.ndarray  # [N] float64


@torch.no_grad()
def run_width_depth(
    model: SlimmableCNN, x: torch.Tensor, policy: Policy, costs: GridCosts | None = None
) -> WidthDepthRun:
    """Walk the width × depth exits for real, width-major, with true termination: a sample
    stops at the first exit ``stop_mask`` allows; one that passes a width's last exit starts
    again from the image at the next width; the rest of the network is never run for it.
    ``costs`` (default: counted here, which runs the network once on one zero image)."""
    model.eval()
    n, w_count, s_count = len(x), model.num_widths, model.num_stages
    k_count = w_count * s_count
    seen: np.ndarray | None = None  # [N, K, C] outputs so far (zeros where not computed)
    exits = np.full(n, k_count - 1, dtype=np.int64)
    going = np.arange(n)  # samples that have not stopped
    for w in range(w_count):
        idx, h = going, x[going]
        for s, (block, head) in enumerate(zip(model.blocks, model.exit_heads, strict=True)):
            if idx.size == 0:
                break
            h = block(h, w)
            p = softmax32(head(h))
            if seen is None:
                seen = np.zeros((n, k_count, p.shape[1]), dtype=np.float32)
            k = w * s_count + s
            seen[idx, k] = p
            stop = stop_mask(policy, seen[idx])[:, k] | (k == k_count - 1)
            exits[idx[stop]] = k
            idx, h = idx[~stop], h[torch.as_tensor(~stop)]
        going = idx  # still unsure after this width's last exit
    assert seen is not None
    return WidthDepthRun(
        exit=exits,
        pred=seen[np.arange(n), exits].argmax(-1),
        flops=(costs or grid_costs(model)).width_major[exits],
    )


class RanCounter:
    """Forward hooks on every slimmable layer: what really ran, call by call.

    ``calls`` lists (layer name, rows, input channels, output channels) per call, read off
    the tensors that went in and came out, never from the cost formula. ``rows(layer, c)``
    sums the rows of one layer's calls (at output width ``c`` if given)."""

    def __init__(self, model: SlimmableCNN):
        self.calls: list[tuple[str, int, int, int]] = []
        self._handles = []
        for name, m in model.named_modules():
            if isinstance(m, SlimConv2d | SlimLinear | SwitchableBatchNorm2d | nn.BatchNorm2d):
                self._handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, out):
            x = args[0]
            self.calls.append((name, int(x.shape[0]), int(x.shape[1]), int(out.shape[1])))

        return hook

    def rows(self, layer: str, c_out: int | None = None) -> int:
        return sum(r for n, r, _, c in self.calls if n == layer and c_out in (None, c))

    def widths_run(self, layer: str) -> dict[int, int]:
        """{output channels: rows} of one layer's calls."""
        out: dict[int, int] = {}
        for n, r, _, c in self.calls:
            if n == layer:
                out[c] = out.get(c, 0) + r
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def main(argv: list[str] | None = None) -> None:
    """``python -m engine.families.slimmable_cnn.records [MODEL_ID]``: write the bundled width
    cascade and width × depth traces of a trained model."""
    import sys

    from engine import families
    from engine.registry import get_card
    from engine.trace_store import trace_file

    argv = sys.argv[1:] if argv is None else argv
    card = get_card(argv[0] if argv else "fashion_slimmable_cnn")
    fam = families.get(card.family)
    for split, path in (
        ("test", trace_file(card.model_id)),
        (WIDTH_DEPTH, width_depth_file(card.model_id)),
    ):
        trace = fam.trace(card, split)
        trace.write_parquet(path)
        acc = np.round(trace.correct.mean(0), 4).tolist()
        print(f"wrote {path} ({trace.num_exits} exits, accuracy {acc})", flush=True)


if __name__ == "__main__":
    main()
