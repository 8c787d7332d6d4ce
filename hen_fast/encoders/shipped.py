"""The package's own small autoencoders, whose weights ship in ``weights/``.

Each model is two files: ``<name>.safetensors`` (the weights) and ``<name>.json`` (the diffusers
class and config, the image size and channels, the training set-up, the reconstruction error on the
held-out eval split and the measured best retrieval setting). ``scripts/train_autoencoders.py``
writes both.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._extras import require

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Tiled encoding by default (DiffusersEncoder's ``tile``): the 32x32 patch models encode 16x16
# tiles, so an occluded cue's latent mask is exact. Measured with the package defaults by
# benchmarks/hen_recall.py (500 eval patches, lower half hidden, with ``known``): recall 15-21%
# untiled -> 100% tiled (raw pixels 100%); noisy (sigma 0.2) recall unchanged (91.4 -> 91.2% KL,
# 79.4 -> 78.4% VQ); eval reconstruction MSE 0.0073 -> 0.0101 (KL), 0.0056 -> 0.0132 (VQ).
# MNIST's 28x28 has no tile that keeps its 7x7 latent grid; untiled it recalls 80-100%.
DEFAULT_TILES = {"patches-kl": 16, "patches-vq": 16}


def autoencoder_config(
    channels: int,
    size: int,
    widths=(16, 32, 32),
    norm_groups: int = 8,
    latent_channels: int = 4,
    **extra,
) -> dict:
    """The diffusers config of the shipped autoencoders' architecture (``AutoencoderKL`` or, with
    ``num_vq_embeddings`` in ``extra``, ``VQModel``): 3 blocks of ``widths`` channels, downsampling
    by 4, ``latent_channels`` latent channels, no attention. The tests build the same
    architecture at tiny widths."""
    return dict(
        in_channels=channels,
        out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=list(widths),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_groups,
        sample_size=size,
        mid_block_add_attention=False,
        **extra,
    )


def weights_paths(name: str) -> tuple[Path, Path]:
    return WEIGHTS_DIR / f"{name}.safetensors", WEIGHTS_DIR / f"{name}.json"


def shipped_present(name: str) -> bool:
    return all(path.is_file() for path in weights_paths(name))


def shipped_info(name: str) -> dict:
    """The json record beside a shipped model's weights (config, training, eval metrics)."""
    from . import SHIPPED

    if name not in SHIPPED:
        raise ValueError(f"unknown shipped encoder {name!r}; shipped: {', '.join(SHIPPED)}")
    weights, record = weights_paths(name)
    if not shipped_present(name):
        raise FileNotFoundError(
            f"the weights of {name!r} are missing ({weights} and {record}); reinstall hen_fast or "
            f"recreate them with `python scripts/train_autoencoders.py --models {name}`"
        )
    return json.loads(record.read_text())


def load_shipped(name: str, device="cpu", **options):
    """Build the shipped encoder ``name`` with its trained weights. ``options`` go to the wrapper
    (e.g. ``latent="onehot"`` for the VQ models); ``recommended`` defaults to the setting measured
    for the chosen latent."""
    from safetensors.torch import load_file

    info = shipped_info(name)
    if info["class"] == "TileAutoencoder":  # pure torch: no diffusers needed
        from .tiles import load_tile_encoder

        return load_tile_encoder(info, weights_paths(name)[0], device, name=name, **options)

    from .diffusers_models import DiffusersKL, DiffusersVQ

    wrapper = {"AutoencoderKL": DiffusersKL, "VQModel": DiffusersVQ}[info["class"]]
    diffusers = require("diffusers", "hen")
    model = getattr(diffusers, info["class"]).from_config(info["config"])
    model.load_state_dict(load_file(str(weights_paths(name)[0])), strict=True)
    latent = options.get("latent", "quantized") if wrapper is DiffusersVQ else "kl"
    options.setdefault("tile", DEFAULT_TILES.get(name))
    recommended = info.get("recommended", {}).get(latent, {})
    options.setdefault("recommended", recommended)
    return wrapper(
        model=model,
        image_size=tuple(info["image_size"]),
        channels=info["channels"],
        device=device,
        name=name,
        **options,
    )
