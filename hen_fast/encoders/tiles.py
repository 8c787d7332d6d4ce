"""Tile autoencoders: every ``tile x tile`` block of an image is encoded on its own, by a small
MLP, to ``code_dim`` numbers; the decoder maps each code back to its block. Pure torch (no
diffusers).

Why this shape: HEN's occlusion-aware recall needs latents that depend on known pixels only, and
noisy recall needs latents that move little when the pixels get noise. A tile MLP is local by
construction (a cue's latent mask is exact: the codes of its fully known tiles) and has no
normalisation layer: diffusers' GroupNorm, applied to one small tile, divides a near-constant
tile (MNIST's black background, a patch of sky) by its tiny spread, so pixel noise there becomes
unit-size latent noise (measured: the tiled diffusers models trained on the same photos recalled
5% of noisy MNIST digits where raw pixels recall 100%). Trained as a denoising autoencoder
(each clean tile reconstructed from its own code and from a noisy copy's;
``scripts/train_autoencoders.py``), the code keeps what tells tiles apart and drops some of the
noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import Encoder, _check_size


class TileAutoencoder(nn.Module):
    """Encoder and decoder MLPs over flattened ``channels x tile x tile`` blocks."""

    def __init__(self, channels: int, tile: int, code_dim: int, hidden: int):
        super().__init__()
        self.channels, self.tile, self.code_dim, self.hidden = channels, tile, code_dim, hidden
        pixels = channels * tile * tile
        self.encoder = nn.Sequential(
            nn.Linear(pixels, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, code_dim),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(code_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, pixels),
        )  # fmt: skip

    def config(self) -> dict:
        return dict(channels=self.channels, tile=self.tile, code_dim=self.code_dim,
                    hidden=self.hidden)  # fmt: skip

    def blocks(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(n, C, H, W) -> (n * rows * cols, C * tile * tile) row-major blocks and the layout."""
        n, channels, height, width = images.shape
        t = self.tile
        rows, cols = height // t, width // t
        blocks = images.reshape(n, channels, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5)
        return blocks.reshape(n * rows * cols, channels * t * t), (n, rows, cols)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Model inputs (centred pixels, ``2 x - 1``) -> code grid (n, code_dim, rows, cols)."""
        blocks, (n, rows, cols) = self.blocks(images)
        codes = self.encoder(blocks).reshape(n, rows, cols, self.code_dim)
        return codes.permute(0, 3, 1, 2)

    def decode(self, grid: torch.Tensor) -> torch.Tensor:
        n, _, rows, cols = grid.shape
        t, channels = self.tile, self.channels
        blocks = self.decoder(grid.permute(0, 2, 3, 1).reshape(-1, self.code_dim))
        blocks = blocks.reshape(n, rows, cols, channels, t, t).permute(0, 3, 1, 4, 2, 5)
        return blocks.reshape(n, channels, rows * t, cols * t)


class TileEncoder(Encoder):
    """A :class:`TileAutoencoder` as a HEN encoder. The latent is the code grid flattened
    channel-major, ``code_dim x (H / tile) x (W / tile)``; ``image_size`` may be any multiple of
    the tile (images are resized to it)."""

    def __init__(
        self,
        model: TileAutoencoder,
        *,
        image_size: int | tuple[int, int] = 32,
        device="cpu",
        name: str = "tiles",
        recommended: dict | None = None,
    ):
        if not isinstance(model, TileAutoencoder):
            raise TypeError(f"model must be a TileAutoencoder, got {type(model).__name__}")
        self.image_size = _check_size(image_size)
        if self.image_size[0] % model.tile or self.image_size[1] % model.tile:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of the tile ({model.tile})"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.channels, self.tile, self.name = model.channels, model.tile, name
        self.grid = (self.image_size[0] // model.tile, self.image_size[1] // model.tile)
        self.latent_dim = model.code_dim * self.grid[0] * self.grid[1]
        self.recommended = dict(recommended or {})

    def _encode_batch(self, images):
        return self.model.encode(images * 2 - 1).flatten(1)

    def _decode_batch(self, latents):
        grid = latents.reshape(-1, self.model.code_dim, *self.grid)
        return ((self.model.decode(grid) + 1) / 2).clamp(0.0, 1.0)

    def latent_mask(self, known: torch.Tensor) -> torch.Tensor:
        """Exact: the codes of the tiles whose pixels are all known."""
        known = self._check_known(known)
        hidden = (~known).float()[:, None]
        known_tiles = torch.nn.functional.max_pool2d(hidden, self.tile)[:, 0] == 0
        mask = known_tiles[:, None].expand(-1, self.model.code_dim, -1, -1)
        return mask.reshape(known.shape[0], self.latent_dim)


def load_tile_encoder(record: dict, weights: Path, device="cpu", **options) -> TileEncoder:
    """A trained tile model as a HEN encoder, from its record (the weights' JSON: ``config``,
    ``image_size``, ``name``, ``recommended``) and its safetensors file; ``options`` override
    the record's image size and recommended settings."""
    from safetensors.torch import load_file

    model = TileAutoencoder(**record["config"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    options.setdefault("recommended", record.get("recommended", {}).get("code", {}))
    options.setdefault("image_size", tuple(record["image_size"]))
    options.setdefault("name", record["name"])
    return TileEncoder(model, device=device, **options)
