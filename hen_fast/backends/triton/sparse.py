"""Sparsemax and entmax with exact thresholds: a candidate pass, an exact solve, a gathered output.

Everything is relative to the row's maximum similarity ``m``: with ``c = (alpha - 1) beta`` and
``r = c (s - m) <= 0``, the weights are ``[r - tau]_+^q`` with ``tau`` in ``[-1, 0)``. Absolute
thresholds on ``(alpha - 1) beta s`` cancel once ``beta s`` is large (every weight 0, NaN out, at
``|beta s| ~ 1e7`` in float32) and overflow past float32's range; relative ones stay exact.

1. ``_candidates_kernel`` streams the bank once. The support lies in ``{r > -1}``; each program
   keeps a running max of its split and appends every similarity with
   ``c (s - running max) > -1`` (a superset of that window, since the running max never exceeds
   the final one) to its query's buffer of ``capacity`` slots, reserving slots with an atomic
   counter.
2. On the device: the threshold is solved exactly on the buffer in float64 (closed forms for
   sparsemax and alpha 1.5, Newton otherwise: hen_fast.numerics' solvers). A row whose counter
   stayed within the capacity holds every entry that can carry weight, so its threshold is the
   row's.
3. ``_gather_kernel`` forms the output from the buffer alone: ``sum_j p_j V[index_j]`` over the
   few slots with weight, never reading the bank again.

Rows whose window overflowed the buffer (supports of more than ``capacity`` memories: small beta)
fall back to Newton passes over the bank (stats.py) and a full output pass (dense.py); that one
case costs a device-to-host check per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import numerics
from ._common import (
    block_and_split,
    exponent_kind,
    kernel_scale,
    memory_tile,
    power,
    split_size,
    strides,
    tile_offsets,
    untuned,
)
from .dense import ENTMAX_WITH_TAU, dense_pass, first_argmax
from .stats import threshold_stats

DEFAULT_CAPACITY = 256


@triton.jit
def _candidates_kernel(
    x_ptr, k_ptr, norms_ptr, active_ptr, cand_value_ptr, cand_index_ptr, cand_count_ptr,
    part_best_ptr, part_index_ptr, num_rows, num_memories, dim, rows_per_split, num_splits,
    capacity, scale, stride_xb, stride_xd, stride_km, stride_kd, SIM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(1)
    rows, row_mask, start, stop = block_and_split(active_ptr, num_rows, num_memories,
                                                  rows_per_split, BLOCK_B)
    row_slots = rows.to(tl.int64) * capacity
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_B,), tl.int32)
    for m0 in range(start, stop, BLOCK_M):
        mems, mem_mask, s = memory_tile(
            m0, stop, x_ptr, k_ptr, norms_ptr, rows, row_mask, stride_xb, stride_xd, stride_km,
            stride_kd, dim, SIM, BLOCK_B, BLOCK_M, BLOCK_D, DOT_F32, PRECISION,
        )
        tile_best = tl.max(s, axis=1)
        tile_index = tl.argmax(s, axis=1)
        better = tile_best > best
        best_index = tl.where(better, m0 + tile_index, best_index)
        best = tl.where(better, tile_best, best)
        # The window as a product, c (s - max) > -1: s > max - 1/c rounds to s > max at large
        # beta and would drop the ties.
        keep = ((s - best[:, None]) * scale > -1.0) & row_mask[:, None]
        kept = keep.to(tl.int32)
        base = tl.atomic_add(cand_count_ptr + rows, tl.sum(kept, axis=1), mask=row_mask)
        slot = base[:, None] + tl.cumsum(kept, axis=1) - 1
        store = keep & (slot < capacity)
        where = row_slots[:, None] + slot
        tl.store(cand_value_ptr + where, s, mask=store)
        tl.store(cand_index_ptr + where, mems[None, :] + tl.zeros_like(slot), mask=store)
    part = rows.to(tl.int64) * num_splits + pid_s
    tl.store(part_best_ptr + part, best, mask=row_mask)
    tl.store(part_index_ptr + part, best_index, mask=row_mask)


@triton.jit
def _gather_kernel(
    cand_value_ptr, cand_index_ptr, cand_count_ptr, top_ptr, tau_ptr, v_ptr, out_ptr, value_dim,
    capacity, scale, q, stride_vm, stride_vd, Q_KIND: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    row, pid_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    filled = tl.minimum(tl.load(cand_count_ptr + row), capacity)
    top = tl.load(top_ptr + row)
    tau = tl.load(tau_ptr + row)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < value_dim
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    total = tl.zeros((BLOCK_C,), tl.float32)
    for c0 in range(0, filled, BLOCK_C):
        slots = c0 + tl.arange(0, BLOCK_C)
        slot_mask = slots < filled
        s = tl.load(cand_value_ptr + row * capacity + slots, mask=slot_mask, other=float("-inf"))
        weights = power(tl.maximum(scale * (s - top) - tau, 0.0), q, Q_KIND)
        index = tl.load(cand_index_ptr + row * capacity + slots, mask=slot_mask, other=0)
        # Only rows with weight are read from the values: the support, not the buffer.
        values = tl.load(
            v_ptr + tile_offsets(index, cols, stride_vm, stride_vd),
            mask=(weights > 0)[:, None] & col_mask[None, :], other=0.0,
        )
        acc += tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
        total += weights
    tl.store(out_ptr + row * value_dim + cols, acc / tl.sum(total, axis=0), mask=col_mask)


def sparse_step(
    x, keys, sq_norms, values, active, *, beta, alpha, similarity_code, splits, config,
    capacity=DEFAULT_CAPACITY, want_info=True,
):
    """One sparsemax/entmax update; returns (out, support, argmax, lse, threshold) in float32,
    ``threshold`` (B, 2) the weights' (row max m, tau relative to it), which the backward pass
    needs; support and lse only when ``want_info``."""
    num_rows, num_memories = x.shape[0], keys.shape[0]
    device = x.device
    rows_per_split = split_size(num_memories, splits)
    splits = -(-num_memories // rows_per_split)
    capacity = max(1, min(capacity, num_memories))
    scale = (alpha - 1.0) * beta
    cand_value = torch.empty(num_rows, capacity, dtype=torch.float32, device=device)
    cand_index = torch.empty(num_rows, capacity, dtype=torch.int32, device=device)
    cand_count = torch.zeros(num_rows, dtype=torch.int32, device=device)
    part_best = torch.empty(num_rows, splits, dtype=torch.float32, device=device)
    part_index = torch.empty(num_rows, splits, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_rows, config["BLOCK_B"]), splits)
    _candidates_kernel[grid](
        x, keys, sq_norms if sq_norms is not None else part_best, active, cand_value, cand_index,
        cand_count, part_best, part_index, num_rows, num_memories, x.shape[1], rows_per_split,
        splits, capacity, kernel_scale(scale), *strides(x), *strides(keys),
        SIM=similarity_code, **untuned({k: v for k, v in config.items() if k != "BLOCK_DV"}),
    )
    top, argmax = first_argmax(part_best, part_index)

    # The exact threshold on the buffer, in float64, relative to the row max (r <= 0). Empty
    # slots and entries below the window become -2: never in the support, so every solver
    # ignores them.
    filled = torch.arange(capacity, device=device) < cand_count.clamp(max=capacity)[:, None]
    relative = scale * (cand_value.double() - top.double()[:, None])
    in_window = filled & (relative > -1.0)
    buffered = torch.where(in_window, relative, -2.0)
    zeros = torch.zeros(num_rows, dtype=torch.float64, device=device)
    if alpha in (1.5, 2.0):
        tau = numerics.sorted_threshold(buffered.sort(dim=1, descending=True).values, alpha)
    else:
        tau = numerics.newton_threshold(
            numerics.row_sums(buffered, 1.0 / (alpha - 1.0)), zeros, zeros - 1.0, alpha,
        )
    out, support, lse = _gathered(
        cand_value, cand_index, cand_count, top, tau, values, beta, alpha, capacity, config,
        want_info,
    )
    overflow = cand_count > capacity
    if bool(overflow.any()):  # rare: supports wider than the buffer; exact by Newton passes
        solved = _overflow_rows(
            x, keys, sq_norms, values, active & overflow.to(active.dtype), top, tau, beta=beta,
            alpha=alpha, similarity_code=similarity_code, splits=splits, config=config,
        )
        out = torch.where(overflow[:, None], solved[0], out)
        tau = torch.where(overflow, solved[3], tau)
        if want_info:
            support = torch.where(overflow, solved[1], support)
            lse = torch.where(overflow, solved[2], lse)
    threshold = torch.stack([top, tau.float()], dim=1)
    return out, support, argmax, lse, threshold


def _gathered(
    cand_value, cand_index, cand_count, top, tau, values, beta, alpha, capacity, config, want_info,
):
    """Output, support and lse of every row from its buffer (exact where it did not overflow)."""
    num_rows, value_dim = cand_value.shape[0], values.shape[1]
    q = 1.0 / (alpha - 1.0)
    scale = (alpha - 1.0) * beta
    tau32 = tau.float().contiguous()
    out = torch.empty(num_rows, value_dim, dtype=torch.float32, device=values.device)
    block_dv = min(config["BLOCK_DV"], triton.next_power_of_2(value_dim))
    _gather_kernel[(num_rows, triton.cdiv(value_dim, block_dv))](
        cand_value, cand_index, cand_count, top, tau32, values, out, value_dim, capacity,
        kernel_scale(scale), q, *strides(values), Q_KIND=exponent_kind(q), BLOCK_C=32,
        BLOCK_DV=block_dv,
    )
    support = lse = None
    if want_info:
        filled = (
            torch.arange(capacity, device=values.device) < cand_count.clamp(max=capacity)[:, None]
        )
        relative = scale * (cand_value.double() - top.double()[:, None])
        relative = torch.where(filled, relative, -torch.inf)
        weights = torch.relu(relative - tau[:, None]) ** q
        total = weights.sum(dim=1)
        support = (weights > 0).sum(dim=1)
        # z = beta s = beta m + r / (alpha - 1): sum_j p_j z_j without forming beta s.
        mean_relative = (weights * torch.where(weights > 0, relative, 0.0)).sum(dim=1) / total
        tsallis = (1.0 - (weights**alpha).sum(dim=1) / total**alpha) / (alpha * (alpha - 1.0))
        lse = (beta * top.double() + mean_relative / (alpha - 1.0) + tsallis).float()
    return out, support, lse


def _overflow_rows(
    x, keys, sq_norms, values, rows_to_solve, top, tau, *, beta, alpha, similarity_code, splits,
    config,
):
    """(out, support, lse, tau) by Newton passes over the whole bank from the buffer's threshold (a
    lower bound of the true one: a valid start), then a full output pass. tau is relative to the
    row max ``top``, as everywhere here."""
    scale = (alpha - 1.0) * beta

    def partial_sums(tau_now, top_now):
        _, sum_q, sum_q1 = threshold_stats(
            x, keys, sq_norms, rows_to_solve, top, tau_now, scale=scale,
            similarity_code=similarity_code, splits=splits, config=config, alpha=alpha,
            top=top_now,
        )
        return sum_q.double(), sum_q1.double()

    tau = numerics.newton_threshold(
        partial_sums, torch.zeros_like(tau), tau, alpha, eps=16 * torch.finfo(torch.float32).eps
    )
    out, support, _, lse, _ = dense_pass(
        x, keys, sq_norms, values, rows_to_solve, beta=beta, similarity_code=similarity_code,
        separation_code=ENTMAX_WITH_TAU, alpha=alpha, ref=top, tau=tau, splits=splits,
        config=config,
    )
    return out, support, lse, tau
