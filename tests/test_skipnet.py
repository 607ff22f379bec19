"""The gated skip network: gate math, real skipping, FLOPs, trainer, shipped weights."""

import json

import numpy as np
import pytest
import torch

from engine.families import load_model
from engine.families.skipnet import model as skipnet
from engine.families.skipnet import records as skipping
from engine.paths import MODELS_DIR


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = skipnet.build({})
    # spread the gates so that a middle threshold really skips some blocks for some inputs
    for g in m.gates:
        torch.nn.init.normal_(g.fc2.weight, std=2.0)
        torch.nn.init.constant_(g.fc2.bias, 0.0)
    return m.eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_skipped_block_output_equals_its_input(model, x):
    h = model.entries[0](x)
    for b in range(model.num_blocks):
        model.branches[b].eval()
    # the block applied with gate 0 is the identity, with gate 1 it is h + F(h)
    with torch.no_grad():
        delta = model.branches[0](h)
        skipped = h + 0.0 * delta
    assert torch.equal(skipped, h)
    # and in the real run: skipping every block leaves only the entries (stem, transition)
    rec = skipnet.run_skipnet(model, x, execute=np.zeros((len(x), model.num_blocks), bool))
    with torch.no_grad():
        hh = x
        for entry in model.entries:
            hh = entry(hh)
        expected = torch.softmax(model.heads[-1](hh), 1).numpy()
    np.testing.assert_allclose(rec["probs"], expected, atol=1e-6)


def test_real_skipping_matches_the_dense_gated_forward(model, x):
    """run_skipnet (gathers the running subset) == forward() (computes all, multiplies by 0/1)."""
    with torch.no_grad():
        logits, probs, applied = model(x)  # eval mode: hard decision prob >= 0.5
    rec = skipnet.run_skipnet(model, x, threshold=0.5, batch_size=7)
    np.testing.assert_array_equal(rec["executed"], applied.numpy().astype(bool))
    np.testing.assert_allclose(rec["gate"], probs.numpy(), atol=1e-6)
    np.testing.assert_allclose(rec["probs"], torch.softmax(logits[-1], 1).numpy(), atol=1e-5)
    assert 0 < rec["executed"].mean() < 1  # the fixture really mixes ran and skipped


def _rows_into_blocks(model, fn):
    """Run fn() with a hook on every block's branch: (rows each block processed, gate scores
    of the rows it processed, recomputed from the block's own input)."""
    rows = [0] * model.num_blocks
    gates = [[] for _ in range(model.num_blocks)]

    def hook(b):
        def see(module, args):
            (h,) = args
            rows[b] += h.shape[0]
            gates[b].append(torch.sigmoid(model.gates[b](h)))

        return see

    handles = [br.register_forward_pre_hook(hook(b)) for b, br in enumerate(model.branches)]
    try:
        rec = fn()
    finally:
        for h in handles:
            h.remove()
    return rec, rows, [torch.cat(g) if g else torch.zeros(0) for g in gates]


def test_a_skipped_block_does_not_process_the_sample(model, x):
    """Each block sees only the rows whose gate says execute (not the batch, masked after)."""
    for thr in (0.3, 0.7):
        rec, rows, gates = _rows_into_blocks(
            model, lambda thr=thr: skipnet.run_skipnet(model, x, threshold=thr, batch_size=7)
        )
        assert rows == rec["executed"].sum(0).tolist(), thr
        for b in range(model.num_blocks):
            assert (gates[b] >= thr - 1e-6).all(), (thr, b)  # only rows whose gate said run
    assert sum(rows) < len(x) * model.num_blocks  # the fixture really skips something
    mask = np.zeros((len(x), model.num_blocks), bool)
    mask[::3, 2] = True
    mask[:, 4] = True
    _, rows, _ = _rows_into_blocks(model, lambda: skipnet.run_skipnet(model, x, execute=mask))
    assert rows == mask.sum(0).tolist()


def test_flops_count_only_what_ran(model, x):
    n, nb = len(x), model.num_blocks
    all_on = skipnet.run_skipnet(model, x, execute=np.ones((n, nb), bool))
    none = skipnet.run_skipnet(model, x, execute=np.zeros((n, nb), bool))
    one = np.zeros((n, nb), bool)
    one[::2, 3] = True
    part = skipnet.run_skipnet(model, x, execute=one)
    branch = all_on["flops"][0] - none["flops"][0]
    assert branch > 0
    per_block = part["flops"][0] - none["flops"][0]
    assert per_block > 0
    np.testing.assert_allclose(part["flops"][1], none["flops"][1])  # odd samples skipped it
    assert all_on["flops"][0] == pytest.approx(skipnet.full_flops(model))
    # gates cost something but little next to a block
    gated = skipnet.run_skipnet(model, x, threshold=0.0)
    extra = gated["flops"][0] - all_on["flops"][0]
    assert 0 < extra < 0.01 * per_block


