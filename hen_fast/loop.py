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
):
    """The update loop shared by the host-driven backends.

    ``one_step(rows)`` maps the current iterate of some queries (rows x d, in ``dtype``) to
    ``(new, support, argmax, lse)`` for those rows. Components under ``clamp_mask`` are held at
    their query value; with ``tol``, a query that moved by at most ``tol`` stops and its rows are
    no longer passed to ``one_step``. Returns ``(out in the queries' dtype, info or None)``.
    """
    num_queries = queries.shape[0]
    x0 = queries.to(dtype)
    x = x0
    mask = None if clamp_mask is None else clamp_mask.to(x.device).broadcast_to(x.shape)
    device = x.device
    steps_taken = torch.zeros(num_queries, dtype=torch.long, device=device)
    support = torch.zeros(num_queries, dtype=torch.long, device=device)
    argmax = torch.zeros(num_queries, dtype=torch.long, device=device)
    lse = torch.zeros(num_queries, dtype=dtype, device=device)
    tol = tol if steps > 1 else None  # one update needs no stopping rule (and dv may differ from d)
    active = None  # None: every query is still moving
    for _ in range(steps):
        rows = x if active is None else x[active]
        new, step_support, step_argmax, step_lse = one_step(rows)
        if mask is not None:
            held = mask if active is None else mask[active]
            new = torch.where(held, x0 if active is None else x0[active], new)
        moved = (
            None if tol is None else torch.linalg.vector_norm(new.detach() - rows.detach(), dim=1)
        )
        if active is None:
            x, steps_taken = new, steps_taken + 1
            if return_info:
                support, argmax, lse = step_support, step_argmax, step_lse.to(dtype)
            active = torch.arange(num_queries, device=device) if tol is not None else None
        else:
            x = x.index_copy(0, active, new)
            steps_taken = steps_taken.index_add(0, active, torch.ones_like(active))
            if return_info:
                support = support.index_copy(0, active, step_support)
                argmax = argmax.index_copy(0, active, step_argmax)
                lse = lse.index_copy(0, active, step_lse.to(dtype))
        if moved is not None:
            active = active[moved > tol]
            if active.numel() == 0:
                break
    info = RetrieveInfo(steps_taken, support, argmax, lse) if return_info else None
    return x.to(queries.dtype), info
