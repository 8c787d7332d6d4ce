"""How well a memory recalled what it stored: image errors, identity, degeneracy, separability.

Every per-image measure returns one value per image (shape ``(N,)``); average it yourself. Images
are ``(N, C, H, W)`` in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extras import require


def _check_pair(recalled: Tensor, truth: Tensor) -> None:
    for name, tensor in (("recalled", recalled), ("truth", truth)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if recalled.shape != truth.shape:
        raise ValueError(
            f"recalled and truth must have one shape, got {tuple(recalled.shape)} and "
            f"{tuple(truth.shape)}"
        )
    if recalled.dim() < 2 or recalled.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, ...), got {tuple(recalled.shape)}")


def mse(recalled: Tensor, truth: Tensor) -> Tensor:
    """Mean squared error per image: ``mean((recalled - truth)^2)`` over all but the first dim."""
    _check_pair(recalled, truth)
    return (recalled.double() - truth.double()).pow(2).flatten(1).mean(1).float()


def ssim_window(height: int, width: int, largest: int = 11) -> int:
    """The Gaussian window for SSIM: 11 (the usual one) or the largest odd size that fits the
    image, so small images (8x8 digits: 7) are filtered in both directions instead of skipped."""
    size = min(largest, height, width)
    size -= 1 - size % 2
    if size < 1:
        raise ValueError(f"images of {height}x{width} are too small for SSIM")
    return size


def one_minus_ssim(recalled: Tensor, truth: Tensor, data_range: float = 1.0) -> Tensor:
    """``1 - SSIM`` per image (``pytorch_msssim.ssim`` with Gaussian window of sigma 1.5, averaged
    over channels); 0 for identical images, up to 2 for anti-correlated ones. Images must be
    ``(N, C, H, W)``; the window shrinks to fit small images (:func:`ssim_window`)."""
    ssim = require("pytorch_msssim", "hen").ssim
    _check_pair(recalled, truth)
    if recalled.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(recalled.shape)}")
    size = ssim_window(*recalled.shape[-2:])
    # The package builds its Gaussian window in float32; in float64 the measure is exact to
    # ~1e-12 (float32 windows shift SSIM of flat images by ~1e-5).
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    window = torch.exp(-(offsets**2) / (2 * 1.5**2))
    window = (window / window.sum()).reshape(1, 1, 1, size).repeat(recalled.shape[1], 1, 1, 1)
    value = ssim(
        recalled.double(), truth.double(), data_range=data_range, size_average=False, win=window
    )
    return (1.0 - value).float()


def nearest_identity(recalled: Tensor, stored: Tensor, chunk: int = 1024) -> Tensor:
    """Index of the stored image nearest (Euclidean) to each recalled one: the identity a viewer
    would give the recall. ``(N,)`` int64."""
    _check_pair(recalled[:1], stored[:1])
    flat_stored = stored.flatten(1).float()
    stored_sq = flat_stored.pow(2).sum(1)
    out = []
    for block in recalled.flatten(1).float().split(chunk):
        distance = stored_sq - 2 * block @ flat_stored.T  # + ||block||^2, constant per row
        out.append(distance.argmin(1))
    return torch.cat(out)


def exact_recall(predicted: Tensor, expected: Tensor) -> float:
    """Fraction of queries whose recalled identity (a memory index) is the expected one."""
    if predicted.shape != expected.shape or predicted.dim() != 1 or predicted.numel() == 0:
        raise ValueError(
            f"predicted and expected must be non-empty (N,) index tensors of one shape, got "
            f"{tuple(predicted.shape)} and {tuple(expected.shape)}"
        )
    return (predicted == expected).double().mean().item()


def relative_rank(states: Tensor, memories: Tensor, rtol: float = 1e-4) -> float:
    """Numerical rank of the recovered state matrix over that of the memory bank (Appendix C):
    below 1 means several queries converged to the same (degenerate, meta-stable) state. Singular
    values under ``rtol`` times the largest one count as zero."""

    def rank(matrix: Tensor) -> int:
        values = torch.linalg.svdvals(matrix.flatten(1).double())
        return int((values > rtol * values.max()).sum()) if values.numel() else 0

    memory_rank = rank(memories)
    if memory_rank == 0:
        raise ValueError("memories has rank 0: relative rank is undefined")
    return rank(states) / memory_rank


def relative_rank_over_steps(
    queries: Tensor, memories: Tensor, steps: int, *, rtol: float = 1e-4, **retrieve_kwargs
) -> list[float]:
    """Relative rank (:func:`relative_rank`) of the states after each of ``steps`` updates of
    :func:`hen_fast.retrieve` (one update at a time from the previous state; keyword arguments go
    to ``retrieve``). Entry 0 is the queries themselves."""
    from .api import retrieve

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ranks = [relative_rank(queries, memories, rtol)]
    state = queries
    for _ in range(steps):
        state = retrieve(state, memories, steps=1, **retrieve_kwargs)
        ranks.append(relative_rank(state, memories, rtol))
    return ranks


def cosine_similarities(queries: Tensor, memories: Tensor) -> tuple[Tensor, Tensor]:
    """Separability (Fig. 3): cosine similarity of query ``i`` with its own memory ``i`` (``self``,
    ``(N,)``) and with every other memory (``cross``, ``(N * (M - 1),)``). Query ``i`` belongs to
    memory ``i``, so ``N <= M``. Well separated patterns have ``self`` near 1 and ``cross`` low."""
    if queries.dim() != 2 or memories.dim() != 2 or queries.shape[1] != memories.shape[1]:
        raise ValueError(
            f"queries (N, d) and memories (M, d) must share d, got {tuple(queries.shape)} and "
            f"{tuple(memories.shape)}"
        )
    if queries.shape[0] > memories.shape[0]:
        raise ValueError("query i belongs to memory i: need no more queries than memories")
    unit_q = torch.nn.functional.normalize(queries.double(), dim=1)
    unit_m = torch.nn.functional.normalize(memories.double(), dim=1)
    cosine = unit_q @ unit_m.T
    own = torch.zeros_like(cosine, dtype=torch.bool)
    own[torch.arange(queries.shape[0]), torch.arange(queries.shape[0])] = True
    return cosine[own].float(), cosine[~own].float()


def similarity_histograms(queries: Tensor, memories: Tensor, bins: int = 50) -> dict:
    """Histograms of :func:`cosine_similarities` on shared bins over [-1, 1], each normalised to
    sum 1, and their overlap (sum of the bin-wise minimum; 0 = perfectly separated, 1 = the same
    distribution)."""
    own, cross = cosine_similarities(queries, memories)
    edges = torch.linspace(-1.0, 1.0, bins + 1)
    self_hist = torch.histc(own.clamp(-1, 1), bins, -1.0, 1.0)
    cross_hist = torch.histc(cross.clamp(-1, 1), bins, -1.0, 1.0)
    self_hist = self_hist / self_hist.sum().clamp(min=1)
    cross_hist = cross_hist / cross_hist.sum().clamp(min=1)
    return {
        "edges": edges,
        "self": self_hist,
        "cross": cross_hist,
        "overlap": float(torch.minimum(self_hist, cross_hist).sum()),
        "self_mean": float(own.mean()),
        "cross_mean": float(cross.mean()) if cross.numel() else float("nan"),
    }


def support_size(weights: Tensor, threshold: float = 0.0) -> Tensor:
    """Memories each query leaned on: entries of its weight row ``(N, M)`` above ``threshold``
    (``retrieve(..., return_info=True)`` reports the same count as ``info.support``)."""
    if weights.dim() != 2:
        raise ValueError(f"weights must have shape (N, M), got {tuple(weights.shape)}")
    return (weights > threshold).sum(1)