def test_higher_threshold_skips_more(model, x):
    lo = skipnet.run_skipnet(model, x, threshold=0.2)
    hi = skipnet.run_skipnet(model, x, threshold=0.8)
    # block 0's gate sees the same features at every threshold, so its runs are nested
    assert (hi["executed"][:, 0] <= lo["executed"][:, 0]).all()
    assert hi["executed"].sum() <= lo["executed"].sum()
    assert skipnet.run_skipnet(model, x, threshold=0.0)["executed"].all()
    assert hi["flops"].mean() <= lo["flops"].mean()


def test_batch_composition_does_not_change_a_sample(model, x):
    whole = skipnet.run_skipnet(model, x, threshold=0.5)
    alone = skipnet.run_skipnet(model, x[5:6], threshold=0.5)
    np.testing.assert_array_equal(whole["executed"][5], alone["executed"][0])
    np.testing.assert_allclose(whole["probs"][5], alone["probs"][0], atol=1e-5)
    assert whole["flops"][5] == pytest.approx(alone["flops"][0])


def test_training_free_variants(model, x):
    fixed = skipnet.skip_fixed(model, x, [1, 4])
    assert not fixed["executed"][:, [1, 4]].any() and fixed["executed"][:, [0, 2, 3, 5]].all()
    low = skipnet.skip_lowest(model, x, 2)
    assert (low["executed"].sum(1) == model.num_blocks - 2).all()
    assert fixed["flops"][0] == pytest.approx(low["flops"][0])  # same number of blocks run


def test_quick_training_writes_loadable_card_and_records(tmp_path):
    from engine.families.skipnet import train as trainer

    card = trainer.main(
        [
            "--dataset", "digits", "--max-train", "128", "--max-test", "32",
            "--warmup-epochs", "1", "--epochs", "1", "--max-steps-train", "2",
            "--out-dir", str(tmp_path / "models"), "--traces-dir", str(tmp_path / "traces"),
            "--model-id", "tiny_skipnet", "--quiet",
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "models" / "tiny_skipnet.json").read_text())
    assert saved["weights_sha256"] == card["weights_sha256"] if "weights_sha256" in card else True
    m = load_model("tiny_skipnet", models_dir=tmp_path / "models")
    assert isinstance(m, skipnet.SkipNet)
    rec = skipping.load_records("tiny_skipnet", root=tmp_path / "traces" / "records")
    assert rec.pred.shape == (len(skipping.THRESHOLDS), 32)
    t = rec.index_of(0.5)
    assert rec.correct[t].mean() == pytest.approx(saved["metrics"]["accuracy_at_default"], abs=1e-5)
    # records at threshold 0 ran everything; threshold 1 skips (almost) everything
    assert rec.executed[0].all()
    sw = skipping.gate_sweep(rec)
    assert sw.mean_flops[0] >= sw.mean_flops[-1]
    var = skipping.load_variants("tiny_skipnet", root=tmp_path / "traces" / "records")
    assert set(var["method"].to_list()) == {"fixed", "lowest"}
    from engine.core.trace import read_parquet

    trace = read_parquet(tmp_path / "traces" / "tiny_skipnet__test.parquet")
    assert trace.num_exits == 6 and trace.num_samples == 32


def test_per_class_skip_rates_average_to_the_overall_rate():
    rng = np.random.default_rng(0)
    t, n, b = 3, 50, 4
    label = rng.integers(0, 3, n)
    executed = rng.random((t, n, b)) < 0.6
    rec = skipping.SkipRecords(
        "x", np.array([0.0, 0.5, 1.0]), np.arange(n), label, np.zeros((t, n), int),
        np.ones((t, n)), np.ones((t, n)), executed, np.zeros((t, n, b), np.float32),
        {"class_names": ["a", "b", "c"]},
    )  # fmt: skip
    per_class = skipping.skip_rate_per_class(rec, 1)
    counts = np.bincount(label, minlength=3)
    overall = (per_class * counts[:, None]).sum(0) / n
    np.testing.assert_allclose(overall, (~executed[1]).mean(0))
    sw = skipping.gate_sweep(rec)
    np.testing.assert_allclose(sw.skip_rate_block[1], (~executed[1]).mean(0))


SHIPPED = MODELS_DIR / "mnist_skipnet.json"


@pytest.mark.skipif(not SHIPPED.exists(), reason="mnist_skipnet not bundled yet")
def test_shipped_weights_load_and_reach_the_cards_accuracy():
    from engine.data import images

    card = json.loads(SHIPPED.read_text())
    m = load_model("mnist_skipnet")  # checks the SHA-256
    rec = skipping.load_records("mnist_skipnet")
    t = rec.index_of(0.5)
    assert rec.correct[t].mean() == pytest.approx(card["metrics"]["accuracy_at_default"], abs=1e-5)
    if not images.available("mnist"):
        pytest.skip("MNIST not installed")
    data = images.load("mnist", "test")
    idx = rec.sample_id[:2000]
    out = skipnet.run_skipnet(m, images.to_model_input(data.images[idx]), threshold=0.5)
    # the live run reproduces the bundled records exactly
    np.testing.assert_array_equal(out["executed"], rec.executed[t, :2000])
    np.testing.assert_array_equal(out["pred"], rec.pred[t, :2000])
    np.testing.assert_allclose(out["flops"], rec.flops[t, :2000], rtol=1e-6)
