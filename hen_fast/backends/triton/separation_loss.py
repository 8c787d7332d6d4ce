"""U-Hop's separation loss on the GPU: the per-row pair statistics in one fused Triton kernel.

Each program owns BLOCK_I rows u and one BLOCK_DV slice of the feature columns, and streams every
BLOCK_J tile of rows v: the tile's log-kernels ``-t ||z_u - z_v||^2`` (as
``-t (||z_u||^2 + ||z_v||^2 - 2 z_u.z_v)``, exact float32 dot products, diagonal and padding
-inf), a running max with its first column, and, online-softmax style, the rescaled row sum
``l_u`` and the accumulator ``a_u = sum_v exp(-t d_uv - m_u) z_v`` for its column slice. Nothing
M x M is written. :mod:`hen_fast.uhop.loss` turns these into the loss and its gradient and holds
the autograd wrapper shared with the torch path.

Features wider than BLOCK_DV are split over the grid's second axis; each slice recomputes the
tile's distances (which need all D columns), so the distance work is multiplied by the number of
slices. Every slice program writes the same statistics; only slice 0 stores them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, dot_settings, interpreting, safe_shift, strides, tile_offsets


@triton.jit
def _pair_stats_kernel(
    z_ptr, sq_ptr, max_ptr, arg_ptr, sum_ptr, acc_ptr, num_rows, dim, t, stride_zm, stride_zd,
    stride_am, stride_ad, WANT_SUM: tl.constexpr, WANT_ACC: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_i, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < num_rows
    sq_rows = tl.load(sq_ptr + rows, mask=row_mask, other=0.0)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < dim

    running_max = tl.full((BLOCK_I,), float("-inf"), tl.float32)
    best = tl.zeros((BLOCK_I,), tl.int32)
    running_sum = tl.zeros((BLOCK_I,), tl.float32)
    acc = tl.zeros((BLOCK_I, BLOCK_DV), tl.float32)
    for j0 in range(0, num_rows, BLOCK_J):
        others = j0 + tl.arange(0, BLOCK_J)
        other_mask = others < num_rows
        dots = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ks = d0 + tl.arange(0, BLOCK_D)
            k_mask = ks < dim
            zu = tl.load(z_ptr + tile_offsets(rows, ks, stride_zm, stride_zd),
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            zv = tl.load(z_ptr + tile_offsets(others, ks, stride_zm, stride_zd),
                         mask=other_mask[:, None] & k_mask[None, :], other=0.0)
            dots = tl.dot(zu, tl.trans(zv), dots, input_precision=PRECISION)
        sq_others = tl.load(sq_ptr + others, mask=other_mask, other=0.0)
        dist = tl.maximum(sq_rows[:, None] + sq_others[None, :] - 2.0 * dots, 0.0)
        valid = other_mask[None, :] & (rows[:, None] != others[None, :])
        log_kernel = tl.where(valid, -t * dist, float("-inf"))

        tile_max = tl.max(log_kernel, axis=1)
        tile_arg = tl.argmax(log_kernel, axis=1)  # first on ties
        better = tile_max > running_max  # strict: an earlier tile keeps a tie
        best = tl.where(better, j0 + tile_arg, best)
        new_max = tl.maximum(running_max, tile_max)
        if WANT_SUM:
            # A row with no finite entry yet shifts by 0, so exp(-inf - shift) is 0, not NaN.
            shift = safe_shift(new_max)
            rescale = tl.exp2((running_max - shift) * LOG2E)
            weights = tl.exp2((log_kernel - shift[:, None]) * LOG2E)
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            if WANT_ACC:
                values = tl.load(z_ptr + tile_offsets(others, cols, stride_zm, stride_zd),
                                 mask=other_mask[:, None] & col_mask[None, :], other=0.0)
                acc = tl.dot(weights, values, acc * rescale[:, None], input_precision=PRECISION)
        running_max = new_max

    if pid_v == 0:
        tl.store(max_ptr + rows, running_max, mask=row_mask)
        tl.store(arg_ptr + rows, best.to(tl.int64), mask=row_mask)
        if WANT_SUM:
            tl.store(sum_ptr + rows, running_sum, mask=row_mask)
    if WANT_ACC:
        tl.store(acc_ptr + tile_offsets(rows, cols, stride_am, stride_ad), acc,
                 mask=row_mask[:, None] & col_mask[None, :])


def _blocks(dim: int) -> dict:
    if interpreting():
        # Small tiles so that test sizes cross several row, column and feature tiles.
        return dict(BLOCK_I=16, BLOCK_J=16, BLOCK_D=16, BLOCK_DV=16, num_warps=4)
    return dict(BLOCK_I=64, BLOCK_J=64, BLOCK_D=32,
                BLOCK_DV=min(256, max(16, triton.next_power_of_2(dim))), num_warps=8)


def triton_row_stats(z: torch.Tensor, t: float, *, want_sum: bool, want_acc: bool, block=None):
    """``(row_max, row_argmax, row_sum, acc)`` as :func:`hen_fast.uhop.loss.torch_row_stats`
    gives them, for float32 ``z`` (M, D) on a CUDA device (or the CPU under the interpreter).
    ``block`` (the torch path's tile size) is not used."""
    if z.dtype != torch.float32:
        raise TypeError(f"the Triton separation-loss kernel takes float32 features, got {z.dtype}")
    num_rows, dim = z.shape
    options = dict(dtype=torch.float32, device=z.device)
    sq_norms = (z * z).sum(dim=1)
    # Poisoned: every entry a program should write is NaN until it does.
    row_max = torch.full((num_rows,), float("nan"), **options)
    row_argmax = torch.full((num_rows,), -1, dtype=torch.int64, device=z.device)
    row_sum = torch.full((num_rows,), float("nan"), **options) if want_sum else None
    acc = torch.full((num_rows, dim), float("nan"), **options) if want_acc else None
    config = _blocks(dim)
    slices = triton.cdiv(dim, config["BLOCK_DV"]) if want_acc else 1
    grid = (triton.cdiv(num_rows, config["BLOCK_I"]), slices)
    _, precision = dot_settings(z)
    dummy = row_max
    _pair_stats_kernel[grid](
        z, sq_norms, row_max, row_argmax,
        row_sum if want_sum else dummy, acc if want_acc else dummy,
        num_rows, dim, float(t), *strides(z), *(strides(acc) if want_acc else (0, 0)),
        WANT_SUM=want_sum, WANT_ACC=want_acc, PRECISION=precision, **config,
    )
    return row_max, row_argmax, row_sum, acc
