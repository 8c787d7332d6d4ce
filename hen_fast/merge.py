"""One exact retrieval update over a bank split into parts, merging each part's partial state.

The parts are chunks of a bank read one at a time (out-of-core: a memory-mapped bank, or a bank
on the host while the queries are on a GPU) and shards held by other processes
(:mod:`hen_fast.distributed`). A :class:`BankSource` yields this process's chunks; a group's
``gather`` exchanges per-process states (nothing to exchange in one process). Every process folds
the gathered states in rank order, so all of them compute bit-identical results, and with
``steps > 1`` they take identical decisions (``tol``, thresholds) without further talk.

* softmax and polynomial: each chunk goes through a fused backend with ``return_info`` and gives
  ``(lse, out, argmax)``; states merge exactly by log-sum-exp weights,
  ``L = log(exp L_a + exp L_b)``, ``out = exp(L_a - L) out_a + exp(L_b - L) out_b`` (polynomial's
  ``lse`` is ``log sum relu(z)^n``, so the same rule is its running-max merge). Softmax's support
  count needs the global ``L``: a counting pass when ``return_info`` asks for it.
* sparsemax and entmax: one pass keeps each query's ``candidates`` highest scores over all parts
  with their memory indices; the global threshold is solved exactly on them (the same maths as
  :mod:`hen_fast.reference`), and the output gathers only the support's value rows. Rows whose
  support outgrows the buffer get Newton passes whose sums add across chunks and processes, then an
  output pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .backends.norms import remember_sq_norms
from .reference import (
    SOFTMAX_SUPPORT_EPS,
    _Argmax,
    _newton_threshold,
    _power,
    _row_sums,
    _sorted_threshold,
    separation_alpha,
    similarity_scores,
)

Chunk = tuple[int, Tensor, Tensor | None, Tensor | None]  # (global start, keys, norms, values)


class BankSource(Protocol):
    """This process's part of the bank, as chunks on the compute device."""

    offset: int  # global index of this process's first memory
    local_count: int  # memories held here
    num_memories: int  # memories over every process
    value_dim: int

    def chunks(self) -> Iterator[Chunk]: ...

    def values_at(self, local_index: Tensor) -> Tensor: ...


class LocalGroup:
    """The collective of a single process: every part is here, nothing to exchange."""

    size = 1

    def gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]


LOCAL = LocalGroup()


def sum_in_order(group, tensor: Tensor) -> Tensor:
    """The sum over processes, added in rank order (the same bits on every process)."""
    parts = group.gather(tensor)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def merged_step(
    rows: Tensor,
    source: BankSource,
    group=LOCAL,
    *,
    impl,
    beta: float,
    similarity: str,
    separation: str,
    alpha: float,
    degree: float,
    candidates: int,
    want_info: bool,
):
    """``(out, support, argmax, lse)`` of one update of ``rows`` over the whole bank, as
    :func:`hen_fast.reference.iterate` expects from ``one_step``."""
    if separation in ("softmax", "polynomial"):
        return _dense_step(rows, source, group, impl, beta, similarity, separation, degree,
                           want_info)  # fmt: skip
    return _sparse_step(
        rows, source, group, beta, similarity, separation_alpha(separation, alpha), candidates
    )


# ------------------------------------------------------------------------- softmax, polynomial
@dataclass
class _Partial:
    lse: Tensor
    out: Tensor
    best: Tensor  # the highest similarity seen (for the argmax across parts)
    argmax: Tensor  # global memory index of it
    support: Tensor

    def merge(self, other: _Partial) -> _Partial:
        lse = torch.logaddexp(self.lse, other.lse)
        mine, theirs = _weight(self.lse, lse), _weight(other.lse, lse)
        better = other.best > self.best  # strict: the earlier part keeps a tie
        return _Partial(
            lse,
            self.out * mine[:, None] + other.out * theirs[:, None],
            torch.where(better, other.best, self.best),
            torch.where(better, other.argmax, self.argmax),
            self.support + other.support,
        )


def _weight(part_lse: Tensor, lse: Tensor) -> Tensor:
    # A part with no mass (polynomial: every score <= 0) weighs 0, also when no part has any.
    return torch.where(torch.isneginf(part_lse), 0.0, torch.exp(part_lse - lse))


