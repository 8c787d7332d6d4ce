"""The update loop: ``steps`` updates of the queries with clamping and early stopping, over any
one-step function (an in-memory backend's fused step, or the merged step over a bank's parts)."""

from __future__ import annotations

import torch
from torch import Tensor

from .info import RetrieveInfo


def iterate(
    one_step,
    queries: Tensor,
    dtype: torch.dtype,
    *,
    steps: int,
    tol: float | None,
    clamp_mask: Tensor | None,
    return_info: bool,
    score_mask: Tensor | None = None,
):
    """The update loop shared by the host-driven backends.

    ``one_step(rows)`` maps the current iterate of some queries (rows x d, in ``dtype``) to
    ``(new, support, argmax, lse)`` for those rows (the info fields may be None without
    ``return_info``), or with more info fields after ``lse`` (an indexed bank's
    ``fraction_read``, ``mass_bound``), kept like the others. Components under ``clamp_mask``
    are held at their query value; with ``tol``, a query that moved by at most ``tol`` stops and
    its rows are no longer passed to ``one_step``. With ``score_mask`` (B, d) the call is
    ``one_step(rows, mask)``, each row with its mask row (:mod:`hen_fast.masked`). Returns
    ``(out in the queries' dtype, info or None)``.

    Under ``torch.compile`` with ``tol`` the loop runs :func:`_iterate_masked` instead: the same
    results without a batch whose size depends on the data.
    """
    if tol is not None and steps > 1 and torch.compiler.is_compiling():
        return _iterate_masked(one_step, queries, dtype, steps=steps, tol=tol,
                               clamp_mask=clamp_mask, return_info=return_info,
                               score_mask=score_mask)  # fmt: skip
    num_queries = queries.shape[0]
    x0, mask, (steps_taken, *fields) = _start(queries, dtype, clamp_mask)
    x, device = x0, x0.device
    one_step = _with_score_mask(one_step, score_mask, device)
    tol = tol if steps > 1 else None  # one update needs no stopping rule (and dv may differ from d)
    active = None  # None: every query is still moving
    for _ in range(steps):
        rows = x if active is None else x[active]
        new, *step_fields = one_step(rows, active)
        step_fields = [_in_dtype(f, dtype) for f in step_fields]
        if mask is not None:
            held = mask if active is None else mask[active]
            new = torch.where(held, x0 if active is None else x0[active], new)
        moved = (
            None if tol is None else torch.linalg.vector_norm(new.detach() - rows.detach(), dim=1)
        )
        if active is None:
            x, steps_taken = new, steps_taken + 1
            if return_info:
                fields = step_fields
            active = torch.arange(num_queries, device=device) if tol is not None else None
        else:
            x = x.index_copy(0, active, new)
            steps_taken = steps_taken.index_add(0, active, torch.ones_like(active))
            if return_info:
                fields = [f.index_copy(0, active, g) for f, g in zip(fields, step_fields)]
        if moved is not None:
            active = active[moved > tol]
            if active.numel() == 0:
                break
    info = RetrieveInfo(steps_taken, *fields) if return_info else None
    return x.to(queries.dtype), info


def _iterate_masked(one_step, queries: Tensor, dtype: torch.dtype, *, steps: int, tol: float,
                    clamp_mask: Tensor | None, return_info: bool,
                    score_mask: Tensor | None = None):  # fmt: skip
    """:func:`iterate` with ``tol`` as a graph ``torch.compile`` can capture whole.

    The eager loop passes only the moving queries to ``one_step`` (``x[active]``, a size known
    only at run time) and stops when none moves (a branch on tensor data); neither traces. Here
    every step runs on the whole batch for all ``steps`` and a query that has stopped keeps its
    iterate and info (``torch.where`` on a ``moving`` mask), so the outputs and ``info.steps``
    are the eager loop's; the price is that stopped queries are still computed (and discarded)
    until the last step.
    """
    x0, mask, (steps_taken, *fields) = _start(queries, dtype, clamp_mask)
    x = x0
    moving = torch.ones(queries.shape[0], dtype=torch.bool, device=x0.device)
    one_step = _with_score_mask(one_step, score_mask, x0.device)
    for step in range(steps):
        new, *step_fields = one_step(x, None)
        step_fields = [_in_dtype(f, dtype) for f in step_fields]
        if mask is not None:
            new = torch.where(mask, x0, new)
        moved = torch.linalg.vector_norm(new.detach() - x.detach(), dim=1)
        x = torch.where(moving[:, None], new, x)
        steps_taken = steps_taken + moving.long()
        if return_info:
            fields = step_fields if step == 0 else [
                torch.where(moving, g, f) for f, g in zip(fields, step_fields)
            ]  # fmt: skip
        moving = moving & (moved > tol)
    info = RetrieveInfo(steps_taken, *fields) if return_info else None
    return x.to(queries.dtype), info


def _with_score_mask(one_step, score_mask: Tensor | None, device):
    """``step(rows, active)``: ``one_step`` of the rows (``active``: their indices, None for all),
    given their rows of ``score_mask`` when there is one."""
    if score_mask is None:
        return lambda rows, active: one_step(rows)
    score_mask = score_mask.to(device)
    return lambda rows, active: one_step(rows, score_mask if active is None else score_mask[active])


def _start(queries: Tensor, dtype: torch.dtype, clamp_mask: Tensor | None):
    """The loop's start: the queries in ``dtype``, the clamp mask broadcast to them (or None),
    and zero info (steps, support, argmax, lse) per query."""
    x0 = queries.to(dtype)
    mask = None if clamp_mask is None else clamp_mask.to(x0.device).broadcast_to(x0.shape)
    count, device = queries.shape[0], x0.device
    info = [torch.zeros(count, dtype=torch.long, device=device) for _ in range(3)]
    return x0, mask, (*info, torch.zeros(count, dtype=dtype, device=device))


def _in_dtype(field, dtype):
    """A floating info field in the loop's dtype (an index, a count or None as it is)."""
    return field.to(dtype) if field is not None and field.is_floating_point() else field
