"""diffusers autoencoders as HEN encoders: ``AutoencoderKL`` (continuous latents) and ``VQModel``
(vector-quantised latents, as continuous code vectors or as one-hot code assignments).

A model comes from a local folder or a hub id already in the local cache (``pretrained=``; loaded
with ``local_files_only=True``, never downloaded), from a config dict (random weights; tests build
tiny models this way) or as a built module (``model=``). Images are mapped from [0, 1] to the
[-1, 1] range diffusers autoencoders are trained on, and back.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .._extras import require
from .base import Encoder, _check_size

VQ_LATENTS = ("quantized", "onehot", "continuous")


def _check_tile(tile, image_size: tuple[int, int]) -> int | None:
    if tile is None:
        return None
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise TypeError(f"tile must be an int (pixels) or None, got {type(tile).__name__}")
    if tile < 1 or image_size[0] % tile or image_size[1] % tile:
        raise ValueError(f"tile must be >= 1 and divide the image size {image_size}, got {tile}")
    return tile


class ModelNotFoundError(FileNotFoundError):
    """A pretrained model whose weights are not on this machine (hen_fast never downloads)."""


def _from_pretrained(model_class, pretrained: str, subfolder: str | None):
    """``model_class.from_pretrained`` without any network access, with an error that says how
    to get the weights onto the machine when they are missing."""
    path = os.fspath(pretrained)
    try:
        return model_class.from_pretrained(path, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as error:
        where = (
            f"the folder {path!r} has no loadable {model_class.__name__} "
            f"(config.json + diffusion_pytorch_model.safetensors"
            + (f" under {subfolder!r}" if subfolder else "")
            + ")"
            if os.path.isdir(path)
            else f"{path!r} is neither a local folder nor a model in the local Hugging Face cache"
        )
        raise ModelNotFoundError(
            f"{where}. hen_fast never downloads weights: download them yourself (e.g. "
            f"`huggingface-cli download {path}` or `git clone` the model repository) and pass the "
            "local folder as pretrained=, or use a shipped encoder "
            f"(hen_fast.encoders.available()). ({type(error).__name__}: {error})"
        ) from error


class DiffusersEncoder(Encoder):
    """Common part of the diffusers wrappers: building the model, the [0, 1] <-> [-1, 1] mapping,
    the latent grid's shape (found by encoding one blank image), tiled encoding and the latent
    mask of occluded cues.

    ``tile`` (pixels, dividing the image size): encode each ``tile x tile`` block of the image on
    its own and place the blocks' latent grids side by side (decoding takes the whole grid). Each
    latent position then depends on the pixels of its tile and nothing else, so the latent mask
    of an occluded cue is exact: the positions of the tiles whose pixels are all known. Without
    tiles every position depends on every pixel (the models' GroupNorm takes statistics over the
    whole image, and the receptive fields are wide); the mask is then the positions whose own
    block of ``H / h x W / w`` pixels is known, close but not exact.
    """

    model_class_name = ""

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        config: dict | None = None,
        model: torch.nn.Module | None = None,
        *,
        subfolder: str | None = None,
        image_size: int | tuple[int, int] | None = None,
        channels: int | None = None,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        name: str | None = None,
        recommended: dict | None = None,
        tile: int | None = None,
    ):
        diffusers = require("diffusers", "hen")
        model_class = getattr(diffusers, self.model_class_name)
        given = [arg is not None for arg in (pretrained, config, model)]
        if sum(given) != 1:
            raise ValueError(
                f"pass exactly one of pretrained= (a local folder or cached hub id), config= (a "
                f"{self.model_class_name} config dict) or model= (a built {self.model_class_name})"
            )
        if pretrained is not None:
            model = _from_pretrained(model_class, pretrained, subfolder)
        elif config is not None:
            if not isinstance(config, dict):
                raise TypeError(f"config must be a dict, got {type(config).__name__}")
            with torch.random.fork_rng(devices=[]):  # random weights that depend on seed only
                torch.manual_seed(seed)
                model = model_class.from_config(config)
        elif not isinstance(model, model_class):
            raise TypeError(f"model must be a diffusers {self.model_class_name}, got {type(model)}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        model = model.to(self.device).eval().requires_grad_(False)
        self.model = model if dtype == next(model.parameters()).dtype else model.to(dtype=dtype)
        self.channels = int(self.model.config.in_channels if channels is None else channels)
        if self.channels != self.model.config.in_channels:
            raise ValueError(
                f"channels={channels} but the model takes {self.model.config.in_channels}"
            )
        if image_size is None:
            image_size = self.model.config.sample_size
        self.image_size = _check_size(image_size)
        self.name = name or self.model_class_name
        self.recommended = dict(recommended or {})
        self.tile = _check_tile(tile, self.image_size)
        blank = torch.zeros(1, self.channels, *self.image_size, device=self.device)
        with torch.no_grad():
            self.latent_shape = tuple(self._grid(self._to_model(blank)).shape[1:])
        self.latent_dim = self._latent_dim()

    def _grid(self, model_input: torch.Tensor) -> torch.Tensor:
        """The latent grid (n, c, h, w) of model inputs, tile by tile when ``tile`` is set."""
        if self.tile is None:
            return self._latent_grid(model_input)
        n, channels, height, width = model_input.shape
        t = self.tile
        rows, cols = height // t, width // t
        blocks = model_input.reshape(n, channels, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5)
        grids = self._latent_grid(blocks.reshape(n * rows * cols, channels, t, t))
        _, c, h, w = grids.shape
        grids = grids.reshape(n, rows, cols, c, h, w).permute(0, 3, 1, 4, 2, 5)
        return grids.reshape(n, c, rows * h, cols * w)

    def latent_mask(self, known: torch.Tensor) -> torch.Tensor:
        positions = self._known_positions(self._check_known(known))
        return self._position_mask(positions).reshape(positions.shape[0], self.latent_dim)

    def _known_positions(self, known: torch.Tensor) -> torch.Tensor:
        """(N, h, w) True where a latent position's pixels are all known: its tile's (exact) or,
        untiled, its own block's."""
        hidden = (~known).float()[:, None]
        h, w = self.latent_shape[-2:]
        if self.tile is not None:
            per_tile = (self.image_size[0] // self.tile, self.image_size[1] // self.tile)
            hidden_tiles = F.max_pool2d(hidden, self.tile)
            hidden = F.interpolate(hidden_tiles, scale_factor=(h // per_tile[0], w // per_tile[1]))
            return hidden[:, 0] == 0
        block = (self.image_size[0] // h, self.image_size[1] // w)
        return F.max_pool2d(hidden, block)[:, 0] == 0

    def _position_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """A position mask (N, h, w) over the latent's layout: channel-major (c, h, w)."""
        return positions[:, None].expand(-1, self.latent_shape[0], -1, -1)

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        return (images * 2 - 1).to(self.dtype)

    @staticmethod
    def _from_model(output: torch.Tensor) -> torch.Tensor:
        return (output.float() + 1) / 2

    def _latent_dim(self) -> int:
        return int(torch.tensor(self.latent_shape).prod())

    def _latent_grid(self, model_input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DiffusersKL(DiffusersEncoder):
    """A diffusers ``AutoencoderKL``. The latent is the posterior mean (deterministic), flattened
    from ``(latent_channels, h, w)``."""

    model_class_name = "AutoencoderKL"

    def _latent_grid(self, model_input):
        return self.model.encode(model_input).latent_dist.mode()

    def _encode_batch(self, images):
        return self._grid(self._to_model(images)).flatten(1)

    def _decode_batch(self, latents):
        grid = latents.to(self.dtype).reshape(-1, *self.latent_shape)
        return self._from_model(self.model.decode(grid).sample)


class DiffusersVQ(DiffusersEncoder):
    """A diffusers ``VQModel``. ``latent`` chooses what is stored:

    - ``"quantized"`` (default): the code vectors each position was quantised to, flattened from
      ``(vq_embed_dim, h, w)``. Decoding snaps each position to its nearest code first (``snap``).
    - ``"onehot"``: the one-hot code assignment of every position, ``h * w * num_codes`` values
      (position-major). A dot product of two such latents counts the positions with the same
      code, so an occluded region matches nothing rather than pulling toward dark images.
      Decoding takes each position's largest entry as its code.
    - ``"continuous"``: the encoder output before quantisation (decoded like ``"quantized"``).
    """

    model_class_name = "VQModel"

    def __init__(self, *args, latent: str = "quantized", snap: bool = True, **kwargs):
        if latent not in VQ_LATENTS:
            raise ValueError(f"latent must be one of {VQ_LATENTS}, got {latent!r}")
        self.latent = latent
        self.snap = bool(snap)
        super().__init__(*args, **kwargs)
        self.num_codes = int(self.model.quantize.n_e)
        if self.latent == "onehot":
            self.name = f"{self.name}:onehot"

    def _latent_dim(self):
        positions = self.latent_shape[1] * self.latent_shape[2]
        if self.latent == "onehot":
            return positions * int(self.model.quantize.n_e)
        return positions * self.latent_shape[0]

    def _latent_grid(self, model_input):
        return self.model.encode(model_input).latents

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices ``(N, h, w)`` (int64) of images in [0, 1]; prepared like ``encode``."""
        prepared = self.prepare(images).to(self.device)
        with torch.no_grad():
            grid = self._grid(self._to_model(prepared))
            return self._nearest_codes(grid)

    def _nearest_codes(self, grid: torch.Tensor) -> torch.Tensor:
        n, dim, h, w = grid.shape
        flat = grid.permute(0, 2, 3, 1).reshape(-1, dim).float()
        codebook = self.model.quantize.embedding.weight.float()
        return torch.cdist(flat, codebook).argmin(dim=1).reshape(n, h, w)

    def _code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        vectors = self.model.quantize.embedding(codes)  # (n, h, w, dim)
        return vectors.permute(0, 3, 1, 2)

    def _position_mask(self, positions):
        if self.latent == "onehot":  # position-major: (h * w, num_codes)
            flat = positions.flatten(1)[:, :, None]
            return flat.expand(-1, -1, self.num_codes)
        return super()._position_mask(positions)

    def _encode_batch(self, images):
        grid = self._grid(self._to_model(images))
        if self.latent == "continuous":
            return grid.flatten(1)
        codes = self._nearest_codes(grid)
        if self.latent == "onehot":
            return F.one_hot(codes.flatten(1), self.num_codes).flatten(1).float()
        return self._code_vectors(codes).flatten(1)

    def _decode_batch(self, latents):
        if self.latent == "onehot":
            h, w = self.latent_shape[1:]
            codes = latents.reshape(-1, h * w, self.num_codes).argmax(dim=2).reshape(-1, h, w)
            grid = self._code_vectors(codes)
        else:
            grid = latents.to(self.dtype).reshape(-1, *self.latent_shape)
            if self.snap:
                grid = self._code_vectors(self._nearest_codes(grid))
        output = self.model.decode(grid.to(self.dtype), force_not_quantize=True).sample
        return self._from_model(output)
