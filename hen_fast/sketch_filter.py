"""The sketch filter of the bank index: the rows whose per-row bound passes each query's cut, in
one read of the index's row sketch (p float16 numbers and one float32 per row instead of
the key's d).

An index built with a sketch (:func:`hen_fast.index.sketch_basis`) keeps, per row ``i``, the
coordinates ``U^T k_i`` in an orthonormal basis ``U`` of the keys' leading directions and the
norm of the rest, ``||k_i - U U^T k_i||``. For a query ``x``,

    x . k_i = (U^T x) . (U^T k_i) + (x - U U^T x) . (k_i - U U^T k_i)
           <= (U^T x) . (U^T k_i) + ||x - U U^T x|| ||k_i - U U^T k_i||

(l2 likewise, doubled, less ``||k_i||^2``), and :func:`hen_fast.index.sketch_query_terms` adds a
margin over the kernels' rounding. A row whose bound is at or below the query's cut cannot
matter (:mod:`hen_fast.indexed` says which cut), so only the rows this returns are read.

The op ``hen_fast::sketch_filter`` (csrc/cpu/sketch_filter.cpp, schema in csrc/common/ops.h)
computes it on the CPU; :func:`sketch_filter_torch` is the same in torch ops, for builds without
the extension (and the reference its tests hold it to, beside a float64 one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Rows per block of the torch version (its cut rises block by block), and rows of each block
# scored before the rest are held to the cut (those of highest bound).
TORCH_BLOCK_ROWS = 1 << 16
TORCH_SEED_ROWS = 8


def sketch_filter(x: Tensor, keys: Tensor, sq_norms: Tensor | None, coords: Tensor, rest: Tensor,
                  sketch: Tensor, residual: Tensor, cut: Tensor, gap: Tensor,
                  limit: int = -1) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(rows, counts, cut_used)``. Query ``b`` holds each row's bound
    ``coords[b] . sketch[:, i] + rest[b] * residual[i] (- sq_norms[i])`` to its cut, which starts
    at ``cut[b]``; a row above it is scored, ``x[b] . keys[i] (- sq_norms[i])``, and the cut
    rises to that score less ``gap[b]`` where that is higher. ``rows``: the bank rows (int64,
    ascending) that passed for at least one query (a NaN bound passes); ``counts``: how many
    passed for each; ``cut_used``: each query's highest cut (every row left out had a bound at
    or below it). Float32 CPU tensors: ``x`` ``(B, d)``, ``coords`` ``(B, p)``, ``rest``,
    ``cut``, ``gap`` ``(B,)``, ``residual`` and ``sq_norms`` ``(M,)``; ``sketch`` ``(p, M)``
    float16 with unit column stride; ``keys`` ``(M, d)`` float32, bfloat16 or float16.

    With ``limit >= 0`` the filter may stop once a query passed more than ``limit`` rows, or
    passes them at a pace that will (more than ``limit / 4`` ahead of ``limit`` times the share
    of rows read): that query's count is then above ``limit``, and ``rows`` and ``counts`` are
    incomplete (the caller scans instead). Which rows pass can vary from run to run (threads
    raise the cut as they go), never below the final cut."""
    from .backends.cpu import load_extension

    args = (x, keys, sq_norms, coords, rest, sketch, residual, cut, gap, limit)
    if load_extension():
        return torch.ops.hen_fast.sketch_filter(*args)
    return sketch_filter_torch(*args)


def sketch_filter_torch(x, keys, sq_norms, coords, rest, sketch, residual, cut, gap, limit=-1):
    """:func:`sketch_filter` in torch ops, block by block of rows: each block's rows of highest
    bound are scored first and raise the cut, then the block is held to it (it never stops
    early, and which rows pass does not vary)."""
    queries, rows = coords.shape[0], sketch.shape[1]
    cut = cut.clone()
    passed, counts = [], torch.zeros(queries, dtype=torch.long)
    for start in range(0, rows, TORCH_BLOCK_ROWS):
        stop = min(rows, start + TORCH_BLOCK_ROWS)
        bound = torch.addmm(rest[:, None] * residual[None, start:stop], coords,
                            sketch[:, start:stop].float())  # fmt: skip
        if sq_norms is not None:
            bound -= sq_norms[None, start:stop]
        # the rows of highest bound first (likely the best): their scores raise the cut
        top = bound.topk(min(TORCH_SEED_ROWS, stop - start), dim=1).indices
        cut = torch.maximum(cut, (_scores(x, keys, sq_norms, top + start) - gap[:, None])
                            .max(dim=1).values)  # fmt: skip
        above = ~(bound <= cut[:, None])
        counts += above.sum(dim=1)
        found = above.any(dim=0).nonzero()[:, 0]
        if found.numel():
            scores = x @ keys[found + start].float().T  # every query on the rows any passed
            if sq_norms is not None:
                scores -= sq_norms[found + start]
            best = torch.where(above[:, found], scores, -math.inf).max(dim=1).values
            cut = torch.maximum(cut, best - gap)
        passed.append(found + start)
    rows_passed = torch.cat(passed) if passed else torch.zeros(0, dtype=torch.long)
    return rows_passed, counts, cut


def _scores(x: Tensor, keys: Tensor, sq_norms: Tensor | None, rows: Tensor) -> Tensor:
    """``(B, n)``: query ``b``'s score on bank rows ``rows[b]`` (a few rows each)."""
    picked = keys[rows].float()  # (B, n, d)
    scores = torch.einsum("bd,bnd->bn", x, picked)
    return scores if sq_norms is None else scores - sq_norms[rows]
