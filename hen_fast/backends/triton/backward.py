"""The backward pass of one retrieval update on Triton kernels, and its autograd Function.

For ``out = p(z) V`` with ``z = beta * s``, ``s = sim(x, K)``, the forward saves x, K, V, out and
two numbers per query that turn a similarity into its weight: a reference similarity m (the
row's maximum) and an offset t on the scale of z (softmax: ``p = exp(beta (s - m) - t)``, t the
log of the normaliser; polynomial: ``p = (s / m)^n exp(-t)`` for s > 0; entmax:
``p = [(alpha - 1) beta (s - m) - t]_+^q``, ``q = 1 / (alpha - 1)``, t = tau relative to the
max). Relative to m, nothing cancels or overflows at large beta (see _common.score_tile). The
backward recomputes the weights tile by tile, as FlashAttention's does. With ``dp = dout V^T``
every separation's score gradient is ``dz = g (dp - c)``:

* softmax: ``g = p``, ``c = dout . out``;
* polynomial: ``g = n p / z`` where ``z > 0``, ``c = dout . out``;
* entmax: ``g = p^(2 - alpha) = [(alpha - 1) z - tau]_+^(q - 1)`` (the support's indicator for
  sparsemax) and ``c = sum_j g_j dp_j / sum_j g_j``: the threshold moves with the scores. That
  needs a pass over the bank, ``_slope_values_kernel`` (``sum g V`` and ``sum g`` per split).

Then, as FlashAttention splits its backward, ``_grad_queries_kernel`` owns a block of queries and
streams the bank (``dx = dz dz/dx``), and ``_grad_bank_kernel`` owns a tile of the bank and
streams the queries (``dK = dz^T dz/dK``, ``dV = p^T dout``): no atomics, every output element
written once by one program. Everything is computed in float32 (exact float32 dot products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    ENTMAX,
    LOG2E,
    SEP_ENTMAX,
    SEP_POLYNOMIAL,
    SEP_SOFTMAX,
    SIM_L2,
    SIM_MANHATTAN,
    SIMILARITY,
    interpreting,
    load_tile,
    memory_tile,
    power,
    score_tile,
    split_size,
    strides,
    tile_offsets,
    untuned,
)

# How g = excess^(q - 1) is formed for entmax: an indicator (sparsemax), excess itself (alpha
# 1.5), or a general power.
SLOPE_INDICATOR, SLOPE_LINEAR, SLOPE_POWER = 3, 1, 0


@triton.jit
def _weights_and_slopes(
    s, ref, t, row_mask, beta, degree, alpha_minus_1, q, q_minus_1, SEP: tl.constexpr,
    Q_KIND: tl.constexpr, G_KIND: tl.constexpr,
):
    """(p, g = dp/dz) of a (BLOCK_B, BLOCK_M) tile of similarities s; zero outside the rows and
    the bank (s = -inf there)."""
    if SEP == SEP_SOFTMAX:
        p = tl.exp2(((s - ref[:, None]) * beta - t[:, None]) * LOG2E)
        g = p
    elif SEP == SEP_POLYNOMIAL:
        positive = s > 0
        # A row without a positive score has m = 0, t = -inf and zero weights.
        safe_ref = tl.where(ref > 0, ref, 1.0)
        safe_t = tl.where(t == float("-inf"), float("inf"), t)
        log_r = tl.log(tl.where(positive, s, 1.0) / safe_ref[:, None])
        p = tl.where(positive, tl.exp(degree * log_r - safe_t[:, None]), 0.0)
        # n p / z = n (s / m)^(n - 1) exp(-t) / (beta m)
        g = tl.where(positive, degree * tl.exp((degree - 1.0) * log_r - safe_t[:, None]), 0.0)
        g = g / (beta * safe_ref[:, None])
    else:
        excess = tl.maximum(alpha_minus_1 * beta * (s - ref[:, None]) - t[:, None], 0.0)
        p = power(excess, q, Q_KIND)
        if G_KIND == 3:
            g = (excess > 0).to(tl.float32)
        else:
            g = power(excess, q_minus_1, G_KIND)
    p = tl.where(row_mask[:, None], p, 0.0)
    g = tl.where(row_mask[:, None], g, 0.0)
    return p, g


@triton.jit
def _score_grads(
    dout_ptr, v_ptr, shift, rows, mems, row_mask, mem_mask, g, value_dim, stride_vm, stride_vd,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dz = g (dout V^T - c) for a tile; dout is contiguous (B, dv)."""
    dp = tl.zeros((BLOCK_B, BLOCK_M), tl.float32)
    for c0 in range(0, value_dim, BLOCK_DV):
        cols = c0 + tl.arange(0, BLOCK_DV)
        col_mask = cols < value_dim
        dout = tl.load(
            dout_ptr + tile_offsets(rows, cols, value_dim, 1),
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        values = load_tile(v_ptr, mems, cols, stride_vm, stride_vd, mem_mask, col_mask)
        dp = tl.dot(dout, tl.trans(values), dp, input_precision="ieee")
    return g * (dp - shift[:, None])


@triton.jit
def _sign(diff):
    return tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))


