"""The encoder interface: images ``(N, C, H, W)`` in [0, 1] <-> latents ``(N, D)``.

Every encoder validates its input the same way, converts channels and resizes to the resolution it
was built for (``prepare``), then runs its model in batches on its own device. Subclasses only
implement ``_encode_batch`` and ``_decode_batch`` on prepared tensors.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights: what PIL's "L" conversion uses, so converted images match PIL's.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _progress_bar(total: int, progress: bool | None, desc: str):
    """A tqdm bar over ``total`` batches, or None. ``progress=None`` shows one when there is more
    than one batch and stderr is a terminal (tqdm's ``disable=None``); True always, False never."""
    if progress is False or (progress is None and total <= 1):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=None if progress is None else False)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def check_images(images, name: str = "images") -> torch.Tensor:
    """Raise a ValueError/TypeError naming ``name`` unless ``images`` is a float tensor
    ``(N, C, H, W)`` with values in [0, 1] (no NaN)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name} must have rank 4 (N, C, H, W), got shape {tuple(images.shape)}"
            + (" (add a batch dimension with images[None])" if images.dim() == 3 else "")
        )
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be floating point with values in [0, 1], got {images.dtype} "
            "(divide uint8 images by 255)"
        )
    if images.shape[1] not in (1, 2, 3, 4):
        raise ValueError(
            f"{name} has {images.shape[1]} channels; expected 1 (grey), 2 (grey + alpha), "
            "3 (RGB) or 4 (RGBA)"
        )
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{name} has an empty spatial size {tuple(images.shape[2:])}")
    if images.numel():
        low, high = torch.aminmax(images.detach())
        if torch.isnan(low) or torch.isnan(high):  # aminmax propagates NaN: one read suffices
            raise ValueError(f"{name} contains NaN")
        if low < 0 or high > 1:
            raise ValueError(
                f"{name} must have values in [0, 1], "
                f"got min {float(low):.4g}, max {float(high):.4g}"
            )
    return images


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey <-> RGB (alpha dropped): grey is repeated to RGB, RGB becomes luma."""
    have = images.shape[1]
    if have in (2, 4):  # drop alpha: the encoders model opaque images
        images = images[:, : have - 1]
        have -= 1
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
        return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing (so shrinking averages instead of aliasing), clipped to
    [0, 1]; the input is returned unchanged when it already has ``size``."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


