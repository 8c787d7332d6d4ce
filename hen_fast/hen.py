"""Hopfield Encoding Networks: store autoencoder latents in a modern Hopfield network, retrieve in
latent space, decode. Auto-association (:class:`HopfieldEncodingNetwork`) and image recall by
caption (:class:`HeteroAssociativeNetwork`).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .api import retrieve
from .codes import SEPARATIONS, SIMILARITIES
from .info import RetrieveInfo
from .options import check_real

# What a network uses when neither the caller nor the encoder's ``recommended`` says.
FALLBACK = {"beta": 1.0, "similarity": "dot", "separation": "softmax", "steps": 1}
# Hetero-association compares unit-norm image and text parts (scores in [-2, 2]), so it needs a
# sharper beta than pixel spaces; measured by ``hen-fast hen-hetero`` (README results).
HETERO_DEFAULTS = {"beta": 40.0, "similarity": "dot", "separation": "softmax", "steps": 3}


def _load_encoder(encoder, device):
    from . import encoders

    if isinstance(encoder, str):
        return encoders.load(encoder, device=device)
    if not isinstance(encoder, encoders.Encoder):
        raise TypeError(
            f"encoder must be a hen_fast.encoders.Encoder or a name from encoders.available(), "
            f"got {type(encoder).__name__}"
        )
    return encoder


def _settings(explicit: dict, recommended: dict) -> dict:
    """Each retrieval setting from the caller, else the encoder's recommendation, else FALLBACK;
    checked here so a bad one fails at construction, not at the first recall."""
    settings = {}
    for key, fallback in FALLBACK.items():
        value = explicit.get(key)
        settings[key] = value if value is not None else recommended.get(key, fallback)
    settings["beta"] = check_real("beta", settings["beta"], positive=True)
    if settings["similarity"] not in SIMILARITIES:
        raise ValueError(
            f"similarity must be one of {SIMILARITIES}, got {settings['similarity']!r}"
        )
    if settings["separation"] not in SEPARATIONS:
        raise ValueError(f"separation must be one of {SEPARATIONS}, got {settings['separation']!r}")
    settings["steps"] = _check_steps(settings["steps"])
    return settings


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return int(steps)


class HopfieldEncodingNetwork:
    """A modern Hopfield network over an encoder's latents (HEN).

    ``store(images)`` encodes images and appends their latents to the memory bank; ``recall(cues)``
    encodes the cues, runs ``steps`` Hopfield updates ``z <- Sep(beta * sim(Z, z)) Z`` in latent
    space (:func:`hen_fast.retrieve`) and decodes. With the ``identity`` encoder this is a plain
    modern Hopfield network on pixels, the baseline HEN is measured against.

    Args:
        encoder: an :class:`hen_fast.encoders.Encoder`, or a name for ``encoders.load``.
        beta, similarity, separation, steps: retrieval settings; each None takes the encoder's
            ``recommended`` value (its measured best setting), else beta 1, ``"dot"``,
            ``"softmax"``, 1 step.
        backend: the :func:`hen_fast.retrieve` backend.
        alpha: the entmax parameter (``separation="entmax"``).
        batch_size: images per encoder/decoder batch.
        progress: progress bars while encoding/decoding (None: when the work is long and stderr is
            a terminal).
        device: where ``encoder`` is loaded when given by name.

    Cues are images like the stored ones, converted and resized by the encoder. With
    ``known`` (a boolean mask of the cue pixels that are real, e.g. the visible part of an
    occluded image) recall is occlusion-aware: memories are scored over the latent coordinates
    that the known pixels determine (:meth:`recall`).
    """

    def __init__(
        self,
        encoder="identity",
        beta: float | None = None,
        similarity: str | None = None,
        separation: str | None = None,
        steps: int | None = None,
        backend: str = "auto",
        *,
        alpha: float = 1.5,
        batch_size: int = 256,
        progress: bool | None = None,
        device="cpu",
    ):
        self.encoder = _load_encoder(encoder, device)
        explicit = dict(beta=beta, similarity=similarity, separation=separation, steps=steps)
        settings = _settings(explicit, getattr(self.encoder, "recommended", {}) or {})
        self.beta, self.similarity = settings["beta"], settings["similarity"]
        self.separation, self.steps = settings["separation"], settings["steps"]
        self.alpha, self.backend = alpha, backend
        self.batch_size, self.progress = batch_size, progress
        self._latents = torch.empty(0, self.encoder.latent_dim, device=self.encoder.device)

    # -- memory --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._latents.shape[0]

    @property
    def latents(self) -> Tensor:
        """The stored latents ``(len(self), latent_dim)`` (read-only view)."""
        return self._latents

    def store(self, images: Tensor) -> range:
        """Encode ``images`` (N, C, H, W) in [0, 1] and append them; returns their memory indices.
        The whole batch is checked and encoded before anything is appended, so a bad batch
        (wrong rank or channels, values outside [0, 1], NaN) raises and leaves the network as it
        was."""
        from .encoders import check_images

        check_images(images)
        if images.shape[0] == 0:
            raise ValueError("images is empty: nothing to store")
        latents = self._encode(images)
        if not bool(torch.isfinite(latents).all()):
            raise ValueError(f"encoder {self.encoder.name!r} produced NaN or Inf latents")
        start = len(self)
        self._latents = torch.cat([self._latents, latents])
        return range(start, len(self))

    # -- recall --------------------------------------------------------------------------------
    def recall(self, cues: Tensor, known: Tensor | None = None, steps: int | None = None) -> Tensor:
        """Images ``(N, channels, *image_size)`` recalled from ``cues`` (N, C, H, W) in [0, 1].

        ``known``: optional boolean mask broadcastable to ``cues``, True where the cue's pixel is
        real; hidden pixels are never read (the encoder sees zeros there). Memories are then
        scored over the latent coordinates the known pixels determine,
        ``encoder.latent_mask(known)`` (``retrieve``'s ``score_mask``: exact, in the fused
        kernels): raw pixels, the known pixels themselves; a tiled spatial encoder, the latent
        positions of the fully known tiles (exact); an untiled one, the positions whose own
        block of pixels is known (close: such models mix the whole image into every position).
        The masked score does not change once those coordinates are held, so this is one update
        whatever ``steps`` says. A cue that determines no coordinate is scored on all of them.
        Encoders whose latents are not spatial (``latent_mask`` None) instead decode after every
        update, put the known pixels back, and re-encode, for ``steps`` updates."""
        latents, _ = self._recall_latents(cues, known, steps)
        return self.encoder.decode(latents, batch_size=self.batch_size, progress=self.progress)

    def recall_indices(
        self, cues: Tensor, known: Tensor | None = None, steps: int | None = None
    ) -> Tensor:
        """``(N,)`` index of the memory most similar to each cue's final state (the argmax of the
        last update's scores): which stored image the network recalled."""
        _, info = self._recall_latents(cues, known, steps)
        return info.argmax

    def recall_state(
        self, cues: Tensor, known: Tensor | None = None, steps: int | None = None
    ) -> tuple[Tensor, RetrieveInfo]:
        """The final latent states ``(N, latent_dim)`` (before decoding) and the last update's
        :class:`~hen_fast.RetrieveInfo`: what :meth:`recall` decodes and :meth:`recall_indices`
        reads, from one pass."""
        return self._recall_latents(cues, known, steps)

    def _retrieve(self, queries: Tensor, memories: Tensor, *, steps=1, score_mask=None):
        return retrieve(
            queries,
            memories,
            beta=self.beta,
            similarity=self.similarity,
            separation=self.separation,
            alpha=self.alpha,
            steps=steps,
            score_mask=score_mask,
            backend=self.backend,
            return_info=True,
        )

    def _encode(self, images: Tensor) -> Tensor:
        return self.encoder.encode(images, batch_size=self.batch_size, progress=self.progress)

    def _recall_latents(self, cues, known, steps):
        from .encoders import check_images

        steps = self.steps if steps is None else _check_steps(steps)
        check_images(cues, "cues")
        if len(self) == 0:
            raise ValueError("the network is empty: store images before recalling")
        if cues.shape[0] == 0:
            raise ValueError("cues is empty")
        if known is None:
            return self._retrieve(self._encode(cues), self._latents, steps=steps)
        known = self._prepare_known(known, cues)
        # Hidden pixels are never read: whatever the cue holds there, the encoder sees zeros.
        prepared = torch.where(known, self.encoder.prepare(cues).to(self.encoder.device), 0.0)
        latents = self._encode(prepared)
        latent_mask = self.encoder.latent_mask(known[:, 0])
        if latent_mask is not None:
            # A cue whose known pixels determine no latent coordinate is scored on them all.
            latent_mask = latent_mask | ~latent_mask.any(1, keepdim=True)
            return self._retrieve(latents, self._latents, score_mask=latent_mask)
        for step in range(steps):
            latents, info = self._retrieve(latents, self._latents)
            if step + 1 < steps:
                decoded = self.encoder.decode(latents, batch_size=self.batch_size, progress=False)
                latents = self._encode(torch.where(known, prepared, decoded))
        return latents, info

    def _prepare_known(self, known, cues) -> Tensor:
        """The known mask at the encoder's channels and size: a pixel is known when every channel
        of it is, and after resizing when everything it averages over is."""
        from .encoders import resize

        if not isinstance(known, Tensor) or known.dtype != torch.bool:
            raise TypeError("known must be a bool tensor (True where the cue's pixel is real)")
        try:
            known = known.broadcast_to(cues.shape)
        except RuntimeError:
            raise ValueError(
                f"known of shape {tuple(known.shape)} does not broadcast to the cues' shape "
                f"{tuple(cues.shape)}"
            ) from None
        fraction = resize(known.float().amin(1, keepdim=True), self.encoder.image_size)
        mask = fraction >= 1.0 - 1e-6
        return mask.expand(-1, self.encoder.channels, -1, -1).to(self.encoder.device)


