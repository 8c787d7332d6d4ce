"""U-Hop's separation loss, fused: every pair of rows without ever forming the M x M matrix.

For features ``Z`` (M, D), ``K_uv = exp(-t ||z_u - z_v||^2)`` over ordered pairs ``u != v`` and
``S = sum K``:

* ``"average"`` (Definition 2.2): ``L = log(S / (M (M - 1)))`` and
  ``dL/dz_u = -(4t / S) (r_u z_u - (K Z)_u)`` with ``r_u = sum_v K_uv``.
* ``"max"`` (Appendix G.2): ``L = max_{u != v} -t ||z_u - z_v||^2``, the closest pair's log-kernel;
  its (sub)gradient moves that pair only: ``dL/dz_u = -2t (z_u - z_v)`` and the opposite for v.

One pass over the pairs gives the loss and the gradient together. Each row keeps a running max
``m_u`` of its log-kernels (with the diagonal excluded every ``K_uv`` underflows for
well-separated features, so the sums are kept relative to it), the rescaled row sum
``l_u = sum_v exp(-t d_uv - m_u)`` and accumulator ``a_u = sum_v exp(-t d_uv - m_u) z_v``. Then
``log S = logsumexp_u(m_u + log l_u)`` and ``dL/dz_u = -4t exp(m_u - log S) (l_u z_u - a_u)``. The
gradient is computed in the forward pass when the features need one (O(M D) saved for backward,
nothing M x M), so a training step scans the pairs once, not twice.

Backends: ``"torch"`` (any device; tiles of ``block`` rows, each unordered pair of tiles computed
once and used for both rows' statistics: symmetry halves the distance work) and ``"triton"``
(``hen_fast.backends.triton.separation_loss``; CUDA, or the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..options import FLOAT_DTYPES
from .checks import check_point_set, check_positive

LOSS_BACKENDS = ("auto", "torch", "triton")
SEPARATION_REDUCTIONS = ("average", "max")
# Rows per tile of the torch path: a tile pair's temporaries are a few BLOCK x BLOCK matrices (4 MB
# each in float32 at 1024), and 1024-row matrix products run near the BLAS peak.
DEFAULT_BLOCK = 1024


def separation_loss(
    features: Tensor,
    t: float = 2.0,
    reduction: str = "average",
    *,
    backend: str = "auto",
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """U-Hop's separation loss of the rows of ``features``: a differentiable scalar.

    Args:
        features: ``(M, D)`` with ``M >= 2``, float16/bfloat16/float32/float64; computed in float32
            (float64 for float64 input), returned in that dtype.
        t: the RBF kernel's scale, finite and ``> 0``.
        reduction: ``"average"``, ``log mean_{u != v} exp(-t ||z_u - z_v||^2)`` over all ordered
            pairs of distinct rows, or ``"max"``, ``max_{u != v} -t ||z_u - z_v||^2``.
        backend: ``"auto"`` (Triton for CUDA tensors when triton is installed, else torch),
            ``"torch"`` or ``"triton"``.
        block: rows per tile of the torch path.

    The M x M kernel matrix is never formed: extra memory is O(M D + block^2). The gradient is
    first-order only (no double backward).
    """
    _check_features(features)
    t = _check_t(t)
    if reduction not in SEPARATION_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEPARATION_REDUCTIONS}, got {reduction!r}")
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    row_stats = _select_backend(backend, features)
    # Under no_grad (or for a constant input) the forward pass skips the gradient's accumulator.
    need_grad = torch.is_grad_enabled() and features.requires_grad
    return _SeparationLoss.apply(features, t, reduction, row_stats, int(block), need_grad)


def _check_features(features) -> None:
    check_point_set(
        "features",
        features,
        shape="(M, D)",
        pairs="rows (the loss is over pairs)",
        dtypes=FLOAT_DTYPES,
    )
    if features.shape[1] == 0:
        raise ValueError(f"features must have at least one column, got {tuple(features.shape)}")
    low, high = torch.aminmax(features.detach())
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise ValueError("features contains NaN or Inf")


def _check_t(t) -> float:
    if isinstance(t, Tensor) and t.numel() == 1:
        t = t.item()
    return check_positive("t", t)


def _select_backend(backend: str, features: Tensor):
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    if backend == "auto":
        from ..backends import triton as triton_backend

        use_triton = features.is_cuda and triton_backend.is_available()
        backend = "triton" if use_triton and features.dtype != torch.float64 else "torch"
    if backend == "torch":
        return torch_row_stats
    from ..backends import BackendUnavailableError
    from ..backends import triton as triton_backend

    if not triton_backend.is_available():
        raise BackendUnavailableError(
            f"backend 'triton' is not available here. {triton_backend.HINT}"
        )
    if features.dtype == torch.float64:
        raise BackendUnavailableError(
            "backend 'triton' computes in float32; use 'torch' for float64"
        )
    if not features.is_cuda and not triton_backend._interpreting():
        raise BackendUnavailableError(
            f"backend 'triton' computes on CUDA tensors, got {features.device}"
        )
    from ..backends.triton.separation_loss import triton_row_stats

    return triton_row_stats


class _SeparationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, t, reduction, row_stats, block, need_grad):
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        z = features.detach().to(dtype)
        loss, grad = _loss_and_grad(z, t, reduction, row_stats, block, need_grad)
        ctx.save_for_backward(grad if need_grad else None)
        ctx.input_dtype = features.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        grad_features = (grad * grad_output.to(grad.dtype)).to(ctx.input_dtype)
        return grad_features, None, None, None, None, None


def _loss_and_grad(z: Tensor, t: float, reduction: str, row_stats, block: int, need_grad: bool):
    """(loss, dL/dz or None) from a backend's per-row statistics."""
    num_rows = z.shape[0]
    average = reduction == "average"
    row_max, row_argmax, row_sum, acc = row_stats(
        z, t, want_sum=average, want_acc=average and need_grad, block=block
    )
    if not average:
        # The closest pair, its distance recomputed from the difference (exact, unlike the
        # expanded ||a||^2 + ||b||^2 - 2 a.b that picked it).
        u = int(row_max.argmax())
        v = int(row_argmax[u])
        diff = z[u] - z[v]
        loss = -t * (diff * diff).sum()
        grad = None
        if need_grad:
            grad = torch.zeros_like(z)
            grad[u] = -2.0 * t * diff
            grad[v] = 2.0 * t * diff
        return loss, grad
    row_lse = row_max + torch.log(row_sum)
    log_total = torch.logsumexp(row_lse, dim=0)
    loss = log_total - math.log(num_rows * (num_rows - 1))
    grad = None
    if need_grad:
        scale = -4.0 * t * torch.exp(row_max - log_total)
        grad = scale[:, None] * (row_sum[:, None] * z - acc)
    return loss, grad