def _dense_step(rows, source, group, impl, beta, similarity, separation, degree, want_info):
    state = None
    for start, keys, norms, values in source.chunks():
        if norms is not None:
            remember_sq_norms(keys, norms)
        out, info = impl.retrieve(
            rows, keys, values, beta=beta, similarity=similarity, separation=separation,
            degree=degree, steps=1, tol=None, clamp_mask=None, return_info=True,
        )  # fmt: skip
        best = _similarity_at(rows, keys[info.argmax].to(rows.dtype), similarity)
        part = _Partial(info.lse.to(rows.dtype), out.to(rows.dtype), best, info.argmax + start,
                        info.support)  # fmt: skip
        state = part if state is None else state.merge(part)
    if state is None:  # an empty shard
        state = _empty_partial(rows, source.value_dim)
    if group.size > 1:
        fields = [group.gather(t) for t in (state.lse, state.out, state.best, state.argmax,
                                            state.support)]  # fmt: skip
        parts = [_Partial(*per_rank) for per_rank in zip(*fields)]
        state = parts[0]
        for part in parts[1:]:
            state = state.merge(part)
    support = state.support
    if separation == "softmax" and want_info:
        support = _softmax_support(rows, source, group, beta, similarity, state.lse)
    return state.out, support, state.argmax, state.lse


def _empty_partial(rows: Tensor, value_dim: int) -> _Partial:
    count = rows.shape[0]
    minus_inf = torch.full((count,), -math.inf, dtype=rows.dtype, device=rows.device)
    zeros = torch.zeros(count, dtype=torch.long, device=rows.device)
    return _Partial(minus_inf, rows.new_zeros(count, value_dim), minus_inf.clone(), zeros,
                    zeros.clone())  # fmt: skip


def _similarity_at(rows: Tensor, keys: Tensor, similarity: str) -> Tensor:
    """Each row's similarity to its own key (the chunk's best), to compare bests across chunks."""
    if similarity == "dot":
        return (rows * keys).sum(dim=1)
    if similarity == "l2":
        return -(rows - keys).pow(2).sum(dim=1)
    return -(rows - keys).abs().sum(dim=1)


def _scores(rows, keys, norms, beta, similarity) -> Tensor:
    """``beta * sim`` of a chunk in the rows' dtype (l2 shifted by ``beta ||x||^2``, as in the
    reference)."""
    norms = None if norms is None else norms.to(rows.dtype)
    return beta * similarity_scores(rows, keys.to(rows.dtype), similarity, norms)


def _l2_shift(rows: Tensor, beta: float, similarity: str) -> Tensor | float:
    return beta * (rows * rows).sum(dim=1) if similarity == "l2" else 0.0


def _softmax_support(rows, source, group, beta, similarity, lse) -> Tensor:
    """Weights above 1e-6 given the global log-partition: ``z > lse + log(eps)``."""
    threshold = (lse + _l2_shift(rows, beta, similarity) + math.log(SOFTMAX_SUPPORT_EPS))[:, None]
    count = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    for _, keys, norms, _ in source.chunks():
        count += (_scores(rows, keys, norms, beta, similarity) > threshold).sum(dim=1)
    return sum_in_order(group, count)


# --------------------------------------------------------------------------- sparsemax, entmax
def _top(scores: Tensor, index: Tensor, count: int) -> tuple[Tensor, Tensor]:
    kept, where = scores.topk(min(count, scores.shape[1]), dim=1, sorted=True)
    return kept, index.gather(1, where)


def _sparse_candidates(rows, source, group, beta, similarity, candidates):
    """The ``candidates`` highest scores of every row over the whole bank, their global indices,
    and the argmax."""
    count, device = rows.shape[0], rows.device
    argmax = _Argmax(count, rows)
    kept = rows.new_empty(count, 0)
    kept_index = torch.empty(count, 0, dtype=torch.long, device=device)
    for start, keys, norms, _ in source.chunks():
        z = _scores(rows, keys, norms, beta, similarity)
        argmax.update(start, z)
        index = torch.arange(start, start + z.shape[1], device=device).expand(count, -1)
        kept, kept_index = _top(torch.cat([kept, z], 1), torch.cat([kept_index, index], 1),
                                candidates)  # fmt: skip
    if group.size > 1:
        # Every process sends exactly `candidates` columns (padding sorts below any score).
        pad = candidates - kept.shape[1]
        kept = torch.nn.functional.pad(kept, (0, pad), value=-math.inf)
        kept_index = torch.nn.functional.pad(kept_index, (0, pad), value=-1)
        kept, kept_index = _top(
            torch.cat(group.gather(kept), 1),
            torch.cat(group.gather(kept_index), 1),
            min(candidates, source.num_memories),
        )
        bests, indices = group.gather(argmax.best), group.gather(argmax.index)
        best, index = bests[0], indices[0]
        for other_best, other_index in zip(bests[1:], indices[1:]):
            better = other_best > best
            best, index = torch.where(better, other_best, best), torch.where(better, other_index,
                                                                              index)  # fmt: skip
        return kept, kept_index, index
    return kept, kept_index, argmax.index