class Encoder(abc.ABC):
    """An image encoder-decoder for HEN: ``encode(images) -> latents (N, latent_dim)`` and
    ``decode(latents) -> images (N, channels, *image_size)``, both float32 in batches on
    ``device``.

    Attributes: ``name``; ``image_size`` ``(H, W)`` and ``channels`` the model works at (callers'
    images are converted and resized to them); ``latent_dim``; ``device``; ``recommended`` the
    retrieval setting measured to recall well with this encoder (keyword arguments for
    ``hen_fast.retrieve``: beta, similarity, separation, steps), empty when none was measured.
    """

    name: str = "encoder"
    image_size: tuple[int, int]
    channels: int
    latent_dim: int
    device: torch.device = torch.device("cpu")
    recommended: dict = {}

    # -- what subclasses implement ------------------------------------------------------------
    @abc.abstractmethod
    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Prepared images (n, channels, H, W) float32 on ``device`` -> latents (n, latent_dim)."""

    @abc.abstractmethod
    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (n, latent_dim) float32 on ``device`` -> images (n, channels, H, W)."""

    # -- the interface ------------------------------------------------------------------------
    def latent_mask(self, known: torch.Tensor) -> torch.Tensor | None:
        """The latent coordinates that the known pixels determine: ``known`` (N, H, W) bool at
        ``image_size`` (True where every channel of the pixel is real) -> (N, latent_dim) bool.
        None (this default) when the latents are not spatial: then any coordinate may depend on
        any pixel, and HEN's occlusion-aware recall puts the known pixels back between updates
        instead of masking the score."""
        return None

    def _check_known(self, known: torch.Tensor) -> torch.Tensor:
        if not isinstance(known, torch.Tensor) or known.dtype != torch.bool:
            raise TypeError("known must be a bool tensor (True where the pixel is real)")
        if known.dim() != 3 or tuple(known.shape[1:]) != tuple(self.image_size):
            raise ValueError(
                f"known must have shape (N, {self.image_size[0]}, {self.image_size[1]}) (the "
                f"encoder's image size), got {tuple(known.shape)}"
            )
        return known

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Validate ``images`` (N, C, H, W) in [0, 1] and convert them to this encoder's channels
        and ``image_size``: float32, on the images' own device. This is what ``encode`` sees, so
        compare recalls with ``prepare(truth)``."""
        images = check_images(images)
        images = convert_channels(images.float(), self.channels)
        return resize(images, self.image_size).contiguous()

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, batch_size: int = 256, progress: bool | None = None
    ) -> torch.Tensor:
        """Latents ``(N, latent_dim)`` float32 on ``device`` of images ``(N, C, H, W)`` in [0, 1]
        (any size; grey, RGB, with or without alpha: converted by ``prepare``). Runs in batches of
        ``batch_size`` with a progress bar when there are several (``progress``: None = when
        several batches and a terminal, True = always, False = never)."""
        batch_size = check_batch_size(batch_size)
        images = check_images(images)

        def encode_batch(batch):
            batch = self.prepare(batch).to(self.device)
            return self._encode_batch(batch).float().reshape(batch.shape[0], -1)

        return self._in_batches(
            images, batch_size, progress, "encode", encode_batch, (self.latent_dim,)
        )

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, batch_size: int = 256, progress: bool | None = None
    ) -> torch.Tensor:
        """Images ``(N, channels, *image_size)`` float32 in [0, 1] on ``device`` from latents
        ``(N, latent_dim)`` (e.g. recalled ones); batched like ``encode``."""
        batch_size = check_batch_size(batch_size)
        latents = self.check_latents(latents)

        def decode_batch(batch):
            batch = batch.to(self.device, torch.float32)
            return self._decode_batch(batch).float().clamp_(0.0, 1.0)

        shape = (self.channels, *self.image_size)
        return self._in_batches(latents, batch_size, progress, "decode", decode_batch, shape)

    def _in_batches(self, items, batch_size, progress, verb, run, item_shape) -> torch.Tensor:
        """``run`` on each batch of ``items``, concatenated (an empty result has ``item_shape``),
        with the progress bar ``encode``/``decode`` promise."""
        outputs = []
        total = math.ceil(items.shape[0] / batch_size)
        bar = _progress_bar(total, progress, f"{verb} ({self.name})")
        try:
            for start in range(0, items.shape[0], batch_size):
                outputs.append(run(items[start : start + batch_size]))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if not outputs:
            return torch.empty(0, *item_shape, device=self.device)
        return torch.cat(outputs)

    def check_latents(self, latents, name: str = "latents") -> torch.Tensor:
        """Raise unless ``latents`` is a finite float tensor (N, latent_dim)."""
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(latents).__name__}")
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim:
            raise ValueError(
                f"{name} must have shape (N, {self.latent_dim}) for encoder {self.name!r}, "
                f"got {tuple(latents.shape)}"
            )
        if not latents.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {latents.dtype}")
        if latents.numel() and not bool(torch.isfinite(latents).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        return latents

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, image_size={self.image_size}, "
            f"channels={self.channels}, latent_dim={self.latent_dim}, device={self.device})"
        )


class IdentityEncoder(Encoder):
    """Raw pixels: the latent is the prepared image flattened (``channels * H * W`` values in
    [0, 1]); decoding reshapes. The baseline HEN is compared with (a plain modern Hopfield
    network on pixels)."""

    def __init__(
        self,
        image_size: int | tuple[int, int] = (28, 28),
        channels: int = 1,
        device="cpu",
        name: str = "identity",
    ):
        self.image_size = _check_size(image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.channels = channels
        self.latent_dim = channels * self.image_size[0] * self.image_size[1]
        self.device = torch.device(device)
        self.name = name
        # Measured on MNIST (grey) and natural patches (colour); other data may want another beta.
        self.recommended = dict(IDENTITY_RECOMMENDED[channels])

    def _encode_batch(self, images):
        return images.reshape(images.shape[0], -1)

    def latent_mask(self, known):
        """Exact: a pixel's latents are its channels."""
        known = self._check_known(known)
        return known[:, None].expand(-1, self.channels, -1, -1).reshape(known.shape[0], -1)

    def _decode_batch(self, latents):
        return latents.reshape(latents.shape[0], self.channels, *self.image_size)


# Measured by `python scripts/train_autoencoders.py --tune` (300 eval images stored, recalled from
# lower-half-occluded cues, scored on every pixel and on the known pixels, and noise-0.2 cues; the
# best exact recall over similarity x beta x steps): grey MNIST digits at 28x28 (exact recall
# 0.75) and colour natural patches at 32x32 (0.67).
IDENTITY_RECOMMENDED = {
    1: {"beta": 3.162, "similarity": "l2", "separation": "softmax", "steps": 1},
    3: {"beta": 10.0, "similarity": "l2", "separation": "softmax", "steps": 1},
}


def _check_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in image_size)
    ):
        raise ValueError(
            f"image_size must be an int or (H, W) of positive ints, got {image_size!r}"
        )
    return tuple(image_size)
