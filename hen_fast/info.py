"""The per-query diagnostics that ``retrieve(..., return_info=True)`` returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RetrieveInfo:
    """What each query's last update looked like.

    Every field has one entry per query (shape ``(B,)``), or is a 0-d tensor when ``retrieve`` was
    given a single ``(d,)`` query.

    Attributes:
        steps: updates applied to the query (``<= steps``; fewer when ``tol`` stopped it early).
        support: memories with a non-zero weight in the last update: ``p > 0`` for sparsemax and
            entmax, ``p > 1e-6`` for softmax, ``beta * score > 0`` for polynomial (0 when a query's
            scores are all ``<= 0``).
        argmax: index of the memory with the highest similarity in the last update (first on ties).
        lse: the smooth maximum of the scaled scores ``z = beta * sim`` in the last update, the
            quantity the Hopfield energy is built from (``E(x) = 0.5 ||x||^2 - lse / beta`` for
            ``dot``): ``log sum exp z`` for softmax; the conjugate ``<p, z> + H_alpha(p)`` with the
            Tsallis entropy ``H_alpha(p) = (1 - sum p^alpha) / (alpha (alpha - 1))`` for sparsemax
            (alpha 2) and entmax, which tends to ``log sum exp z`` as alpha -> 1;
            ``log sum relu(z)^degree`` for polynomial (``-inf`` for an all-non-positive row).
            Scores are the true similarities, ``-||x - k||^2`` for ``l2``, not the shifted form the
            kernels use. Floating point (float64 when any input was float64, else float32).
    """

    steps: torch.Tensor
    support: torch.Tensor
    argmax: torch.Tensor
    lse: torch.Tensor

    def squeeze(self) -> RetrieveInfo:
        """The same info for a single query, each field a 0-d tensor."""
        return RetrieveInfo(*(field.squeeze(0) for field in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.steps, self.support, self.argmax, self.lse)