class HeteroAssociativeNetwork:
    """Images stored with captions; recall an image from its caption alone.

    Each memory is ``concat(a * image_latent, b * text_embedding)``; a query is
    ``concat(zeros, b * text_embedding)``. The scales ``a`` and ``b`` make both parts' rows unit
    norm on average (fixed by the first ``store``), so neither the image part nor the text part
    dominates the similarity. With ``clamp`` the text part of the query is held during the
    updates (``retrieve``'s ``clamp_mask``); the image part of the final state is decoded.

    Args:
        encoder: the image encoder (an Encoder or a name).
        text_encoder: an object with ``encode(list[str]) -> (N, D)``, or a name for
            ``encoders.load_text`` (``"minilm"``, ``"clip"``, ``"pixel-hash"``, which draws each
            caption's SHA-256 as an image and passes it through ``encoder``).
        beta, similarity, separation, steps: retrieval settings (defaults ``HETERO_DEFAULTS``).
        clamp: hold the text part of the query fixed over the updates.
    """

    def __init__(
        self,
        encoder="identity",
        text_encoder="minilm",
        beta: float | None = None,
        similarity: str | None = None,
        separation: str | None = None,
        steps: int | None = None,
        backend: str = "auto",
        *,
        clamp: bool = True,
        alpha: float = 1.5,
        batch_size: int = 256,
        progress: bool | None = None,
        device="cpu",
    ):
        self.images = HopfieldEncodingNetwork(
            encoder,
            beta=1.0,
            similarity="dot",
            separation="softmax",
            steps=1,
            backend=backend,
            batch_size=batch_size,
            progress=progress,
            device=device,
        )
        self.encoder = self.images.encoder
        if isinstance(text_encoder, str):
            from .encoders import load_text

            options = {"image_encoder": self.encoder} if text_encoder == "pixel-hash" else {}
            text_encoder = load_text(text_encoder, device=device, **options)
        if not callable(getattr(text_encoder, "encode", None)):
            raise TypeError("text_encoder must have encode(list[str]) -> (N, D), or be a name")
        self.text_encoder = text_encoder
        explicit = dict(beta=beta, similarity=similarity, separation=separation, steps=steps)
        settings = _settings(explicit, HETERO_DEFAULTS)
        self.beta, self.similarity = settings["beta"], settings["similarity"]
        self.separation, self.steps = settings["separation"], settings["steps"]
        if not isinstance(clamp, bool):
            raise TypeError(f"clamp must be a bool, got {type(clamp).__name__}")
        self.clamp, self.alpha, self.backend = clamp, alpha, backend
        self.image_scale: float | None = None
        self.text_scale: float | None = None
        self._memories: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self._memories is None else self._memories.shape[0]

    @property
    def memories(self) -> Tensor:
        """The stored ``concat(a * image latent, b * text embedding)`` rows."""
        if self._memories is None:
            return torch.empty(0, self.encoder.latent_dim)
        return self._memories

    def store(self, images: Tensor, captions) -> range:
        """Append images (N, C, H, W) in [0, 1] with one caption each; returns their indices.
        Everything is checked and encoded before anything is stored."""
        from .encoders import check_images

        check_images(images)
        captions = _check_captions(captions, images.shape[0])
        image_part = self.images._encode(images)
        text_part = self._embed(captions)
        if not (torch.isfinite(image_part).all() and torch.isfinite(text_part).all()):
            raise ValueError("the encoders produced NaN or Inf")
        image_scale = self.image_scale or 1.0 / _mean_norm(image_part)
        text_scale = self.text_scale or 1.0 / _mean_norm(text_part)
        rows = torch.cat([image_scale * image_part, text_scale * text_part], 1)
        self.image_scale, self.text_scale = image_scale, text_scale
        start = len(self)
        self._memories = rows if self._memories is None else torch.cat([self._memories, rows])
        return range(start, len(self))

    def recall(self, captions) -> Tensor:
        """Images ``(N, channels, *image_size)`` recalled from captions alone."""
        return self.recall_with_indices(captions)[0]

    def recall_indices(self, captions) -> Tensor:
        """``(N,)`` index of the memory each caption's final state is most similar to."""
        return self._recall_state(captions)[1].argmax

    def recall_with_indices(self, captions) -> tuple[Tensor, Tensor]:
        """``recall`` and ``recall_indices`` from one pass (captions embedded once)."""
        state, info = self._recall_state(captions)
        latents = state[:, : self.encoder.latent_dim] / self.image_scale
        images = self.encoder.decode(latents, batch_size=self.images.batch_size, progress=False)
        return images, info.argmax

    def _embed(self, captions: list[str]) -> Tensor:
        embedded = self.text_encoder.encode(captions)
        embedded = torch.as_tensor(embedded, dtype=torch.float32).to(self.encoder.device)
        if embedded.dim() != 2 or embedded.shape[0] != len(captions):
            raise ValueError(
                f"text_encoder returned shape {tuple(embedded.shape)} for {len(captions)} captions"
            )
        return embedded

    def _recall_state(self, captions):
        if len(self) == 0:
            raise ValueError("the network is empty: store images with captions before recalling")
        captions = _check_captions(captions)
        text = self.text_scale * self._embed(captions)
        image_dim = self.encoder.latent_dim
        queries = torch.cat([text.new_zeros(text.shape[0], image_dim), text], 1)
        clamp_mask = None
        if self.clamp:
            clamp_mask = torch.zeros(queries.shape[1], dtype=torch.bool, device=queries.device)
            clamp_mask[image_dim:] = True
        return retrieve(
            queries,
            self._memories,
            beta=self.beta,
            similarity=self.similarity,
            separation=self.separation,
            alpha=self.alpha,
            steps=self.steps,
            clamp_mask=clamp_mask,
            backend=self.backend,
            return_info=True,
        )


def _mean_norm(rows: Tensor) -> float:
    norm = float(rows.norm(dim=1).mean())
    if norm == 0.0:
        raise ValueError("the first stored batch's latents (or embeddings) are all zero")
    return norm


def _check_captions(captions, count: int | None = None) -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise TypeError(f"captions must be a list of str, got {type(captions).__name__}")
    if not captions:
        raise ValueError("captions is empty")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{index}] must be a str, got {type(caption).__name__}")
    if count is not None and len(captions) != count:
        raise ValueError(f"got {len(captions)} captions for {count} images: need one per image")
    return list(captions)
