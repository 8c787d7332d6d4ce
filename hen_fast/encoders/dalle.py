"""The DALL-E discrete VAE (Ramesh et al., 2021) as a HEN encoder, in plain torch.

Architecture, as the paper describes it: the encoder is a 7x7 input convolution, four groups of
residual blocks with widths 1, 2, 4 and 8 times ``width`` (max-pooling by 2 after each of the first
three), and a 1x1 convolution to ``vocab_size`` logits per position; the image is represented by
the argmax code of each position (8x downsampling). The decoder mirrors it: a 1x1 convolution from
one-hot codes to ``init_channels``, four groups with widths 8, 4, 2, 1 times ``width`` (nearest
upsampling by 2 after the first three), and a 1x1 convolution to the logit-Laplace parameters of
each pixel, whose location (through a sigmoid) is the reconstruction. Residual branches are scaled
by ``1 / (number of blocks)^2`` so the untrained network starts close to the identity path. Pixels
are squeezed into [0.1, 0.9] before encoding and stretched back after decoding.

Weights are the user's (nothing ships or downloads): a ``.safetensors`` or torch state-dict file,
with keys ``encoder.*`` and ``decoder.*`` in one file or one file each. Parameter names follow the
released model's layout (``blocks.group_1.block_1.res_path.conv_1.w`` ...), so its state dicts load
as they are; sizes are read from the weights.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .base import Encoder, _check_size

DALLE_LATENTS = ("onehot", "embedding")
PIXEL_MARGIN = 0.1  # pixels are mapped into [margin, 1 - margin] for the logit-Laplace output
GROUPS = 4
DEFAULT_CONFIG = dict(vocab_size=8192, width=256, init_channels=128, blocks_per_group=2, channels=3)


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)


class _ResidualBlock(nn.Module):
    """``id_path(x) + gain * res_path(x)``; the bottleneck has a quarter of the output width."""

    def __init__(self, n_in: int, n_out: int, total_blocks: int, kernels: tuple[int, ...]):
        super().__init__()
        hidden = max(n_out // 4, 1)
        self.gain = 1.0 / total_blocks**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hidden, hidden, hidden, n_out]
        layers = OrderedDict()
        for index, kernel in enumerate(kernels, start=1):
            layers[f"relu_{index}"] = nn.ReLU()
            layers[f"conv_{index}"] = _conv(widths[index - 1], widths[index], kernel)
        self.res_path = nn.Sequential(layers)

    def forward(self, x):
        return self.id_path(x) + self.gain * self.res_path(x)


def _groups(widths, n_first, blocks_per_group, kernels, resample):
    """``group_1 .. group_4``: residual blocks, then ``resample`` (pool/upsample) except last."""
    total = GROUPS * blocks_per_group
    groups, n_in = OrderedDict(), n_first
    for group, n_out in enumerate(widths, start=1):
        blocks = OrderedDict()
        for block in range(1, blocks_per_group + 1):
            blocks[f"block_{block}"] = _ResidualBlock(n_in, n_out, total, kernels)
            n_in = n_out
        if group < GROUPS:
            blocks[resample[0]] = resample[1]()
        groups[f"group_{group}"] = nn.Sequential(blocks)
    return groups


class DalleDVAEEncoder(nn.Module):
    def __init__(self, vocab_size, width, blocks_per_group, channels, **_):
        super().__init__()
        layers = OrderedDict(input=_conv(channels, width, 7))
        widths = [width * m for m in (1, 2, 4, 8)]
        pool = ("pool", lambda: nn.MaxPool2d(kernel_size=2))
        layers.update(_groups(widths, width, blocks_per_group, (3, 3, 3, 1), pool))
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=_conv(8 * width, vocab_size, 1))
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, x):
        return self.blocks(x)


class DalleDVAEDecoder(nn.Module):
    def __init__(self, vocab_size, width, init_channels, blocks_per_group, channels, **_):
        super().__init__()
        layers = OrderedDict(input=_conv(vocab_size, init_channels, 1))
        widths = [width * m for m in (8, 4, 2, 1)]
        upsample = ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        layers.update(_groups(widths, init_channels, blocks_per_group, (1, 3, 3, 3), upsample))
        layers["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=_conv(width, 2 * channels, 1))
        )
        self.blocks = nn.Sequential(layers)

    def forward(self, codes_or_embedding, skip_input: bool = False):
        x = codes_or_embedding
        for name, layer in self.blocks.named_children():
            if name == "input" and skip_input:
                continue
            x = layer(x)
        return x


def _read_state_dict(path) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"DALL-E dVAE weights file {path!r} not found; hen_fast never downloads weights: pass "
            "the local file(s) as weights= (or encoder_weights= and decoder_weights=)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickled module, not a state dict
        raise ValueError(
            f"{path!r} is not a state dict that loads safely (torch.load with weights_only=True "
            "failed). If it is a pickled dVAE module (encoder.pkl / decoder.pkl), save its "
            "state dict once where that module's package is installed: "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'encoder.pt')"
        ) from error
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return state


def _rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released model calls a convolution's parameters ``w`` and ``b``."""
    renamed = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        leaf = {"w": "weight", "b": "bias"}.get(leaf, leaf)
        renamed[f"{head}.{leaf}" if head else leaf] = value
    return renamed


