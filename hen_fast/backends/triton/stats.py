"""One pass over the bank that measures each query's scores against a per-row threshold t, with
``y = scale * (s - ref)`` for the similarity s and a per-row reference ``ref`` (the row's maximum
as a rule, so y stays exact and finite at any beta: see _common.score_tile):

* ``count``: entries with ``y > t`` (softmax support: ``beta (s - max) > log(l) + log(1e-6)``);
* ``sum_q``, ``sum_q1``: ``sum r^q`` and ``sum_{r>0} r^(q-1)``, ``r = [y - t]_+ / (top - t)``:
  the sums of a Newton step for the entmax threshold (see hen_fast.numerics.newton_threshold),
  with ``top`` the largest y (0 when ref is the row's maximum).

Partial sums per split are added on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    block_and_split,
    exponent_kind,
    kernel_scale,
    memory_tile,
    power,
    split_size,
    strides,
    tuned,
)


@triton.jit
def _threshold_stats_kernel(
    x_ptr, k_ptr, norms_ptr, active_ptr, ref_ptr, threshold_ptr, top_ptr, part_count_ptr,
    part_sum_q_ptr, part_sum_q1_ptr, num_rows, num_memories, dim, rows_per_split, num_splits, scale,
    q, q_minus_1, stride_xb, stride_xd, stride_km, stride_kd, SIM: tl.constexpr,
    NEWTON: tl.constexpr, Q_KIND: tl.constexpr, Q1_KIND: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(1)
    rows, row_mask, start, stop = block_and_split(active_ptr, num_rows, num_memories,
                                                  rows_per_split, BLOCK_B)
    ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
    threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=0.0)
    if NEWTON:
        span = tl.load(top_ptr + rows, mask=row_mask, other=1.0) - threshold
        span = tl.where(span > 0, span, 1.0)
    count = tl.zeros((BLOCK_B,), tl.int32)
    sum_q = tl.zeros((BLOCK_B,), tl.float32)
    sum_q1 = tl.zeros((BLOCK_B,), tl.float32)
    for m0 in range(start, stop, BLOCK_M):
        mems, mem_mask, s = memory_tile(
            m0, stop, x_ptr, k_ptr, norms_ptr, rows, row_mask, stride_xb, stride_xd, stride_km,
            stride_kd, dim, SIM, BLOCK_B, BLOCK_M, BLOCK_D, DOT_F32, PRECISION,
        )
        y = scale * (s - ref[:, None])
        count += tl.sum((y > threshold[:, None]).to(tl.int32), axis=1)
        if NEWTON:
            ratio = tl.maximum(y - threshold[:, None], 0.0) / span[:, None]
            sum_q += tl.sum(power(ratio, q, Q_KIND), axis=1)
            if Q1_KIND == 3:  # q == 1: r^0 counts the entries above the threshold
                sum_q1 += tl.sum((ratio > 0).to(tl.float32), axis=1)
            else:
                sum_q1 += tl.sum(power(ratio, q_minus_1, Q1_KIND), axis=1)
    part = rows.to(tl.int64) * num_splits + pid_s
    tl.store(part_count_ptr + part, count, mask=row_mask)
    tl.store(part_sum_q_ptr + part, sum_q, mask=row_mask)
    tl.store(part_sum_q1_ptr + part, sum_q1, mask=row_mask)


def threshold_stats(
    x, keys, sq_norms, active, ref, threshold, *, scale, similarity_code, splits, config,
    alpha=None, top=None,
):
    """(count, sum_q, sum_q1) per row for ``y = scale * (s - ref)`` against ``threshold`` (both
    (B,)); the sums only when ``alpha`` (and ``top``, the largest y per row) are given."""
    num_rows, dim = x.shape
    num_memories = keys.shape[0]
    rows_per_split = split_size(num_memories, splits)
    splits = -(-num_memories // rows_per_split)
    device = x.device
    part_count = torch.empty(num_rows, splits, dtype=torch.int32, device=device)
    part_sum_q = torch.empty(num_rows, splits, dtype=torch.float32, device=device)
    part_sum_q1 = torch.empty(num_rows, splits, dtype=torch.float32, device=device)
    newton = alpha is not None
    q = 1.0 / (alpha - 1.0) if newton else 1.0
    threshold = threshold.float().contiguous()
    grid = (triton.cdiv(num_rows, config["BLOCK_B"]), splits)
    kernel, options = tuned(
        _threshold_stats_kernel, {k: v for k, v in config.items() if k != "BLOCK_DV"}
    )
    kernel[grid](
        x, keys, sq_norms if sq_norms is not None else part_sum_q, active,
        ref.float().contiguous(), threshold, top.float().contiguous() if newton else threshold,
        part_count, part_sum_q, part_sum_q1, num_rows, num_memories, dim, rows_per_split, splits,
        kernel_scale(scale), q, q - 1, *strides(x), *strides(keys), SIM=similarity_code,
        NEWTON=newton, Q_KIND=exponent_kind(q), Q1_KIND=3 if q == 1.0 else exponent_kind(q - 1.0),
        **options,
    )
    return part_count.sum(dim=1).long(), part_sum_q.sum(dim=1), part_sum_q1.sum(dim=1)
