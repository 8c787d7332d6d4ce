"""The kernel memory network (KMN) baseline that the HEN paper compares against.

A KMN trains every neuron to interpolate the stored patterns with minimum norm in the RKHS of a
kernel ``k``; for auto-association the update is

    x <- Xi^T K^+ k(Xi, x),        K = k(Xi, Xi)  (M x M),  K^+ its Moore-Penrose pseudo-inverse,

so every stored pattern is a fixed point (``K^+ K e_mu = e_mu`` when K has full rank). The kernel
here is the radial, translation-invariant exponential kernel with a spatial scale ``scale`` and an
inverse temperature ``beta``:

    k(x, y) = exp(-beta * (||x - y|| / scale) ** power)

``power=1`` is the exponential (Laplace) kernel; ``power=2`` the Gaussian one, which on the unit
sphere equals the dot-product modern Hopfield kernel ``exp(beta' x.y)`` up to a constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import check_real


class KernelMemoryNetwork:
    """Auto-associative kernel memory network over the rows of ``memories`` (M, d).

    Args:
        memories: the stored patterns (e.g. flattened images or latents), float.
        beta: inverse temperature, > 0.
        scale: spatial scale of the kernel, > 0; default the median distance between memories.
        power: 1 (exponential kernel) or 2 (Gaussian), any value in (0, 2] keeps K positive
            definite.
        rcond: singular values below ``rcond`` times the largest are dropped by the
            pseudo-inverse (an ill-conditioned K is the KMN's failure mode at low temperature).

    Building costs one M x M kernel matrix and its pseudo-inverse (float64): seconds for a few
    thousand memories, cubic in M.
    """

    def __init__(
        self,
        memories: Tensor,
        beta: float = 1.0,
        scale: float | None = None,
        power: float = 1.0,
        rcond: float = 1e-10,
    ):
        if not isinstance(memories, Tensor) or not memories.is_floating_point():
            raise TypeError("memories must be a floating-point torch.Tensor (M, d)")
        if memories.dim() != 2 or memories.shape[0] == 0 or memories.shape[1] == 0:
            raise ValueError(
                f"memories must have shape (M, d) with M, d >= 1, got {tuple(memories.shape)}"
            )
        if not bool(torch.isfinite(memories).all()):
            raise ValueError("memories contains NaN or Inf")
        self.beta = check_real("beta", beta, positive=True)
        self.power = check_real("power", power, positive=True)
        if self.power > 2:
            raise ValueError(f"power must lie in (0, 2] (a positive definite kernel), got {power}")
        self.memories = memories.double()
        if scale is None:
            distances = torch.cdist(self.memories, self.memories)
            off_diagonal = distances[~torch.eye(len(distances), dtype=torch.bool)]
            scale = float(off_diagonal.median()) if off_diagonal.numel() else 1.0
            scale = scale if scale > 0 else 1.0
        self.scale = check_real("scale", scale, positive=True)
        gram = self.kernel(self.memories, self.memories)
        # K^+ Xi, so that an update is one kernel row times this (M, d) matrix.
        self.coefficients = torch.linalg.pinv(gram, rtol=rcond, hermitian=True) @ self.memories

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """``k(a_i, b_j)`` for rows of ``a`` (n, d) and ``b`` (m, d): (n, m) float64."""
        distance = torch.cdist(a.double(), b.double())
        return torch.exp(-self.beta * (distance / self.scale) ** self.power)

    def recall(self, queries: Tensor, steps: int = 1) -> Tensor:
        """``steps`` updates ``x <- Xi^T K^+ k(Xi, x)`` of ``queries`` (N, d); float32 (N, d)."""
        if not isinstance(queries, Tensor) or queries.dim() != 2:
            raise ValueError("queries must be a torch.Tensor of shape (N, d)")
        if queries.shape[1] != self.memories.shape[1]:
            raise ValueError(
                f"queries must have d={self.memories.shape[1]} columns, got {queries.shape[1]}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        state = queries.double()
        for _ in range(steps):
            state = self.kernel(state, self.memories) @ self.coefficients
        return state.float()

    def recall_indices(self, queries: Tensor, steps: int = 1) -> Tensor:
        """Index of the stored pattern nearest to each query's final state."""
        state = self.recall(queries, steps).double()
        return torch.cdist(state, self.memories).argmin(1)