def _config_from_weights(encoder_state, decoder_state) -> dict:
    blocks = {k.split(".")[2] for k in encoder_state if k.startswith("blocks.group_1.block_")}
    return dict(
        vocab_size=encoder_state["blocks.output.conv.weight"].shape[0],
        width=encoder_state["blocks.input.weight"].shape[0],
        channels=encoder_state["blocks.input.weight"].shape[1],
        init_channels=decoder_state["blocks.input.weight"].shape[0],
        blocks_per_group=len(blocks),
    )


class DalleEncoder(Encoder):
    """The DALL-E dVAE. ``latent`` chooses what is stored:

    - ``"onehot"`` (default): the one-hot code of each of the ``(H/8) * (W/8)`` positions,
      position-major (``positions * vocab_size`` values); a dot product counts matching codes.
      Decoding takes each position's largest entry as its code.
    - ``"embedding"``: each position's code as the decoder's input embedding (``init_channels``
      values per position, far fewer); decoding snaps each position to the nearest code embedding
      (``snap=False`` decodes the vector as it is, e.g. a mixture of codes).

    Build it from ``weights=`` (one file with ``encoder.*``/``decoder.*`` keys) or
    ``encoder_weights=`` + ``decoder_weights=``, or with random weights from ``config=``
    (keys of ``DEFAULT_CONFIG``). ``image_size`` must be a multiple of 8 (default 64).
    """

    def __init__(
        self,
        weights=None,
        *,
        encoder_weights=None,
        decoder_weights=None,
        config: dict | None = None,
        image_size: int | tuple[int, int] = 64,
        latent: str = "onehot",
        snap: bool = True,
        device="cpu",
        seed: int = 0,
        name: str = "dalle",
        recommended: dict | None = None,
    ):
        if latent not in DALLE_LATENTS:
            raise ValueError(f"latent must be one of {DALLE_LATENTS}, got {latent!r}")
        self.image_size = _check_size(image_size)
        if any(s % 8 for s in self.image_size):
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        from_files = (
            weights is not None or encoder_weights is not None or decoder_weights is not None
        )
        if from_files == (config is not None):
            raise ValueError(
                "pass the dVAE weights (weights=, or encoder_weights= and decoder_weights=) or a "
                "config= for random weights, not both and not neither"
            )
        if from_files:
            encoder_state, decoder_state = self._read_weights(
                weights, encoder_weights, decoder_weights
            )
            config = _config_from_weights(encoder_state, decoder_state)
        else:
            if not isinstance(config, dict):
                raise TypeError(f"config must be a dict, got {type(config).__name__}")
            unknown = set(config) - set(DEFAULT_CONFIG)
            if unknown:
                raise ValueError(f"unknown config keys {sorted(unknown)}; known: {DEFAULT_CONFIG}")
            config = {**DEFAULT_CONFIG, **config}
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder_net = DalleDVAEEncoder(**config)
            self.decoder_net = DalleDVAEDecoder(**config)
        if from_files:
            self.encoder_net.load_state_dict(encoder_state, strict=True)
            self.decoder_net.load_state_dict(decoder_state, strict=True)
        self.device = torch.device(device)
        for net in (self.encoder_net, self.decoder_net):
            net.to(self.device).eval().requires_grad_(False)
        self.channels = config["channels"]
        self.vocab_size = config["vocab_size"]
        self.latent = latent
        self.snap = bool(snap)
        self.grid = (self.image_size[0] // 8, self.image_size[1] // 8)
        per_position = self.vocab_size if latent == "onehot" else config["init_channels"]
        self.latent_dim = self.grid[0] * self.grid[1] * per_position
        self.name = name if latent == "onehot" else f"{name}:{latent}"
        self.recommended = dict(recommended or {})

    @staticmethod
    def _read_weights(weights, encoder_weights, decoder_weights):
        if weights is not None:
            if encoder_weights is not None or decoder_weights is not None:
                raise ValueError("pass weights= or encoder_weights= + decoder_weights=, not both")
            state = _rename(_read_state_dict(weights))
            parts = {
                part: {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
                for part in ("encoder", "decoder")
            }
            if not parts["encoder"] or not parts["decoder"]:
                raise ValueError(
                    f"{weights!r} must hold keys starting with 'encoder.' and 'decoder.'"
                )
            return parts["encoder"], parts["decoder"]
        if encoder_weights is None or decoder_weights is None:
            raise ValueError("pass both encoder_weights= and decoder_weights=")
        return _rename(_read_state_dict(encoder_weights)), _rename(
            _read_state_dict(decoder_weights)
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both networks' weights under ``encoder.`` and ``decoder.`` (what ``weights=`` loads)."""
        state = {f"encoder.{k}": v for k, v in self.encoder_net.state_dict().items()}
        state.update({f"decoder.{k}": v for k, v in self.decoder_net.state_dict().items()})
        return state

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices ``(N, H/8, W/8)`` int64 of images in [0, 1] (prepared like ``encode``)."""
        prepared = self.prepare(images).to(self.device)
        with torch.no_grad():
            return self._codes(prepared)

    def _codes(self, images):
        squeezed = (1 - 2 * PIXEL_MARGIN) * images + PIXEL_MARGIN
        return self.encoder_net(squeezed).argmax(dim=1)

    def _embedding_table(self) -> torch.Tensor:
        """(vocab_size, init_channels): what the decoder's input conv makes of each code."""
        return self.decoder_net.blocks.input.weight[:, :, 0, 0].T

    def _encode_batch(self, images):
        codes = self._codes(images).flatten(1)  # (n, positions)
        if self.latent == "onehot":
            return F.one_hot(codes, self.vocab_size).flatten(1).float()
        return self._embedding_table()[codes].flatten(1)

    def _decode_batch(self, latents):
        n, (h, w) = latents.shape[0], self.grid
        table = self._embedding_table()
        if self.latent == "onehot":
            codes = latents.reshape(n, h * w, self.vocab_size).argmax(dim=2)
            embedded = table[codes]
        else:
            embedded = latents.reshape(n, h * w, table.shape[1])
            if self.snap:
                embedded = table[torch.cdist(embedded, table[None].expand(n, -1, -1)).argmin(2)]
        bias = self.decoder_net.blocks.input.bias
        grid = (embedded + bias).permute(0, 2, 1).reshape(n, -1, h, w)
        stats = self.decoder_net(grid, skip_input=True)
        location = torch.sigmoid(stats[:, : self.channels])
        return ((location - PIXEL_MARGIN) / (1 - 2 * PIXEL_MARGIN)).clamp(0.0, 1.0)
