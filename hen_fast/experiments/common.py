"""Shared parts of the HEN experiments: data, cues, encoders, scoring a recall, writing results."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .. import datasets, metrics
from .._extras import require

# The shipped encoders for each data set (used when present), always beside raw pixels: MNIST's
# and the grey tile model for grey images, the patch models and the colour tile model for
# colour.
# "digits", "faces" and "photos" are held out from every shipped model (not even their eval sets).
DATA_ENCODERS = {
    "mnist": ("mnist-kl", "mnist-vq", "tiles-grey"),
    "patches": ("patches-kl", "patches-vq", "tiles-rgb"),
    "digits": ("mnist-kl", "mnist-vq", "tiles-grey"),
    "faces": ("mnist-kl", "mnist-vq", "tiles-grey"),
    "photos": ("patches-kl", "patches-vq", "tiles-rgb"),
}

# Images each data set of load_images holds.
AVAILABLE = {"mnist": 1000, "patches": 1323, "digits": 1797, "faces": 200, "photos": 520}


def load_images(data: str, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` images the shipped autoencoders never saw: the eval split of MNIST digits (1000)
    or of 32x32 natural-image patches cut every 16 pixels (1323), or data held out from
    every shipped model: scikit-learn's 8x8 digits (1797), scikit-image's 25x25 faces (200),
    32x32 patches of scikit-learn's two photos (520)."""
    if data == "mnist":
        images = datasets.mnist5k("eval")[0]
    elif data == "patches":
        images = datasets.natural_patches("eval", size=32, stride=16, seed=seed)
    elif data == "digits":
        images = datasets.digits("all")[0]
    elif data == "faces":
        images = datasets.faces()
    elif data == "photos":
        images = datasets.heldout_photo_patches(size=32, seed=seed)
    else:
        raise ValueError(f"data must be one of {tuple(DATA_ENCODERS)}, got {data!r}")
    if not 1 <= count <= images.shape[0]:
        raise ValueError(f"{data} has {images.shape[0]} eval images; asked for {count}")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:count]].contiguous()


def occluded(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's cues: the lower half of each image hidden (set to 0)."""
    return datasets.mask_lower_half(images)


def default_encoders(data: str) -> list[str]:
    from .. import encoders

    present = set(encoders.available())
    return ["identity", *[name for name in DATA_ENCODERS[data] if name in present]]


def load_encoder(name: str, images: torch.Tensor):
    """An encoder by name; ``identity`` works at the images' own size and channels."""
    from .. import encoders

    if name == "identity":
        return encoders.load(
            "identity", image_size=tuple(images.shape[-2:]), channels=images.shape[1]
        )
    return encoders.load(name)


def recall_scores(recalled: torch.Tensor, indices: torch.Tensor, reference: torch.Tensor) -> dict:
    """MSE and 1-SSIM against ``reference`` (the decoded stored latents, as in the paper, so an
    encoder's own reconstruction error does not count), and exact identity recall."""
    return {
        "mse": float(metrics.mse(recalled, reference).mean()),
        "one_minus_ssim": float(metrics.one_minus_ssim(recalled, reference).mean()),
        "exact": metrics.exact_recall(indices.cpu(), torch.arange(indices.shape[0])),
    }


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "command": "hen-fast " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(out: Path, name: str, record: dict) -> Path:
    """``out/name.json`` written atomically (a temporary file, then a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"environment": environment(), **record}, indent=1) + "\n")
    os.replace(temporary, path)
    return path


def save_figure(figure, out: Path, name: str) -> Path:
    plt = require("matplotlib.pyplot", "hen")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    require("matplotlib", "hen").use("Agg")
    return require("matplotlib.pyplot", "hen")


def image_grid(rows: list[torch.Tensor], labels: list[str], columns: int = 10, scale: int = 2):
    """A PIL image: one labelled row per tensor of images (N, C, H, W) in [0, 1]."""
    Image, ImageDraw = require("PIL.Image", "hen"), require("PIL.ImageDraw", "hen")
    height, width = rows[0].shape[-2:]
    label_width = 120
    count = min(columns, rows[0].shape[0])
    canvas = Image.new(
        "RGB", (label_width + count * width * scale, len(rows) * height * scale), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for row, (images, label) in enumerate(zip(rows, labels)):
        draw.text((4, row * height * scale + height * scale // 2 - 6), label, fill="black")
        for column in range(count):
            tile = images[column].detach().cpu().clamp(0, 1)
            tile = tile.expand(3, -1, -1) if tile.shape[0] == 1 else tile[:3]
            pixels = (tile.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            picture = Image.fromarray(pixels, mode="RGB").resize(
                (width * scale, height * scale), Image.NEAREST
            )
            canvas.paste(picture, (label_width + column * width * scale, row * height * scale))
    return canvas
