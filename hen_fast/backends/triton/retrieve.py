"""``retrieve`` on the Triton kernels: launch geometry, the steps loop on the device, the info.

The loop never asks the host whether queries converged: a per-query active flag lives on the
device, the kernels skip blocks of converged queries, and the loop runs ``steps`` times (the
sparse separations' rare overflow fallback is the one place that reads a flag back).

When autograd needs a backward pass, each update is a :class:`~.backward.RetrieveStep` (the same
fused forward, which also returns the per-row (reference similarity, offset) pair the backward
recomputes the weights from), and the host-driven loop :func:`hen_fast.loop.iterate`
chains the steps.
"""

from __future__ import annotations

import math

import torch
import triton

from ... import codes, loop
from ...info import RetrieveInfo
from ...numerics import SOFTMAX_SUPPORT_EPS, separation_alpha
from ._common import cached_sq_norms, dot_settings, interpreting, num_splits
from .backward import RetrieveStep
from .dense import dense_pass
from .sparse import DEFAULT_CAPACITY, sparse_step
from .stats import threshold_stats


def launch_config(dim: int, value_dim: int, num_rows: int, similarity: str, *tensors) -> dict:
    """Tile sizes the host fixes (the autotuner picks BLOCK_M, warps and stages on a GPU). tl.dot
    needs every side >= 16; manhattan keeps a (B, M, D) tile in registers, so its D slice is
    small. Under the interpreter the tiles are small so tests stay quick."""
    dot_f32, precision = dot_settings(*tensors)
    if interpreting():
        block_b, block_d = 16, 16
    else:
        block_b = 16 if num_rows <= 16 else 32 if num_rows <= 64 else 64
        block_d = 64
    if similarity == "manhattan":  # a (BLOCK_B, BLOCK_M, BLOCK_D) difference tile in registers
        block_b, block_d = 16, 8 if interpreting() else 4
    else:
        block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    block_dv = min(128, max(16, triton.next_power_of_2(value_dim)))
    return dict(
        BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_F32=dot_f32, PRECISION=precision
    )


def retrieve(
    queries, memories, values=None, *, beta=1.0, similarity="dot", separation="softmax", alpha=1.5,
    degree=10, steps=1, tol=None, clamp_mask=None, return_info=False, num_splits_override=None,
    capacity=DEFAULT_CAPACITY, sq_norms=None,
):
    """The Triton backend. Same contract as :func:`hen_fast.backends.torch_backend.retrieve`;
    ``num_splits_override`` forces the number of bank splits (tests), ``capacity`` is the sparse
    candidate buffer per query, ``sq_norms`` cached float32 ``||k||^2`` for ``l2``."""
    values = memories if values is None else values
    num_rows, dim = queries.shape
    num_memories, value_dim = values.shape
    device = queries.device
    similarity_code = codes.similarity_code(similarity)
    if similarity == "l2" and sq_norms is None:
        with torch.no_grad():  # the backward differentiates ||k||^2 itself
            sq_norms = cached_sq_norms(memories)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (queries, memories, values)
    )
    # After the first step the iterate is float32 (from the start when differentiating: the
    # steps then run through loop.iterate), so the dot settings must suit that too.
    iterate = queries if steps == 1 and not needs_grad else queries.float()
    config = launch_config(dim, value_dim, num_rows, similarity, iterate, memories, values)
    splits = num_splits_override or num_splits(
        triton.cdiv(num_rows, config["BLOCK_B"]), num_memories, device
    )
    stats_options = dict(similarity_code=similarity_code, splits=splits, config=config)
    common = dict(beta=beta, **stats_options)

    def one_step(x, active, want_threshold=False):
        """(out, support, argmax, lse) and, with want_threshold, what the weights are recomputed
        from: (B, 2) float32, each row's reference similarity and offset (see backward.py)."""
        if separation in ("softmax", "polynomial"):
            code = codes.separation_code(separation)
            out, support, argmax, lse, threshold = dense_pass(
                x, memories, sq_norms, values, active, separation_code=code, degree=float(degree),
                want_info=return_info or want_threshold, **common,
            )
            if separation == "softmax" and return_info:
                # p > eps  <=>  beta (s - max) > log(normaliser) + log(eps)
                cut = threshold[:, 1] + math.log(SOFTMAX_SUPPORT_EPS)
                support, _, _ = threshold_stats(
                    x, memories, sq_norms, active, threshold[:, 0], cut, scale=beta,
                    **stats_options,
                )
        else:
            out, support, argmax, lse, threshold = sparse_step(
                x, memories, sq_norms, values, active, alpha=separation_alpha(separation, alpha),
                capacity=capacity, want_info=return_info, **common,
            )
        if want_threshold:
            return out, support, argmax, lse, threshold
        return out, support, argmax, lse

    if needs_grad:
        sparse = separation in ("sparsemax", "entmax")
        sep_alpha = separation_alpha(separation, alpha) if sparse else 2.0  # unused when smooth
        backward_options = dict(
            beta=beta, similarity_code=similarity_code,
            separation_code=codes.separation_code(separation),
            alpha=sep_alpha, degree=float(degree), config=config, splits=splits,
        )

        def forward_step(rows):
            active = torch.ones(rows.shape[0], dtype=torch.int32, device=device)
            out, support, argmax, lse, threshold = one_step(rows, active, want_threshold=True)
            if return_info and similarity == "l2":
                lse = lse - beta * (rows * rows).sum(dim=1)
            return out, support, argmax, lse, threshold

        def differentiable_step(rows):
            return RetrieveStep.apply(
                rows.contiguous(), memories, values, sq_norms, forward_step, backward_options
            )

        return loop.iterate(differentiable_step, queries, torch.float32, steps=steps, tol=tol,
                       clamp_mask=clamp_mask, return_info=return_info)

    held = queries.float()  # the values clamp_mask holds, converted once
    x = queries
    mask = None if clamp_mask is None else clamp_mask.to(device).broadcast_to(queries.shape)
    active = torch.ones(num_rows, dtype=torch.int32, device=device)
    steps_taken = torch.zeros(num_rows, dtype=torch.long, device=device)
    support = torch.zeros(num_rows, dtype=torch.long, device=device)
    argmax = torch.zeros(num_rows, dtype=torch.long, device=device)
    lse = torch.zeros(num_rows, dtype=torch.float32, device=device)
    tol = tol if steps > 1 else None
    for _ in range(steps):
        current = x.float()
        new, step_support, step_argmax, step_lse = one_step(x, active)
        if mask is not None:
            new = torch.where(mask, held, new)
        moving = active.bool()
        if return_info:
            if similarity == "l2":  # the kernels score 2 x.k - ||k||^2: shift back to -||x - k||^2
                step_lse = step_lse - beta * (current * current).sum(dim=1)
            support = torch.where(moving, step_support, support)
            argmax = torch.where(moving, step_argmax, argmax)
            lse = torch.where(moving, step_lse, lse)
        if tol is not None:
            moved = torch.linalg.vector_norm(new - current, dim=1)
            active = active * (moved > tol).to(active.dtype)
        x = new if steps == 1 else torch.where(moving[:, None], new, current)
        steps_taken += moving.long()
    info = RetrieveInfo(steps_taken, support, argmax, lse) if return_info else None
    return x.to(queries.dtype), info
