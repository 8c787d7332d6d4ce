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
        fraction_read: the fraction of the bank's memories scored for the query in its last
            update: below 1 where a bank index skipped clusters (:meth:`MemoryBank.build_index`),
            1 for a scan. Where the index's row sketch answered, the share of the bank's bytes
            read: the rows scored plus the sketch itself (``p`` float16 and one float32 per row;
            l2 also the norms). Same dtype as ``lse``.
        mass_bound: softmax and polynomial over an index: an upper bound on the weight the skipped
            memories would have had (relative to the memories read; the output is off by at most
            ``2 * mass_bound * max ||v||``), at most the call's ``eps``. 0 where nothing was
            skipped and for sparsemax / entmax, whose skipped memories have weight exactly 0.
            Over an index, ``support`` and ``argmax`` are those of the memories read: the full
            scan's for sparsemax / entmax, and for softmax with ``eps`` below 1e-6 (a skipped
            memory weighs less than the support's 1e-6) and below ``1 / M`` (it scores below
            the best); polynomial's support counts the positive scores read.
    """

    steps: torch.Tensor
    support: torch.Tensor
    argmax: torch.Tensor
    lse: torch.Tensor
    # Filled by hen_fast.retrieve on every path; None only from a backend called directly.
    fraction_read: torch.Tensor | None = None
    mass_bound: torch.Tensor | None = None

    def squeeze(self) -> RetrieveInfo:
        """The same info for a single query, each field a 0-d tensor."""
        return RetrieveInfo(*(field.squeeze(0) for field in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """The fields that are set, in order (``RetrieveInfo(*info.as_tuple())`` rebuilds it)."""
        fields = (self.steps, self.support, self.argmax, self.lse, self.fraction_read,
                  self.mass_bound)  # fmt: skip
        return tuple(field for field in fields if field is not None)

    def with_scan_fields(self) -> RetrieveInfo:
        """This info with ``fraction_read`` 1 and ``mass_bound`` 0 where a scan left them unset."""
        if self.fraction_read is not None:
            return self
        return RetrieveInfo(self.steps, self.support, self.argmax, self.lse,
                            torch.ones_like(self.lse), torch.zeros_like(self.lse))  # fmt: skip