def torch_row_stats(z: Tensor, t: float, *, want_sum: bool, want_acc: bool, block: int):
    """Per-row ``(max_v -t d_uv, its v, l_u, a_u)`` over ``v != u`` (see the module docstring);
    ``l`` and ``a`` are None unless wanted. Tiles of ``block`` rows; each unordered tile pair is
    scored once and feeds both its row tile's and its column tile's statistics."""
    num_rows, dim = z.shape
    sq_norms = (z * z).sum(dim=1)
    stats = _RowStats(num_rows, dim, z, want_sum, want_acc)
    for i0 in range(0, num_rows, block):
        i1 = min(i0 + block, num_rows)
        for j0 in range(i0, num_rows, block):
            j1 = min(j0 + block, num_rows)
            # -t ||z_i - z_j||^2 = -t (||z_i||^2 + ||z_j||^2 - 2 z_i.z_j), clamped at distance 0.
            dist = torch.addmm(
                sq_norms[i0:i1, None] + sq_norms[None, j0:j1], z[i0:i1], z[j0:j1].T, alpha=-2.0
            )
            log_kernel = dist.clamp_(min=0.0).mul_(-t)
            if i0 == j0:
                log_kernel.fill_diagonal_(-math.inf)
            stats.update(i0, i1, j0, log_kernel, z[j0:j1])
            if i0 != j0:
                stats.update(j0, j1, i0, log_kernel.T, z[i0:i1])
    return stats.row_max, stats.row_argmax, stats.row_sum, stats.acc


class _RowStats:
    """Running per-row max (and its column), and sums rescaled to it, over column tiles."""

    def __init__(self, num_rows, dim, like, want_sum, want_acc):
        options = dict(dtype=like.dtype, device=like.device)
        self.row_max = torch.full((num_rows,), -math.inf, **options)
        self.row_argmax = torch.zeros(num_rows, dtype=torch.long, device=like.device)
        self.row_sum = torch.zeros(num_rows, **options) if want_sum else None
        self.acc = torch.zeros(num_rows, dim, **options) if want_acc else None

    def update(self, r0: int, r1: int, c0: int, log_kernel: Tensor, columns: Tensor) -> None:
        tile_max, tile_arg = log_kernel.max(dim=1)
        old = self.row_max[r0:r1]
        better = tile_max > old  # strict: an earlier tile keeps a tie
        self.row_argmax[r0:r1] = torch.where(better, tile_arg + c0, self.row_argmax[r0:r1])
        new = torch.maximum(old, tile_max)
        if self.row_sum is not None:
            # A row can have no finite entry yet (a 1 x 1 diagonal tile): shift by 0 there, so
            # exp(-inf - shift) is 0 rather than NaN.
            shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
            rescale = torch.exp(old - shift)
            weights = torch.exp(log_kernel - shift[:, None])
            self.row_sum[r0:r1] = self.row_sum[r0:r1] * rescale + weights.sum(dim=1)
            if self.acc is not None:
                self.acc[r0:r1] = torch.addmm(self.acc[r0:r1] * rescale[:, None], weights, columns)
        self.row_max[r0:r1] = new
