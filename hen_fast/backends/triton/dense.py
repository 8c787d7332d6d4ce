"""One fused pass over the bank: scores, weights and the weighted sum of values, in bank splits.

Each program takes BLOCK_B queries and one split of the bank (and one BLOCK_DV slice of the
values), streams the split in BLOCK_M tiles and writes float32 partial states; `_combine_kernel`
merges the splits. Weights:

* softmax: online softmax over the similarities s (running max m of s, sum l, accumulator
  rescaled by exp(beta (m_old - m_new))), weights ``exp(beta (s - m))`` with beta log2(e)
  folded into exp2. Merge: ``O = sum_s w_s acc_s / sum_s w_s l_s``, ``w_s = exp(beta (m_s - m))``.
  Only differences from the max are scaled by beta: ``beta * s`` itself may overflow float32
  (beta up to 1e30), and a row or split with no finite score shifts by 0, never -inf - -inf.
* polynomial: ``relu(s)^n`` scaled by the running max of relu(s) (beta cancels in the ratio).
* entmax with a known threshold (the sparse separations' full output pass):
  ``[(alpha-1) beta (s - ref) - tau]_+^q`` with tau relative to the row max ref; no rescaling,
  the partial sums simply add.

For auto-association (values are the keys, dot or l2, a 16-bit bank with d <= 256) one key tile
serves as both the scores' operand and the values: the bank is read once per pass. Every program
also keeps its split's max score and first argmax, and what return_info needs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    ENTMAX,
    LOG2E,
    POLYNOMIAL,
    SEP_ENTMAX,
    SEP_POLYNOMIAL,
    SEP_SOFTMAX,
    SIMILARITY,
    SOFTMAX,
    block_and_split,
    exponent_kind,
    finish_scores,
    interpreting,
    kernel_scale,
    power,
    safe_shift,
    score_tile,
    split_size,
    strides,
    tile_offsets,
    tuned,
)

# The separation codes the launchers pass (hen_fast/codes.py). ENTMAX_WITH_TAU is entmax's code:
# this pass computes entmax only from a threshold it is given.
ENTMAX_WITH_TAU = ENTMAX


@triton.jit
def _dense_pass_kernel(
    x_ptr, k_ptr, norms_ptr, v_ptr, active_ptr, ref_ptr, tau_ptr, part_max_ptr, part_sum_ptr,
    part_acc_ptr, part_pz_ptr, part_pa_ptr, part_count_ptr, part_best_ptr, part_index_ptr, num_rows,
    num_memories, dim, value_dim, rows_per_split, num_splits, beta, degree, alpha, alpha_minus_1, q,
    stride_xb, stride_xd, stride_km, stride_kd, stride_vm, stride_vd, SIM: tl.constexpr,
    SEP: tl.constexpr, Q_KIND: tl.constexpr, SAME_KV: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_s, pid_v = tl.program_id(1), tl.program_id(2)
    rows, row_mask, start, stop = block_and_split(active_ptr, num_rows, num_memories,
                                                  rows_per_split, BLOCK_B)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < value_dim

    # Maxima are of the unscaled similarity s; weights scale differences from them by beta.
    if SEP == SEP_SOFTMAX:
        running_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    else:
        running_max = tl.zeros((BLOCK_B,), tl.float32)
    running_sum = tl.zeros((BLOCK_B,), tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_DV), tl.float32)
    pz = tl.zeros((BLOCK_B,), tl.float32)
    pa = tl.zeros((BLOCK_B,), tl.float32)
    count = tl.zeros((BLOCK_B,), tl.int32)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_B,), tl.int32)
    if SEP == SEP_SOFTMAX:
        scale = beta * LOG2E
    if SEP == SEP_ENTMAX:  # weights [(alpha - 1) beta (s - ref) - tau]_+^q, tau relative to ref
        scale = alpha_minus_1 * beta
        ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
        tau = tl.load(tau_ptr + rows, mask=row_mask, other=0.0)
    if SAME_KV:  # the whole query row fits one BLOCK_DV slice (cols cover d)
        queries = tl.load(x_ptr + tile_offsets(rows, cols, stride_xb, stride_xd),
                          mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_F32:
            queries = queries.to(tl.float32)

    for m0 in range(start, stop, BLOCK_M):
        mems = m0 + tl.arange(0, BLOCK_M)
        mem_mask = mems < stop
        if SAME_KV:
            values = tl.load(k_ptr + tile_offsets(mems, cols, stride_km, stride_kd),
                             mask=mem_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_F32:
                raw = tl.dot(queries, tl.trans(values.to(tl.float32)), input_precision=PRECISION)
            else:
                raw = tl.dot(queries, tl.trans(values))
            s = finish_scores(raw, norms_ptr, mems, mem_mask, SIM)
        else:
            s = score_tile(x_ptr, k_ptr, norms_ptr, rows, mems, row_mask, mem_mask,
                           stride_xb, stride_xd, stride_km, stride_kd, dim,
                           SIM, BLOCK_B, BLOCK_M, BLOCK_D, DOT_F32, PRECISION)
            values = tl.load(v_ptr + tile_offsets(mems, cols, stride_vm, stride_vd),
                             mask=mem_mask[:, None] & col_mask[None, :], other=0.0)
        tile_best = tl.max(s, axis=1)
        tile_index = tl.argmax(s, axis=1)  # first on ties
        better = tile_best > best  # strict: an earlier tile keeps a tie
        best_index = tl.where(better, m0 + tile_index, best_index)
        best = tl.where(better, tile_best, best)
        if SEP == SEP_SOFTMAX:
            new_max = tl.maximum(running_max, tile_best)
            shift = safe_shift(new_max)
            rescale = tl.exp2((running_max - shift) * scale)
            weights = tl.exp2((s - shift[:, None]) * scale)
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None]
            running_max = new_max
        elif SEP == SEP_POLYNOMIAL:  # relu(beta s)^n normalised: beta cancels
            rectified = tl.maximum(s, 0.0)
            new_max = tl.maximum(running_max, tl.max(rectified, axis=1))
            divisor = tl.where(new_max > 0, new_max, 1.0)
            rescale = power(running_max / divisor, degree, 0)
            weights = power(rectified / divisor[:, None], degree, 0)
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None]
            count += tl.sum((s > 0).to(tl.int32), axis=1)
            running_max = new_max
        else:
            relative = s - ref[:, None]
            excess = tl.maximum(scale * relative - tau[:, None], 0.0)
            weights = power(excess, q, Q_KIND)
            running_sum += tl.sum(weights, axis=1)
            count += tl.sum((weights > 0).to(tl.int32), axis=1)
            pz += tl.sum(weights * tl.where(weights > 0, relative, 0.0), axis=1)  # -inf past M
            pa += tl.sum(power(weights, alpha, 0), axis=1)
        if DOT_F32:
            acc = tl.dot(weights, values.to(tl.float32), acc, input_precision="ieee")
        else:  # half-precision values: weights rounded to their dtype, as FlashAttention does
            acc = tl.dot(weights.to(values.dtype), values, acc)

    part = rows.to(tl.int64) * num_splits + pid_s
    tl.store(part_acc_ptr + tile_offsets(part, cols, value_dim, 1), acc,
             mask=row_mask[:, None] & col_mask[None, :])
    if pid_v == 0:
        tl.store(part_max_ptr + part, running_max, mask=row_mask)
        tl.store(part_sum_ptr + part, running_sum, mask=row_mask)
        tl.store(part_pz_ptr + part, pz, mask=row_mask)
        tl.store(part_pa_ptr + part, pa, mask=row_mask)
        tl.store(part_count_ptr + part, count, mask=row_mask)
        tl.store(part_best_ptr + part, best, mask=row_mask)
        tl.store(part_index_ptr + part, best_index, mask=row_mask)


@triton.jit
def _combine_kernel(
    part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, total_ptr, top_ptr, num_splits, value_dim,
    beta, degree, SEP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge one query's split states: out = sum_s w_s acc_s / sum_s w_s l_s, with w_s rescaling
    split s to the row's max (exp(beta (m_s - m)) for softmax, (m_s / m)^n for polynomial, 1
    else)."""
    row, pid_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    base = row * num_splits
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < value_dim
    # An empty or padded split holds max -inf (softmax) or 0 (others): it never wins the max.
    top = tl.load(part_max_ptr + base + tl.arange(0, BLOCK_S),
                  mask=tl.arange(0, BLOCK_S) < num_splits, other=float("-inf"))
    for s0 in range(BLOCK_S, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        top = tl.maximum(top, tl.load(part_max_ptr + base + splits, mask=splits < num_splits,
                                      other=float("-inf")))
    row_max = tl.max(top, axis=0)
    total = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        split_mask = splits < num_splits
        split_max = tl.load(part_max_ptr + base + splits, mask=split_mask, other=0.0)
        if SEP == SEP_SOFTMAX:  # a split (or row) with no finite score weighs 0, not NaN
            weight = tl.exp2((split_max - safe_shift(row_max)) * (beta * LOG2E))
        elif SEP == SEP_POLYNOMIAL:
            weight = power(split_max / tl.where(row_max > 0, row_max, 1.0), degree, 0)
        else:
            weight = tl.full((BLOCK_S,), 1.0, tl.float32)
        weight = tl.where(split_mask, weight, 0.0)
        total += weight * tl.load(part_sum_ptr + base + splits, mask=split_mask, other=0.0)
        partial = tl.load(part_acc_ptr + tile_offsets(base + splits, cols, value_dim, 1),
                          mask=split_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * partial, axis=0)
    row_total = tl.sum(total, axis=0)
    safe_total = tl.where(row_total > 0, row_total, 1.0)  # polynomial, all scores <= 0: zeros
    tl.store(out_ptr + row * value_dim + cols, acc / safe_total, mask=col_mask)
    if pid_v == 0:
        tl.store(total_ptr + row, row_total)
        tl.store(top_ptr + row, row_max)


def first_argmax(best: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split (max, first index) into the row's max and its first index."""
    top = best.max(dim=1).values
    candidates = torch.where(best == top[:, None], index, torch.iinfo(index.dtype).max)
    return top, candidates.min(dim=1).values.long()


def dense_pass(x, keys, sq_norms, values, active, *, beta, similarity_code, separation_code,
               degree=1.0, alpha=2.0, ref=None, tau=None, splits, config, want_info=True):
    """Launch the pass and merge its splits; returns (out, support, argmax, lse, threshold) in
    float32, support, argmax and lse None unless ``want_info``.

    ``separation_code`` is SOFTMAX, POLYNOMIAL or ENTMAX_WITH_TAU (then ``alpha`` in (1, 2],
    ``ref`` (B,) a similarity per row, as a rule its maximum, and ``tau`` (B,) the threshold
    relative to it: weights ``[(alpha - 1) beta (s - ref) - tau]_+^q``); ``config`` holds
    BLOCK_B, BLOCK_D, BLOCK_DV, DOT_F32 and PRECISION. ``threshold`` (B, 2) is what the weights
    are recomputed from (see backward.py): (row max of s, log of the normaliser) for softmax and
    polynomial, (ref, tau) for entmax. ``support`` is only counted for polynomial and entmax
    (softmax needs the lse first).
    """
    num_rows, dim = x.shape
    num_memories, value_dim = values.shape
    rows_per_split = split_size(num_memories, splits)
    splits = -(-num_memories // rows_per_split)
    device = x.device
    f32 = dict(dtype=torch.float32, device=device)
    part_max, part_sum, part_pz, part_pa, part_best = (
        torch.empty(num_rows, splits, **f32) for _ in range(5))
    part_acc = torch.empty(num_rows, splits, value_dim, **f32)
    part_count, part_index = (
        torch.empty(num_rows, splits, dtype=torch.int32, device=device) for _ in range(2))
    q = 1.0 / (alpha - 1.0)
    # A shared tile holds BLOCK_M x d per pipeline stage: within shared memory for 16-bit banks
    # up to d = 256, not for float32 (the compile check measured 360 KB at d = 256), which reads
    # keys and values separately. The interpreter has no such limit and always tests the path.
    same_kv = (similarity_code != SIMILARITY["manhattan"] and values is keys
               and value_dim <= 256 and (not config["DOT_F32"] or interpreting()))
    config = dict(config)
    if same_kv:
        config["BLOCK_DV"] = max(16, triton.next_power_of_2(value_dim))
    grid = (triton.cdiv(num_rows, config["BLOCK_B"]), splits,
            triton.cdiv(value_dim, config["BLOCK_DV"]))
    kernel, options = tuned(_dense_pass_kernel, config, key=("dim", "value_dim"))
    entmax = separation_code == ENTMAX_WITH_TAU
    kernel[grid](
        x, keys, sq_norms if sq_norms is not None else part_max, values, active,
        ref.float().contiguous() if entmax else part_max,  # read only by ENTMAX_WITH_TAU
        tau.float().contiguous() if entmax else part_max,
        part_max, part_sum, part_acc, part_pz, part_pa, part_count, part_best, part_index,
        num_rows, num_memories, dim, value_dim, rows_per_split, splits,
        kernel_scale(beta), float(degree), float(alpha), float(alpha - 1.0), q,
        *strides(x), *strides(keys), *strides(values),
        SIM=similarity_code, SEP=separation_code, Q_KIND=exponent_kind(q), SAME_KV=same_kv,
        **options,
    )
    out = torch.empty(num_rows, value_dim, **f32)
    total = torch.empty(num_rows, **f32)
    row_max = torch.empty(num_rows, **f32)
    block_dv = min(128, max(16, triton.next_power_of_2(value_dim)))
    _combine_kernel[(num_rows, triton.cdiv(value_dim, block_dv))](
        part_max, part_sum, part_acc, out, total, row_max, splits, value_dim, kernel_scale(beta),
        float(degree), SEP=separation_code, BLOCK_S=min(64, triton.next_power_of_2(splits)),
        BLOCK_DV=block_dv,
    )
    if entmax:
        threshold = torch.stack([ref.float(), tau.float()], dim=1)
    else:  # polynomial: a row without a positive score has no weights, log normaliser -inf
        threshold = torch.stack([row_max, torch.log(total)], dim=1)
    if not want_info:
        return out, None, None, None, threshold
    _, argmax = first_argmax(part_best, part_index)
    support = part_count.sum(dim=1).long()
    # The log-normaliser on the kernel's scale, beta s, in float64: beta * max alone may pass
    # float32's range (the cast below then gives inf, as float32 must).
    total64 = total.double()
    if separation_code == SOFTMAX:
        lse = beta * row_max.double() + torch.log(total64)
    elif separation_code == POLYNOMIAL:
        lse = torch.where(
            total > 0,
            degree * (math.log(beta) + torch.log(row_max.double())) + torch.log(total64),
            -math.inf,
        )
    else:
        mean_score = ref.double() + part_pz.sum(dim=1).double() / total64
        tsallis = (1.0 - part_pa.sum(dim=1).double() / total64**alpha) / (alpha * (alpha - 1.0))
        lse = beta * mean_score + tsallis
    return out, support, argmax, lse.float(), threshold