@triton.jit
def _slope_values_kernel(
    x_ptr, k_ptr, norms_ptr, v_ptr, ref_ptr, t_ptr, part_acc_ptr, part_total_ptr, num_rows,
    num_memories, dim, value_dim, rows_per_split, num_splits, beta, alpha_minus_1, q_minus_1,
    stride_xb, stride_xd, stride_km, stride_kd, stride_vm, stride_vd, SIM: tl.constexpr,
    G_KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (query block, bank split, value slice): sum_j g_j v_j and sum_j g_j (entmax)."""
    pid_s, pid_v = tl.program_id(1), tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, num_memories)
    cols = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_mask = cols < value_dim
    ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
    t = tl.load(t_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_B, BLOCK_DV), tl.float32)
    total = tl.zeros((BLOCK_B,), tl.float32)
    for m0 in range(start, stop, BLOCK_M):
        mems, mem_mask, s = memory_tile(
            m0, stop, x_ptr, k_ptr, norms_ptr, rows, row_mask, stride_xb, stride_xd, stride_km,
            stride_kd, dim, SIM, BLOCK_B, BLOCK_M, BLOCK_D, DOT_F32, PRECISION,
        )
        _, g = _weights_and_slopes(
            s, ref, t, row_mask, beta, 1.0, alpha_minus_1, 1.0, q_minus_1, SEP_ENTMAX, 1, G_KIND,
        )
        values = load_tile(v_ptr, mems, cols, stride_vm, stride_vd, mem_mask, col_mask)
        acc = tl.dot(g, values, acc, input_precision="ieee")
        total += tl.sum(g, axis=1)
    part = rows.to(tl.int64) * num_splits + pid_s
    tl.store(
        part_acc_ptr + tile_offsets(part, cols, value_dim, 1),
        acc,
        mask=row_mask[:, None] & col_mask[None, :],
    )
    if pid_v == 0:
        tl.store(part_total_ptr + part, total, mask=row_mask)


@triton.jit
def _grad_queries_kernel(
    x_ptr, k_ptr, norms_ptr, v_ptr, ref_ptr, t_ptr, dout_ptr, shift_ptr, grad_x_ptr, num_rows,
    num_memories, dim, value_dim, beta, scale, degree, alpha_minus_1, q, q_minus_1, stride_xb,
    stride_xd, stride_km, stride_kd, stride_vm, stride_vd, SIM: tl.constexpr, SEP: tl.constexpr,
    Q_KIND: tl.constexpr, G_KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DX: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dx for BLOCK_B queries and BLOCK_DX of their components, streaming the whole bank."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    dcols = tl.program_id(1) * BLOCK_DX + tl.arange(0, BLOCK_DX)
    dcol_mask = dcols < dim
    ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
    t = tl.load(t_ptr + rows, mask=row_mask, other=0.0)
    shift = tl.load(shift_ptr + rows, mask=row_mask, other=0.0)
    if SIM == SIM_MANHATTAN:
        x_slice = tl.load(
            x_ptr + tile_offsets(rows, dcols, stride_xb, stride_xd),
            mask=row_mask[:, None] & dcol_mask[None, :],
            other=0.0,
        )
    acc = tl.zeros((BLOCK_B, BLOCK_DX), tl.float32)
    for m0 in range(0, num_memories, BLOCK_M):
        mems, mem_mask, s = memory_tile(
            m0, num_memories, x_ptr, k_ptr, norms_ptr, rows, row_mask, stride_xb, stride_xd,
            stride_km, stride_kd, dim, SIM, BLOCK_B, BLOCK_M, BLOCK_D, DOT_F32, PRECISION,
        )
        _, g = _weights_and_slopes(
            s, ref, t, row_mask, beta, degree, alpha_minus_1, q, q_minus_1, SEP, Q_KIND, G_KIND,
        )
        dz = _score_grads(
            dout_ptr, v_ptr, shift, rows, mems, row_mask, mem_mask, g, value_dim, stride_vm,
            stride_vd, BLOCK_B, BLOCK_M, BLOCK_DV,
        )
        keys = load_tile(k_ptr, mems, dcols, stride_km, stride_kd, mem_mask, dcol_mask)
        if SIM == SIM_MANHATTAN:  # d(-|x - k|)/dx = -sign(x - k)
            signs = _sign(x_slice[:, None, :] - keys[None, :, :])
            acc -= tl.sum(dz[:, :, None] * signs, axis=1)
        else:
            acc = tl.dot(dz, keys, acc, input_precision="ieee")
    tl.store(
        grad_x_ptr + tile_offsets(rows, dcols, dim, 1),
        scale * acc,
        mask=row_mask[:, None] & dcol_mask[None, :],
    )


@triton.jit
def _grad_bank_kernel(
    x_ptr, k_ptr, norms_ptr, v_ptr, ref_ptr, t_ptr, dout_ptr, shift_ptr, grad_ptr, num_rows,
    num_memories, dim, value_dim, beta, scale, degree, alpha_minus_1, q, q_minus_1, stride_xb,
    stride_xd, stride_km, stride_kd, stride_vm, stride_vd, SIM: tl.constexpr, SEP: tl.constexpr,
    Q_KIND: tl.constexpr, G_KIND: tl.constexpr, VALUES: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DX: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dV (VALUES) or dK for BLOCK_M memories and BLOCK_DX of their columns, streaming every
    query."""
    mems = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mem_mask = mems < num_memories
    width = value_dim if VALUES else dim
    cols = tl.program_id(1) * BLOCK_DX + tl.arange(0, BLOCK_DX)
    col_mask = cols < width
    if not VALUES:
        keys = load_tile(k_ptr, mems, cols, stride_km, stride_kd, mem_mask, col_mask)
        column_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DX), tl.float32)
    for r0 in range(0, num_rows, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_mask = rows < num_rows
        ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
        t = tl.load(t_ptr + rows, mask=row_mask, other=0.0)
        s = score_tile(
            x_ptr, k_ptr, norms_ptr, rows, mems, row_mask, mem_mask, stride_xb, stride_xd,
            stride_km, stride_kd, dim, SIM, BLOCK_B, BLOCK_M, BLOCK_D, DOT_F32, PRECISION,
        )
        p, g = _weights_and_slopes(
            s, ref, t, row_mask, beta, degree, alpha_minus_1, q, q_minus_1, SEP, Q_KIND, G_KIND,
        )
        if VALUES:
            dout = tl.load(
                dout_ptr + tile_offsets(rows, cols, value_dim, 1),
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(p), dout, acc, input_precision="ieee")
        else:
            shift = tl.load(shift_ptr + rows, mask=row_mask, other=0.0)
            dz = _score_grads(
                dout_ptr, v_ptr, shift, rows, mems, row_mask, mem_mask, g, value_dim, stride_vm,
                stride_vd, BLOCK_B, BLOCK_M, BLOCK_DV,
            )
            x = load_tile(x_ptr, rows, cols, stride_xb, stride_xd, row_mask, col_mask)
            if SIM == SIM_MANHATTAN:  # d(-|x - k|)/dk = sign(x - k)
                signs = _sign(x[:, None, :] - keys[None, :, :])
                acc += tl.sum(dz[:, :, None] * signs, axis=0)
            else:
                acc = tl.dot(tl.trans(dz), x, acc, input_precision="ieee")
                column_sum += tl.sum(dz, axis=0)
    if not VALUES:
        if SIM == SIM_L2:  # d(-||k||^2)/dk = -2k; scale is 2 beta
            acc -= column_sum[:, None] * keys
        acc = scale * acc
    tl.store(
        grad_ptr + tile_offsets(mems, cols, width, 1),
        acc,
        mask=mem_mask[:, None] & col_mask[None, :],
    )


def _column_block(width: int, similarity_code: int, config: dict) -> int:
    """Columns of dx / dK / dV per program: manhattan keeps a (B, M, columns) tile in registers."""
    if similarity_code == SIMILARITY["manhattan"]:
        return config["BLOCK_D"]
    return min(16 if interpreting() else 64, max(16, triton.next_power_of_2(width)))


def step_backward(
    grad_out, x, keys, sq_norms, values, out, threshold, *, beta, similarity_code, separation_code,
    alpha, degree, config, splits,
):
    """(grad_x, grad_keys, grad_values) in float32 for one update, from the saved forward."""
    num_rows, dim = x.shape
    num_memories, value_dim = values.shape
    device = x.device
    f32 = dict(dtype=torch.float32, device=device)
    grad_out = grad_out.float().contiguous()
    # (B, 2): each row's reference similarity and the offset on z's scale (see the docstring)
    ref = threshold[:, 0].float().contiguous()
    offset = threshold[:, 1].float().contiguous()
    norms = sq_norms if sq_norms is not None else ref  # read only for l2
    q = 1.0 / (alpha - 1.0)
    q_kind = 1 if q == 1.0 else 2 if q == 2.0 else 0
    g_kind = 3 if q == 1.0 else 1 if q == 2.0 else 0
    options = untuned({k: v for k, v in config.items() if k not in ("DOT_F32",)})
    options["DOT_F32"] = True
    block_b, block_m = options["BLOCK_B"], options["BLOCK_M"]
    scalars = (
        float(beta), float(2 * beta if similarity_code == SIMILARITY["l2"] else beta),
        float(degree), float(alpha - 1.0), q, q - 1.0,
    )
    all_strides = (*strides(x), *strides(keys), *strides(values))
    codes = dict(SIM=similarity_code, SEP=separation_code, Q_KIND=q_kind, G_KIND=g_kind)

    if separation_code == ENTMAX:
        rows_per_split = split_size(num_memories, splits)
        splits = -(-num_memories // rows_per_split)
        part_acc = torch.empty(num_rows, splits, value_dim, **f32)
        part_total = torch.empty(num_rows, splits, **f32)
        grid = (triton.cdiv(num_rows, block_b), splits, triton.cdiv(value_dim, options["BLOCK_DV"]))
        _slope_values_kernel[grid](
            x, keys, norms, values, ref, offset, part_acc, part_total, num_rows, num_memories, dim,
            value_dim, rows_per_split, splits, float(beta), float(alpha - 1.0), q - 1.0,
            *all_strides, SIM=similarity_code, G_KIND=g_kind, **options,
        )
        shift = (grad_out * part_acc.sum(dim=1)).sum(dim=1) / part_total.sum(dim=1)
    else:
        shift = (grad_out * out.float()).sum(dim=1)
    shift = shift.contiguous()

    grad_x = torch.empty(num_rows, dim, **f32)
    block_dx = _column_block(dim, similarity_code, config)
    _grad_queries_kernel[(triton.cdiv(num_rows, block_b), triton.cdiv(dim, block_dx))](
        x, keys, norms, values, ref, offset, grad_out, shift, grad_x, num_rows, num_memories, dim,
        value_dim, *scalars, *all_strides, **codes, BLOCK_DX=block_dx, **options,
    )
    grads = [grad_x]
    for is_values, width in ((False, dim), (True, value_dim)):
        grad = torch.empty(num_memories, width, **f32)
        column_code = SIMILARITY["dot"] if is_values else similarity_code
        block_cols = _column_block(width, column_code, config)
        _grad_bank_kernel[(triton.cdiv(num_memories, block_m), triton.cdiv(width, block_cols))](
            x, keys, norms, values, ref, offset, grad_out, shift, grad, num_rows, num_memories, dim,
            value_dim, *scalars, *all_strides, **codes, VALUES=is_values, BLOCK_DX=block_cols,
            **options,
        )
        grads.append(grad)
    return tuple(grads)


class RetrieveStep(torch.autograd.Function):
    """One update ``x -> p(beta sim(x, K)) V`` on the Triton kernels, differentiable in x, K, V.

    ``forward_step(x) -> (out, support, argmax, lse, threshold)`` runs the fused forward;
    ``options`` are :func:`step_backward`'s keyword arguments. Returns (out, support, argmax,
    lse); only out is differentiable.
    """

    @staticmethod
    def forward(ctx, x, keys, values, sq_norms, forward_step, options):
        out, support, argmax, lse, threshold = forward_step(x)
        ctx.save_for_backward(x, keys, values, sq_norms, out, threshold)
        ctx.options = options
        outputs = [t for t in (support, argmax, lse) if t is not None]
        ctx.mark_non_differentiable(*outputs)
        return out, support, argmax, lse

    @staticmethod
    def backward(ctx, grad_out, *_):
        x, keys, values, sq_norms, out, threshold = ctx.saved_tensors
        grad_x, grad_keys, grad_values = step_backward(
            grad_out, x, keys, sq_norms, values, out, threshold, **ctx.options,
        )
        needs = ctx.needs_input_grad
        return (
            grad_x.to(x.dtype) if needs[0] else None,
            grad_keys.to(keys.dtype) if needs[1] else None,
            grad_values.to(values.dtype) if needs[2] else None,
            None,
            None,
            None,
        )
