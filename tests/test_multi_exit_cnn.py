"""Multi-exit CNN and cascade: the model contract, training CLI, shipped weights and traces."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine import families, registry, trace_store
from engine.core.trace import read_parquet
from engine.data import gallery, images
from engine.families.cascade import model as cascade
from engine.families.multi_exit_cnn import model as multi_exit_cnn
from engine.families.multi_exit_cnn import train as trainer
from engine.run.exits import exit_costs
from engine.run.trace_build import build_trace

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {
    # model id -> (data set, minimum last-exit accuracy, minimum gap last - first exit)
    "digits_multi_exit_cnn": ("digits", 0.98, 0.05),
    "mnist_multi_exit_cnn": ("mnist", 0.99, 0.03),
    "mnist_multi_exit_cnn_jei": ("mnist", 0.99, 0.03),  # JEI-DNN heads and gates
    "fashion_multi_exit_cnn": ("fashion_mnist", 0.90, 0.05),
    "fashion_multi_exit_cnn_sd": ("fashion_mnist", 0.90, 0.05),  # self-distilled (FastBERT)
    "fashion_multi_exit_cnn_jei": ("fashion_mnist", 0.90, 0.05),  # JEI-DNN heads and gates
    "mnist_cascade": ("mnist", 0.99, 0.005),
}


def check_contract(model: nn.Module, num_classes: int = 10) -> list[torch.Tensor]:
    """stages/heads ModuleLists of equal length; chaining them reproduces forward()."""
    assert isinstance(model.stages, nn.ModuleList) and isinstance(model.heads, nn.ModuleList)
    assert len(model.stages) == len(model.heads) >= 2
    model.eval()
    x = images.to_model_input(np.random.default_rng(0).integers(0, 256, (3, 28, 28), np.uint8))
    with torch.no_grad():
        out = model(x)
        h, chained = x, []
        for stage, head in zip(model.stages, model.heads, strict=True):
            h = stage(h)
            chained.append(head(h))
    assert len(out) == len(model.heads)
    for z, zc in zip(out, chained, strict=True):
        assert z.shape == (3, num_classes)
        torch.testing.assert_close(z, zc)
    return out


def test_multi_exit_cnn_contract_and_shapes():
    model = multi_exit_cnn.build({"num_classes": 7})
    assert len(model.stages) >= 4
    check_contract(model, 7)
    # feature maps shrink stage by stage as the docstring says
    h, shapes = torch.zeros(2, 1, 28, 28), []
    for stage in model.stages:
        h = stage(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(16, 14, 14), (32, 7, 7), (64, 4, 4), (64, 4, 4)]
    costs = exit_costs(model)
    stage_f, head_f = costs.stage, costs.head
    assert all(f > 0 for f in stage_f) and all(
        0 < f < s / 50 for f, s in zip(head_f, stage_f, strict=True)
    )


def test_head_pool_variant_keeps_contract():
    check_contract(multi_exit_cnn.build({"head_pool": 2}))


def test_cascade_contract_identity_stages():
    model = cascade.build({})
    check_contract(model)
    x = torch.randn(2, 1, 28, 28)
    for stage in model.stages:
        assert torch.equal(stage(x), x)
    costs = exit_costs(model)
    stage_f, head_f = costs.stage.tolist(), costs.head
    assert stage_f == [0, 0] and head_f[0] * 20 < head_f[1]  # small is much cheaper than large


def test_loss_weights_and_distillation():
    torch.manual_seed(0)
    logits = [torch.randn(8, 10) for _ in range(3)]
    y = torch.randint(0, 10, (8,))
    ce = [nn.functional.cross_entropy(z, y) for z in logits]
    torch.testing.assert_close(trainer.multi_exit_loss(logits, y, [0, 0, 1]), ce[2])
    torch.testing.assert_close(
        trainer.multi_exit_loss(logits, y, [1, 1, 2]), (ce[0] + ce[1] + 2 * ce[2]) / 4
    )
    # distilling an exit towards itself adds nothing: KL(p || p) = 0
    same = [logits[2].clone(), logits[2]]
    got = trainer.multi_exit_loss(same, y, [1, 0], distill_alpha=1.0, temperature=2.0)
    assert abs(float(got)) < 1e-5


def test_heads_only_freezes_backbone_and_last_exit():
    model = multi_exit_cnn.build({})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images.to_model_input(images.load("digits", "train").images[:64])
    y = torch.as_tensor(images.load("digits", "train").labels[:64])
    args = Namespace(
        mode="heads_only",
        epochs=0,
        head_epochs=1,
        seed=0,
        batch_size=32,
        lr=1e-2,
        weight_decay=0.0,
        temperature=2.0,
        quiet=True,
    )
    trainer.fit(model, x, y, args, [1.0] * 4, alpha=0.5)
    after = model.state_dict()
    for name, v in after.items():
        frozen = name.startswith("stages.") or name.startswith("heads.3.")
        assert torch.equal(v, before[name]) == frozen, name  # BN statistics included
    assert all(p.requires_grad for p in model.parameters())


def _train(tmp_path: Path, family: str, extra: list[str]) -> dict:
    from engine.train import main

    argv = [
        family,
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--max-train",
        "256",
        "--quiet",
        "--out-dir",
        str(tmp_path),
        "--model-id",
        f"tiny_{family}",
        *extra,
    ]
    main(argv)
    card = json.loads((tmp_path / f"tiny_{family}.json").read_text())
    assert card["training_command"].startswith(f"python -m engine.train {family} --dataset digits")
    assert card["weights_sha256"] == registry.sha256_file(tmp_path / f"tiny_{family}.safetensors")
    model = families.load_model(f"tiny_{family}", models_dir=tmp_path)
    check_contract(model)
    m = card["metrics"]
    k = len(model.heads)
    assert len(m["test_accuracy"]) == len(m["flops_cumulative"]) == len(card["exit_names"]) == k
    assert np.all(np.diff(m["flops_cumulative"]) > 0)
    return card


def test_training_cli_writes_loadable_card(tmp_path):
    card = _train(tmp_path, "multi_exit_cnn", ["--exit-weights", "1,1,1,2", "--distill"])
    assert card["training"]["distill"] and card["training"]["exit_weights"] == [1, 1, 1, 2]
    assert card["metrics"]["test_samples"] == 450 and card["train_seconds"] > 0
    # a changed weights file is refused
    w = tmp_path / "tiny_multi_exit_cnn.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\0")
    with pytest.raises(registry.RegistryError, match="SHA-256"):
        families.load_model("tiny_multi_exit_cnn", models_dir=tmp_path)


def test_cascade_training_cli(tmp_path):
    card = _train(tmp_path, "cascade", ["--mode", "heads_only", "--distill"])
    assert card["family"] == "cascade" and card["exit_names"] == ["small CNN", "large CNN"]


@pytest.mark.parametrize("model_id", sorted(SHIPPED))
def test_shipped_model_matches_card(model_id):
    dataset, min_last, min_gap = SHIPPED[model_id]
    card = registry.get_card(model_id)
    acc = card.raw["metrics"]["test_accuracy"]
    assert card.dataset == dataset and card.raw["train_seconds"] < 600
    assert acc[-1] >= min_last and acc[-1] - acc[0] >= min_gap
    assert len(card.raw["class_names"]) == 10 and len(card.raw["exit_names"]) == len(acc)
    model = families.load_model(model_id)  # checks the SHA-256
    test = gallery.test_images(dataset) if dataset != "digits" else None
    if test is None or test.is_full:
        data = images.load(dataset, "test")
        got = trainer.exit_accuracy(
            model, images.to_model_input(data.images), torch.as_tensor(data.labels)
        )
        assert abs(got[-1] - acc[-1]) <= 0.005
        np.testing.assert_allclose(got, acc, atol=0.005)
    else:  # only the bundled gallery: a sanity check
        got = trainer.exit_accuracy(
            model, images.to_model_input(test.data.images), torch.as_tensor(test.data.labels)
        )
        assert got[-1] >= acc[-1] - 0.05


@pytest.mark.parametrize("model_id", sorted(SHIPPED))
def test_bundled_trace_agrees_with_card(model_id):
    path = trace_store.trace_file(model_id, "test")
    assert path.exists() and path.stat().st_size < 3_000_000
    card = registry.get_card(model_id).raw
    t = trace_store.load_trace(model_id, "test", build_if_missing=False)
    assert t.meta.exit_names == tuple(card["exit_names"])
    assert t.meta.class_names == tuple(card["class_names"])
    assert t.num_samples == card["metrics"]["test_samples"]
    np.testing.assert_allclose(t.correct.mean(axis=0), card["metrics"]["test_accuracy"], atol=1e-4)
    np.testing.assert_allclose(t.exit_cost, card["metrics"]["flops_cumulative"])
    assert t.latency_ms is not None and (t.latency_ms[:, -1] > 0).all()
    np.testing.assert_array_equal(t.sample_id, np.arange(t.num_samples))


@pytest.mark.parametrize("dataset", gallery.GALLERY_DATASETS)
def test_gallery_lines_up_with_test_split_and_trace(dataset):
    data, idx = gallery.load_gallery(dataset)
    assert len(data) == 200 and data.images.dtype == np.uint8 and data.images.shape[1:] == (28, 28)
    assert np.bincount(data.labels, minlength=10).tolist() == [20] * 10
    if images.available(dataset):
        full = images.load(dataset, "test")
        np.testing.assert_array_equal(full.images[idx], data.images)
        np.testing.assert_array_equal(full.labels[idx], data.labels)
    # the bundled trace's rows at the gallery indices are the model's outputs on those images
    model_id = {"mnist": "mnist_multi_exit_cnn", "fashion_mnist": "fashion_multi_exit_cnn"}[dataset]
    bundled = trace_store.load_trace(model_id, "test", build_if_missing=False).subset(idx)
    fresh = build_trace(families.load_model(model_id), data, "test", model_id, sample_ids=idx)
    np.testing.assert_array_equal(fresh.sample_id, bundled.sample_id)
    np.testing.assert_allclose(fresh.probs, bundled.probs, atol=1e-4)


def test_test_images_falls_back_to_gallery(monkeypatch):
    def absent(name, split="test"):
        raise images.DatasetUnavailable("not installed")

    monkeypatch.setattr(images, "load", absent)
    got = gallery.test_images("fashion_mnist")
    assert got.source == "gallery" and not got.is_full and len(got.data) == 200
    assert images.INSTALL_HINT["fashion_mnist"] in got.note


def test_trace_build_cli_on_digits(tmp_path):
    out = tmp_path / "digits.parquet"
    cmd = [
        sys.executable,
        "-m",
        "engine.build",
        "digits_multi_exit_cnn",
        "--dataset",
        "digits",
        "--split",
        "test",
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    t = read_parquet(out)
    card = registry.get_card("digits_multi_exit_cnn").raw
    assert t.meta.model_id == "digits_multi_exit_cnn" and t.meta.dataset == "digits"
    assert t.probs.shape == (450, 4, 10)
    np.testing.assert_allclose(t.correct.mean(axis=0), card["metrics"]["test_accuracy"], atol=1e-4)
    bad = subprocess.run(
        [*cmd[:3], "no_such_model", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no model '" in bad.stderr
