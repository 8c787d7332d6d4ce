"""A small classification example for :class:`~hen_fast.uhop.UHopHopfieldLayer`: sklearn's 8x8
digits, each image cut into 16 patches of 2x2 pixels. As in the paper's image classification, a
learned CLS query retrieves from the image's own patches (embedded, plus a position embedding), and
a linear read-out classifies the retrieved vector. The same model is trained with and without U-Hop
by :func:`~hen_fast.uhop.layer.fit_uhop` (Algorithm 2).

``python -m hen_fast.uhop.layer_example`` prints the table for both (softmax and sparsemax, three
seeds, about a minute on 2 CPU cores). Each batch of images runs in one pass of the layer's batched
path (16 memories per image), and the script trains on one thread: for tensors this small, more
threads only contend (on a loaded 2-core machine one step took 10x longer with two).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

from .._extras import require
from .layer import UHopHopfieldLayer, fit_uhop

PATCH = 2


def digit_patches(images: Tensor) -> Tensor:
    """(N, 8, 8) images to (N, 16, 4) patches of 2x2 pixels, row-major."""
    n, side = images.shape[0], images.shape[-1]
    blocks = images.reshape(n, side // PATCH, PATCH, side // PATCH, PATCH)
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, -1, PATCH * PATCH)


class PatchClassifier(nn.Module):
    """Patch embedding + position embedding, a U-Hop Hopfield layer queried by a CLS vector, and
    a linear read-out."""

    def __init__(self, num_patches: int, patch_dim: int, width: int, classes: int, **layer_kw):
        super().__init__()
        generator = layer_kw.pop("generator", None)
        self.embed = nn.Linear(patch_dim, width)
        self.position = nn.Parameter(0.1 * torch.randn(num_patches, width, generator=generator))
        self.cls = nn.Parameter(torch.randn(1, width, generator=generator) / width**0.5)
        self.hopfield = UHopHopfieldLayer(width, generator=generator, **layer_kw)
        self.readout = nn.Linear(width, classes)

    def memories(self, patches: Tensor) -> Tensor:
        return self.embed(patches) + self.position

    def forward(self, patches: Tensor) -> Tensor:
        memories = self.memories(patches)
        queries = self.cls.expand(memories.shape[0], 1, -1)
        return self.readout(self.hopfield(queries, memories).squeeze(1))


def digits_classification(
    uhop: bool,
    *,
    separation: str = "softmax",
    epochs: int = 40,
    inner_steps: int = 1,
    width: int = 32,
    seed: int = 0,
    model_lr: float = 1e-2,
    max_samples: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Train on 80% of (the first ``max_samples`` of, shuffled) sklearn's digits, evaluate on the
    rest; returns accuracies, the first and the final (mean of the last 10) training objective,
    the last separation loss and the training seconds."""
    load_digits = require("sklearn.datasets", "uhop").load_digits
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(images.shape[0], generator=generator)[:max_samples]
    images, labels = images[order], labels[order]
    patches = digit_patches(images)
    split = int(0.8 * patches.shape[0])
    model = PatchClassifier(
        patches.shape[1], patches.shape[2], width, 10, uhop=uhop, separation=separation,
        beta=1.0, t=2.0, generator=generator,
    )  # fmt: skip
    start = time.perf_counter()
    history = fit_uhop(
        model, model.hopfield, patches[:split], labels[:split], nn.functional.cross_entropy,
        model.memories, epochs=epochs, inner_steps=inner_steps, batch_size=64,
        kernel_batch_size=4, model_lr=model_lr, generator=generator, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_acc = (model(patches[:split]).argmax(1) == labels[:split]).float().mean()
        test_acc = (model(patches[split:]).argmax(1) == labels[split:]).float().mean()
    return dict(
        uhop=uhop,
        separation=separation,
        train_accuracy=float(train_acc),
        test_accuracy=float(test_acc),
        first_objective=history["objective"][0],
        final_objective=sum(history["objective"][-10:]) / len(history["objective"][-10:]),
        separation_loss=history["separation"][-1] if history["separation"] else None,
        seconds=seconds,
    )


def main(seeds=(0, 1, 2)) -> None:
    torch.set_num_threads(1)  # see the module docstring
    print(f"sklearn digits, 80/20 split, 40 epochs, mean +- spread over seeds {list(seeds)}")
    print(f"{'model':<28} {'train acc':>13} {'test acc':>13} {'sep loss':>8} {'s/run':>6}")
    for separation in ("softmax", "sparsemax"):
        for uhop in (False, True):
            runs = [digits_classification(uhop, separation=separation, seed=s) for s in seeds]
            name = f"{separation} Hopfield" + (" + U-Hop" if uhop else "")
            cells = []
            for key in ("train_accuracy", "test_accuracy"):
                values = [r[key] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} +- {spread:.3f}")
            sep = (
                ""
                if runs[0]["separation_loss"] is None
                else (f"{statistics.mean(r['separation_loss'] for r in runs):.2f}")
            )
            seconds = statistics.mean(r["seconds"] for r in runs)
            print(f"{name:<28} {cells[0]:>13} {cells[1]:>13} {sep:>8} {seconds:>6.1f}")


if __name__ == "__main__":
    main()
