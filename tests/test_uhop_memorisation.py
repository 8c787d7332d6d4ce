"""U-Hop's memorisation protocol (hen_fast.uhop.memorisation, ``hen-fast uhop-memorise``) and
fit_uhop's per-epoch hook it measures with."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hen_fast import cli
from hen_fast.uhop import memorisation
from hen_fast.uhop.layer import UHopHopfieldLayer, fit_uhop


def test_patch_tokens_by_hand():
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    tokens = memorisation.patch_tokens(images, 2)
    assert tokens.shape == (2, 4, 4)
    assert tokens[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # the top-right 2x2 block
    assert tokens[1, 2].tolist() == [24.0, 25.0, 28.0, 29.0]
    with pytest.raises(ValueError, match="must divide"):
        memorisation.patch_tokens(images, 3)
    mnist, labels = memorisation.load_tokens("mnist")
    assert mnist.shape == (5000, 16, 49) and labels.shape == (5000,)
    with pytest.raises(ValueError, match="dataset"):
        memorisation.load_tokens("cifar")


class _FirstMemoryQuery(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.hopfield = layer

    def forward(self, x):
        return self.hopfield(x[:, :1], x).squeeze(1)


def test_fit_uhop_calls_after_epoch_once_per_epoch_in_training_mode(gen):
    layer = UHopHopfieldLayer(6, generator=gen)
    model = _FirstMemoryQuery(layer)
    inputs = torch.randn(30, 4, 6, generator=gen)
    targets = torch.randn(30, 6, generator=gen)
    seen = []

    def after_epoch(epoch):
        seen.append(epoch)
        model.eval()  # as a measurement would; training must go on in training mode

    history = fit_uhop(
        model, layer, inputs, targets, nn.functional.mse_loss, lambda x: x, epochs=3,
        batch_size=8, generator=gen, progress=False, after_epoch=after_epoch,
    )  # fmt: skip
    assert seen == [0, 1, 2] and model.training
    assert len(history["objective"]) == 3 * math.ceil(30 / 8)


@pytest.mark.parametrize("labels", ["true", "random"])
def test_memorisation_records_curves_and_summary(labels):
    result = memorisation.memorisation(
        "digits", [40, 80], labels=labels, separations=("softmax",), seeds=(0, 1), steps=3 * 2,
        width=8, progress=False,
    )  # fmt: skip
    assert result["experiment"] == "memorisation" and result["labels"] == labels
    assert len(result["records"]) == 2 * 2 * 2  # sizes x (plain, U-Hop) x seeds
    for record in result["records"]:
        curve = record["train_accuracy_per_epoch"]
        per_epoch = -(-record["size"] // 64)  # 1 or 2 steps of batch 64
        assert record["steps_per_epoch"] == per_epoch and record["epochs"] == 6 // per_epoch
        assert len(curve) == record["epochs"] == len(record["objective_per_epoch"])
        assert record["max_train_accuracy"] == max(curve) and 0.0 <= max(curve) <= 1.0
        converged = record["steps_to_converge"] // per_epoch
        assert curve[converged - 1] >= memorisation.CONVERGED * max(curve)
        assert all(value < memorisation.CONVERGED * max(curve) for value in curve[: converged - 1])
        assert (record["test_accuracy"] is None) == (labels == "random")
    cell = result["summary"]["softmax + U-Hop"]["80"]
    runs = [r["max_train_accuracy"] for r in result["records"] if r["uhop"] and r["size"] == 80]
    assert cell["max_train_accuracy"] == pytest.approx(sum(runs) / 2)
    # the runs differ by seed only: the same seed and size give the same run
    again = memorisation.memorisation(
        "digits", [40], labels=labels, separations=("softmax",), seeds=(0,), steps=6, width=8,
        progress=False,
    )  # fmt: skip
    first = [r for r in result["records"] if r["size"] == 40 and r["seed"] == 0]
    assert [r["train_accuracy_per_epoch"] for r in again["records"]] == [
        r["train_accuracy_per_epoch"] for r in first
    ]


def test_memorisation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        memorisation.memorisation("digits", [10], labels="shuffled")
    with pytest.raises(ValueError, match="sizes must lie"):
        memorisation.memorisation("digits", [5000], progress=False)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    code = cli.main([
        "uhop-memorise", "--dataset", "digits", "--sizes", "30", "60", "--seeds", "0",
        "--separations", "sparsemax", "--steps", "2", "--width", "8", "--out", str(tmp_path),
        "--tag", "tiny",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "sparsemax + U-Hop" in out and "max train acc" in out
    data = json.loads((tmp_path / "memorisation-digits-true-tiny.json").read_text())
    assert data["settings"]["t"] == 0.5 and data["settings"]["steps"] == 2
    assert (tmp_path / "memorisation-digits-true-tiny.png").stat().st_size > 1000
    assert cli.main(["uhop-memorise", "--dataset", "digits", "--sizes", "0"]) == 2
    assert cli.main(["uhop-memorise", "--dataset", "digits", "--sizes", "9000"]) == 2
    assert cli.main(["uhop-memorise", "--dataset", "digits", "--inner-steps", "-1"]) == 2
    assert cli.main(["uhop-memorise", "--dataset", "digits", "--feature-dim", "0"]) == 2