def _sparse_step(rows, source, group, beta, similarity, alpha, candidates):
    q = 1.0 / (alpha - 1.0)
    dtype = rows.dtype
    kept, kept_index, argmax = _sparse_candidates(rows, source, group, beta, similarity,
                                                  candidates)  # fmt: skip
    z = kept.double()
    x = (alpha - 1.0) * z
    if alpha in (1.5, 2.0):
        tau = _sorted_threshold(x, alpha)
    else:
        tau = _newton_threshold(_row_sums(x, q), x[:, 0], x[:, 0] - 1.0, alpha)
    # As in the reference: the buffer's threshold is the row's when it lies at or above the
    # smallest kept score (or nothing was left out); other rows need passes over the bank.
    if kept.shape[1] < source.num_memories:
        unsettled = (tau < x[:, -1]).nonzero().squeeze(1)
    else:
        unsettled = tau.new_empty(0, dtype=torch.long)

    p = _power(torch.relu(x - tau[:, None]), q)
    weighted = _gather_weighted(p, kept_index, source, group)
    total = p.sum(dim=1)
    support = (p > 0).sum(dim=1)
    dot_pz = (p * z).sum(dim=1)
    sum_p_alpha = _power(p, alpha).sum(dim=1)
    if unsettled.numel():
        # Every process found the same rows: the decision came from gathered data.
        sub = rows[unsettled]
        tau_sub = _newton_threshold(
            _streamed_sums(sub, source, group, beta, similarity, alpha),
            x[unsettled, 0],
            tau[unsettled],
            alpha,
        )
        sums = _streamed_output(sub, tau_sub, source, group, beta, similarity, alpha)
        for target, value in zip((weighted, total, support, dot_pz, sum_p_alpha), sums):
            target[unsettled] = value.to(target.dtype)
    out = (weighted / total[:, None]).to(dtype)
    lse = dot_pz / total + (1.0 - sum_p_alpha / total**alpha) / (alpha * (alpha - 1.0))
    lse = lse.to(dtype) - _l2_shift(rows, beta, similarity)
    return out, support, argmax, lse


def _gather_weighted(p: Tensor, kept_index: Tensor, source, group) -> Tensor:
    """``sum_i p_i v_i`` over the candidates with weight > 0: each process reads the value rows
    it holds, and the contributions add up in rank order."""
    row, column = (p > 0).nonzero(as_tuple=True)
    local = kept_index[row, column] - source.offset
    mine = (local >= 0) & (local < source.local_count)
    row, column, local = row[mine], column[mine], local[mine]
    unique, inverse = local.unique(return_inverse=True)
    value_rows = source.values_at(unique).to(torch.float64)
    weighted = torch.zeros(p.shape[0], source.value_dim, dtype=torch.float64, device=p.device)
    weighted.index_add_(0, row, p[row, column, None] * value_rows[inverse])
    return sum_in_order(group, weighted)


def _streamed_sums(rows, source, group, beta, similarity, alpha):
    """``partial_sums`` for Newton: one pass over the chunks, added across processes."""
    q = 1.0 / (alpha - 1.0)

    def partial_sums(tau: Tensor, x_max: Tensor):
        sum_q = torch.zeros_like(tau)
        sum_q1 = torch.zeros_like(tau)
        for _, keys, norms, _ in source.chunks():
            x = (alpha - 1.0) * _scores(rows, keys, norms, beta, similarity).double()
            ratio = torch.relu(x - tau[:, None]) / (x_max - tau)[:, None]
            sum_q += _power(ratio, q).sum(dim=1)
            sum_q1 += (ratio > 0).sum(dim=1) if q == 1.0 else _power(ratio, q - 1.0).sum(dim=1)
        return sum_in_order(group, sum_q), sum_in_order(group, sum_q1)

    return partial_sums


def _streamed_output(rows, tau, source, group, beta, similarity, alpha):
    """Weighted values, total, support, <p, z> and sum p^alpha of rows with a known threshold."""
    q = 1.0 / (alpha - 1.0)
    count = rows.shape[0]
    weighted = torch.zeros(count, source.value_dim, dtype=torch.float64, device=rows.device)
    total, dot_pz, sum_p_alpha = (torch.zeros_like(tau) for _ in range(3))
    support = torch.zeros(count, dtype=torch.long, device=rows.device)
    for _, keys, norms, values in source.chunks():
        z = _scores(rows, keys, norms, beta, similarity).double()
        p = _power(torch.relu((alpha - 1.0) * z - tau[:, None]), q)
        weighted += p @ (keys if values is None else values).double()
        total += p.sum(dim=1)
        support += (p > 0).sum(dim=1)
        dot_pz += (p * z).sum(dim=1)
        sum_p_alpha += _power(p, alpha).sum(dim=1)
    return tuple(sum_in_order(group, t) for t in (weighted, total, support, dot_pz, sum_p_alpha))
