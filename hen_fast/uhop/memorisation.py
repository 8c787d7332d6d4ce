"""U-Hop's expressiveness protocol (the paper's Figure 6 and Table 1) on offline data: how much of
a growing training set a Hopfield-layer classifier memorises, with and without U-Hop.

Each image is cut into patch tokens (MNIST 5k: 16 tokens of 7x7 pixels; sklearn's digits: 16 of
2x2), embedded with a position embedding, and a learned CLS query retrieves from the image's own
tokens through :class:`~hen_fast.uhop.UHopHopfieldLayer`; a linear read-out classifies the
retrieved vector (:class:`~hen_fast.uhop.layer_example.PatchClassifier`, the paper's ViT-style
setting). The same model trains by :func:`~hen_fast.uhop.layer.fit_uhop` with and without U-Hop's
Stage I steps, for the same number of optimiser steps at every training-set size (so a small set
is not under-trained: 25 epochs of 250 samples are 100 steps). After every epoch the accuracy on
the whole training set is measured; the maximum over epochs is the memorised fraction ("max train
accuracy"), and the step at which training accuracy first reaches ``CONVERGED`` of that run's
maximum measures convergence speed.

``labels="random"`` replaces the labels by random ones (fixed seed): nothing is learnable but
memorisation, so it isolates the capacity the paper's Theorem 3.1 is about. With true labels the
rest of the data set is the test set.

``hen-fast uhop-memorise`` runs it and writes JSON and a PNG.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .._extras import require
from .layer import fit_uhop
from .layer_example import PatchClassifier

DATASETS = ("mnist", "digits")
LABELS = ("true", "random")
CONVERGED = 0.95  # a run has converged at the first epoch within 95% of its max train accuracy


def patch_tokens(images: Tensor, patch: int) -> Tensor:
    """(N, 1, H, W) images to (N, H*W/patch^2, patch^2) row-major patch tokens."""
    n, _, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"patch {patch} must divide the image size {height}x{width}")
    blocks = images.reshape(n, height // patch, patch, width // patch, patch)
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, -1, patch * patch)


def load_tokens(dataset: str) -> tuple[Tensor, Tensor]:
    """Patch tokens and labels of a whole offline data set (MNIST 5k or sklearn's digits)."""
    from .. import datasets

    if dataset == "mnist":
        images, labels = datasets.mnist5k("all")
        return patch_tokens(images, 7), labels
    if dataset == "digits":
        images, labels = datasets.digits("all")
        return patch_tokens(images, 2), labels
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def accuracy(model: nn.Module, tokens: Tensor, labels: Tensor, batch: int = 1024) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(
            int((model(tokens[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
            for i in range(0, tokens.shape[0], batch)
        )
    return right / max(tokens.shape[0], 1)


def train_run(
    tokens: Tensor,
    labels: Tensor,
    test: tuple[Tensor, Tensor] | None,
    *,
    uhop: bool,
    separation: str,
    seed: int,
    steps: int,
    width: int,
    feature_dim: int | None,
    t: float,
    beta: float,
    inner_steps: int,
    kernel_lr: float,
    model_lr: float,
    batch_size: int,
) -> dict:
    """One classifier trained on ``tokens`` for about ``steps`` optimiser steps (whole epochs):
    its train accuracy after every epoch, the maximum, the steps to converge and (with ``test``)
    the final test accuracy."""
    per_epoch = -(-tokens.shape[0] // batch_size)
    epochs = max(1, round(steps / per_epoch))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = PatchClassifier(
        tokens.shape[1], tokens.shape[2], width, int(labels.max()) + 1, uhop=uhop,
        separation=separation, beta=beta, t=t, generator=generator,
        feature_dim=feature_dim if uhop else None,
    )  # fmt: skip
    curve: list[float] = []
    started = time.perf_counter()
    history = fit_uhop(
        model, model.hopfield, tokens, labels, nn.functional.cross_entropy, model.memories,
        epochs=epochs, inner_steps=inner_steps if uhop else 0, batch_size=batch_size,
        kernel_batch_size=4, kernel_lr=kernel_lr, model_lr=model_lr, generator=generator,
        progress=False, after_epoch=lambda _: curve.append(accuracy(model, tokens, labels)),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    best = max(curve)
    converged = next(i for i, value in enumerate(curve) if value >= CONVERGED * best) + 1
    return dict(
        max_train_accuracy=best,
        final_train_accuracy=curve[-1],
        epochs=epochs,
        steps_per_epoch=per_epoch,
        steps_to_converge=converged * per_epoch,
        train_accuracy_per_epoch=curve,
        objective_per_epoch=[
            statistics.fmean(history["objective"][e * per_epoch : (e + 1) * per_epoch])
            for e in range(epochs)
        ],
        test_accuracy=None if test is None else accuracy(model, *test),
        seconds=round(seconds, 2),
    )


def memorisation(
    dataset: str = "mnist",
    sizes=(250, 500, 1000, 2000, 4000),
    *,
    labels: str = "true",
    separations=("softmax", "sparsemax"),
    seeds=(0, 1, 2),
    steps: int = 1600,
    width: int = 32,
    feature_dim: int | None = None,
    t: float = 0.5,
    beta: float = 1.0,
    inner_steps: int = 1,
    kernel_lr: float = 0.1,
    model_lr: float = 1e-2,
    batch_size: int = 64,
    progress: bool | None = None,
) -> dict:
    """Max train accuracy (and convergence, test accuracy) against training-set size, for each
    separation with and without U-Hop, over ``seeds``. The training set of size ``n`` is the first
    ``n`` of the data set shuffled by seed 0 (nested: each size holds the smaller ones). The
    defaults are the tuned ones (t = 0.5, one Stage I step per step: the best of t in {0.5, 2,
    8} x {1, 5} steps x feature dim {32, 64} at 2000 MNIST samples; README, "Memorisation as the
    training set grows"); ``hen-fast uhop-memorise`` takes them from here."""
    from tqdm.auto import tqdm

    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    tokens, classes = load_tokens(dataset)
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(0))
    tokens, classes = tokens[order], classes[order]
    if labels == "random":
        count = int(classes.max()) + 1
        classes = torch.randint(0, count, classes.shape, generator=torch.Generator().manual_seed(1))
    sizes = sorted(int(s) for s in sizes)
    if not sizes or sizes[0] < 1 or sizes[-1] > tokens.shape[0]:
        raise ValueError(f"sizes must lie in [1, {tokens.shape[0]}] for {dataset}, got {sizes}")
    settings = dict(
        steps=steps, width=width, feature_dim=feature_dim, t=t, beta=beta,
        inner_steps=inner_steps, kernel_lr=kernel_lr, model_lr=model_lr, batch_size=batch_size,
    )  # fmt: skip
    jobs = [
        (size, separation, uhop, seed)
        for size in sizes
        for separation in separations
        for uhop in (False, True)
        for seed in seeds
    ]
    records = []
    for size, separation, uhop, seed in tqdm(jobs, desc="uhop-memorise", disable=progress is False):
        test = None
        if labels == "true" and size < tokens.shape[0]:
            test = (tokens[size:], classes[size:])
        run = train_run(
            tokens[:size], classes[:size], test, uhop=uhop, separation=separation, seed=seed,
            **settings,
        )  # fmt: skip
        records.append(dict(size=size, separation=separation, uhop=uhop, seed=seed, **run))
    return dict(
        experiment="memorisation",
        dataset=dataset,
        labels=labels,
        settings=settings,
        records=records,
        summary=summarise(records),
    )


def model_name(separation: str, uhop: bool) -> str:
    return f"{separation}" + (" + U-Hop" if uhop else "")


def summarise(records: list[dict]) -> dict:
    """{model: {size: {metric: mean, metric_std: spread}}} over seeds."""
    grouped: dict[str, dict[int, list[dict]]] = {}
    for record in records:
        name = model_name(record["separation"], record["uhop"])
        grouped.setdefault(name, {}).setdefault(record["size"], []).append(record)
    summary: dict = {}
    for name, by_size in grouped.items():
        summary[name] = {}
        for size, runs in sorted(by_size.items()):
            cell = {}
            for metric in ("max_train_accuracy", "steps_to_converge", "test_accuracy"):
                values = [r[metric] for r in runs if r[metric] is not None]
                if values:
                    cell[metric] = statistics.fmean(values)
                    cell[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][str(size)] = cell
    return summary


def save(result: dict, out_dir: Path, tag: str = "") -> tuple[Path, Path]:
    """``memorisation-<dataset>-<labels>[-tag].json`` and ``.png`` in ``out_dir``."""
    from .experiments import save_as

    stem = f"memorisation-{result['dataset']}-{result['labels']}" + (f"-{tag}" if tag else "")
    return save_as(result, Path(out_dir) / stem, plot)


def plot(result: dict, path: Path) -> None:
    """Left: max train accuracy against training-set size (mean +- spread over seeds). Right:
    train accuracy against optimiser steps at the largest size (seed mean): convergence."""
    require("matplotlib", "uhop").use("Agg")
    plt = require("matplotlib.pyplot", "uhop")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    largest = max(r["size"] for r in result["records"])
    for name, by_size in result["summary"].items():
        sizes = sorted(by_size, key=int)
        mean = [by_size[s]["max_train_accuracy"] for s in sizes]
        std = [by_size[s]["max_train_accuracy_std"] for s in sizes]
        style = "-" if "U-Hop" in name else "--"
        left.errorbar([int(s) for s in sizes], mean, yerr=std, fmt=style + "o", ms=4,
                      capsize=3, label=name)  # fmt: skip
        runs = [
            r
            for r in result["records"]
            if r["size"] == largest and model_name(r["separation"], r["uhop"]) == name
        ]
        curves = zip(*(r["train_accuracy_per_epoch"] for r in runs))
        average = [statistics.fmean(epoch) for epoch in curves]
        at = [runs[0]["steps_per_epoch"] * (e + 1) for e in range(len(average))]
        right.plot(at, average, style, label=name)
    left.set_xscale("log")
    sizes = sorted({r["size"] for r in result["records"]})
    left.set_xticks(sizes, [str(size) for size in sizes])
    left.minorticks_off()
    left.set_xlabel("training samples")
    left.set_ylabel("max train accuracy")
    left.set_title(f"memorisation, {result['dataset']} patch tokens, {result['labels']} labels",
                   fontsize=9)  # fmt: skip
    right.set_xlabel("optimiser steps")
    right.set_ylabel(f"train accuracy ({largest} samples)")
    right.set_title("convergence", fontsize=9)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
