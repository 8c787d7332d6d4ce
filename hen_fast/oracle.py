"""The independent float64 oracle every backend is tested against.

Deliberately plain: it materialises every score and pairwise difference in float64 and finds sparse
thresholds by a 200-step bisection. It shares no code with what it checks (it imports torch and
the result container only), so an error in the shared numerics cannot hide in both sides of a test.
Small problems only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .info import RetrieveInfo

# The contract's definitions, restated here rather than imported (see the module docstring).
_SOFTMAX_SUPPORT_EPS = 1e-6
_ALPHA = {"softmax": 1.0, "sparsemax": 2.0}


def naive_scores(queries: Tensor, keys: Tensor, similarity: str) -> Tensor:
    """True similarities in float64 from explicit pairwise differences (B x M x d in memory)."""
    queries, keys = queries.double(), keys.double()
    if similarity == "dot":
        return queries @ keys.T
    diff = queries[:, None, :] - keys[None, :, :]
    if similarity == "l2":
        return -(diff * diff).sum(dim=-1)
    if similarity == "manhattan":
        return -diff.abs().sum(dim=-1)
    raise ValueError(f"unknown similarity {similarity!r}")


def naive_separation(z: Tensor, separation: str, alpha: float = 1.5, degree: float = 10) -> Tensor:
    """Weights over the last dimension of float64 scaled scores ``z``.

    Sparse thresholds by 200 bisection steps between ``max - 1`` and ``max - M^(1-alpha)``, on the
    scores minus their row maximum (else ``max - 1 == max`` once the scores pass ~1e16).
    """
    z = z.double()
    if separation == "softmax":
        return torch.softmax(z, dim=-1)
    if separation == "polynomial":
        rectified = torch.relu(z)
        top = rectified.max(dim=-1, keepdim=True).values
        weights = (rectified / torch.where(top > 0, top, torch.ones_like(top))) ** degree
        total = weights.sum(dim=-1, keepdim=True)
        return torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 0.0)
    a = _ALPHA.get(separation, alpha)
    x = (a - 1.0) * (z - z.max(dim=-1, keepdim=True).values)
    q = 1.0 / (a - 1.0)
    lo = torch.full_like(x[..., :1], -1.0)
    hi = torch.full_like(lo, -(z.shape[-1] ** (1.0 - a)))
    for _ in range(200):
        mid = (lo + hi) / 2
        mass = (torch.relu(x - mid) ** q).sum(dim=-1, keepdim=True)
        lo, hi = torch.where(mass >= 1, mid, lo), torch.where(mass >= 1, hi, mid)
    p = torch.relu(x - lo) ** q
    return p / p.sum(dim=-1, keepdim=True)


def naive_masked_scores(x: Tensor, keys: Tensor, similarity: str, mask: Tensor) -> Tensor:
    """(B, M) similarities summing only the terms of the coordinates ``mask`` (B, d) holds."""
    if similarity == "dot":
        terms = x[:, None, :] * keys[None, :, :]
    elif similarity == "l2":
        terms = -((x[:, None, :] - keys[None, :, :]) ** 2)
    else:
        terms = -(x[:, None, :] - keys[None, :, :]).abs()
    # where, not a product: a term outside the mask is 0 even when it is inf or nan.
    return torch.where(mask[:, None, :], terms, 0.0).sum(2)


def naive_info(
    scores: Tensor, p: Tensor, beta: float, separation: str, alpha: float = 1.5, degree: float = 10
) -> tuple[Tensor, Tensor, Tensor]:
    """(support, argmax, lse) of one update from its float64 true scores and weights."""
    z = beta * scores
    if separation == "softmax":
        return (p > _SOFTMAX_SUPPORT_EPS).sum(1), scores.argmax(1), torch.logsumexp(z, dim=1)
    if separation == "polynomial":
        return (
            (z > 0).sum(1),
            scores.argmax(1),
            torch.logsumexp(degree * torch.log(torch.relu(z)), 1),
        )
    a = _ALPHA.get(separation, alpha)
    tsallis = (1.0 - (p**a).sum(1)) / (a * (a - 1.0))
    return (p > 0).sum(1), scores.argmax(1), (p * z).sum(1) + tsallis


def naive_retrieve(queries: Tensor, memories: Tensor, values: Tensor | None = None, *,
                   beta: float = 1.0, similarity: str = "dot", separation: str = "softmax",
                   alpha: float = 1.5, degree: float = 10, steps: int = 1,
                   tol: float | None = None, clamp_mask: Tensor | None = None,
                   score_mask: Tensor | None = None, return_info: bool = False):  # fmt: skip
    """The float64 output of :func:`hen_fast.retrieve` computed the plain way (small inputs only),
    with the :class:`RetrieveInfo` as well when ``return_info``. ``score_mask``: each term of the
    similarity kept or dropped by the query's mask, every query against every memory at once."""
    keys = memories.double()
    values = keys if values is None else values.double()
    x0 = queries.double()
    x = x0
    rows = x.shape[0]
    moving = torch.ones(rows, dtype=torch.bool, device=x.device)
    info = [
        torch.zeros(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.float64),
    ]
    mask = None if score_mask is None else score_mask.to(x.device).broadcast_to(x.shape)
    for _ in range(steps):
        if mask is None:
            scores = naive_scores(x, keys, similarity)
        else:
            scores = naive_masked_scores(x, keys, similarity, mask)
        p = naive_separation(beta * scores, separation, alpha, degree)
        new = p @ values
        if clamp_mask is not None:
            new = torch.where(clamp_mask.to(x.device), x0, new)
        step_info = (info[0] + 1, *naive_info(scores, p, beta, separation, alpha, degree))
        info = [torch.where(moving, now, before) for now, before in zip(step_info, info)]
        if tol is not None and steps > 1:
            new = torch.where(moving[:, None], new, x)
            moving = moving & (torch.linalg.vector_norm(new - x, dim=1) > tol)
        x = new
    return (x, RetrieveInfo(*info)) if return_info else x


SEPARATION_REDUCTIONS = ("average", "max")


def naive_separation_loss(
    features: Tensor, t: float = 2.0, reduction: str = "average", dtype=torch.float64
) -> Tensor:
    """U-Hop's separation loss of the rows of ``features`` (M, D) by ``torch.pdist``, in ``dtype``.

    ``"average"``: ``log mean_{u != v} exp(-t ||z_u - z_v||^2)`` over the M (M - 1) ordered pairs
    (each unordered pair twice, which the mean does not see); ``"max"`` (Appendix G.2):
    ``max_{u != v} -t ||z_u - z_v||^2``, the log-kernel of the closest pair. Differentiable.
    """
    num_rows = features.shape[0]
    log_kernel = -t * torch.pdist(features.to(dtype)) ** 2
    if reduction == "max":
        return log_kernel.max()
    return torch.logsumexp(log_kernel, dim=0) - math.log(num_rows * (num_rows - 1) / 2)
