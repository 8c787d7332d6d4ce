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

from . import reference
from .backends.norms import remember_sq_norms
from .reference import (
    SOFTMAX_SUPPORT_EPS,
    _Argmax,
    _newton_threshold,
    _power,
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
# A chunk's log-partition from a backend is float32: ``lse = beta * s_max + log(l)`` keeps log(l)
# to about |lse| * 6e-8, so beyond this magnitude the chunk's partial state is recomputed here,
# relative to its maximum (only with huge beta or scores; see _chunk_partial).
PRECISE_LSE = 256.0


@dataclass
class _Partial:
    """A part's state: ``lse = scale * best + rel`` with ``best`` its highest similarity (float64;
    also the argmax across parts) and ``rel`` the log-partition relative to it. Kept apart so
    that merging never subtracts two huge, nearly equal numbers: softmax has ``scale = beta``;
    polynomial, not shift-invariant, keeps its whole lse in ``rel`` (``scale = 0``)."""

    rel: Tensor
    out: Tensor
    best: Tensor
    argmax: Tensor  # global memory index of the best
    support: Tensor

    def merge(self, other: _Partial, scale: float) -> _Partial:
        top = torch.maximum(self.best, other.best)
        mine, theirs = self.rel_to(top, scale), other.rel_to(top, scale)
        rel = torch.logaddexp(mine, theirs)
        better = other.best > self.best  # strict: the earlier part keeps a tie
        return _Partial(
            rel,
            self.out * _weight(mine, rel)[:, None] + other.out * _weight(theirs, rel)[:, None],
            top,
            torch.where(better, other.argmax, self.argmax),
            self.support + other.support,
        )

    def rel_to(self, top: Tensor, scale: float) -> Tensor:
        """The log-partition relative to ``scale * top`` (``top >= best``)."""
        if scale == 0.0:
            return self.rel
        gap = torch.where(self.best == top, 0.0, (self.best - top) * scale)  # -inf - -inf: 0
        return self.rel + gap


def _weight(part_rel: Tensor, rel: Tensor) -> Tensor:
    # A part with no mass (polynomial: every score <= 0) weighs 0, also when no part has any.
    return torch.where(torch.isneginf(part_rel), 0.0, torch.exp(part_rel - rel))


def _dense_step(rows, source, group, impl, beta, similarity, separation, degree, want_info):
    scale = beta if separation == "softmax" else 0.0
    state = None
    for start, keys, norms, values in source.chunks():
        part = _chunk_partial(rows, start, keys, norms, values, impl, beta, similarity,
                              separation, degree)  # fmt: skip
        state = part if state is None else state.merge(part, scale)
    if state is None:  # an empty shard
        state = _empty_partial(rows, source.value_dim)
    if group.size > 1:
        fields = [group.gather(t) for t in (state.rel, state.out, state.best, state.argmax,
                                            state.support)]  # fmt: skip
        parts = [_Partial(*per_rank) for per_rank in zip(*fields)]
        state = parts[0]
        for part in parts[1:]:
            state = state.merge(part, scale)
    support = state.support
    lse = state.rel if scale == 0.0 else state.rel + beta * state.best
    if separation == "softmax" and want_info:
        support = _softmax_support(rows, source, group, beta, similarity, state.rel, state.best)
    return state.out, support, state.argmax, lse.to(rows.dtype)


def _chunk_partial(rows, start, keys, norms, values, impl, beta, similarity, separation, degree):
    """One chunk through the fused backend; recomputed relative to its maximum (torch) when the
    backend's float32 lse is too large to carry the log-normaliser."""
    if norms is not None:
        remember_sq_norms(keys, norms)
    out, info = impl.retrieve(
        rows, keys, values, beta=beta, similarity=similarity, separation=separation,
        degree=degree, steps=1, tol=None, clamp_mask=None, return_info=True,
    )  # fmt: skip
    lse = info.lse.double()
    if bool((lse.abs() <= PRECISE_LSE).all()):
        best = _similarity_at(rows.double(), keys[info.argmax].double(), similarity)
        rel = lse if separation == "polynomial" else lse - beta * best
        return _Partial(rel, out.to(rows.dtype), best, info.argmax + start, info.support)
    stream = reference._BankStream(
        rows, keys, keys if values is None else values, beta=beta, similarity=similarity,
        chunk_size=keys.shape[0], sq_norms=None if norms is None else norms.to(rows.dtype),
    )  # fmt: skip
    if separation == "polynomial":
        out, support, argmax, rel, _ = reference._polynomial_step(stream, float(degree))
        best = _similarity_at(rows.double(), keys[argmax].double(), similarity)
        return _Partial(rel.double(), out.to(rows.dtype), best, argmax + start, support)
    out, _, argmax, rel, s_max = reference._softmax_step(stream, False)
    # rel is relative to the chunk's computed maximum: that is the best kept (l2 shifted back by
    # the row's ||x||^2), so that beta never multiplies a difference of two roundings.
    best = s_max.double()
    if similarity == "l2":
        best = best - (rows.double() ** 2).sum(dim=1)
    support = torch.zeros_like(argmax)  # counted over the whole bank afterwards
    return _Partial(rel.double(), out.to(rows.dtype), best, argmax + start, support)


def _empty_partial(rows: Tensor, value_dim: int) -> _Partial:
    count = rows.shape[0]
    minus_inf = torch.full((count,), -math.inf, dtype=torch.float64, device=rows.device)
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


def _scores(rows, keys, norms, similarity) -> Tensor:
    """Similarities of a chunk in the rows' dtype, clamped finite (l2 shifted by ``||x||^2``, as
    in the reference); beta multiplies differences from the row maximum only."""
    norms = None if norms is None else norms.to(rows.dtype)
    scores = similarity_scores(rows, keys.to(rows.dtype), similarity, norms)
    return reference.finite_scores(scores)


def _l2_shift(rows: Tensor, similarity: str) -> Tensor | float:
    """The per-row shift of computed l2 scores, ``||x||^2`` (float64)."""
    return (rows.double() ** 2).sum(dim=1) if similarity == "l2" else 0.0


def _softmax_support(rows, source, group, beta, similarity, rel, best) -> Tensor:
    """Weights above 1e-6 given the global log-partition: ``beta (s - best) > rel + log(eps)``."""
    threshold = (rel + math.log(SOFTMAX_SUPPORT_EPS))[:, None]
    top = (best + _l2_shift(rows, similarity))[:, None]
    count = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    for _, keys, norms, _ in source.chunks():
        s = _scores(rows, keys, norms, similarity).double()
        gap = torch.where(s == top, 0.0, (s - top) * beta)
        count += (gap > threshold).sum(dim=1)
    return sum_in_order(group, count)


# --------------------------------------------------------------------------- sparsemax, entmax
def _top(scores: Tensor, index: Tensor, count: int) -> tuple[Tensor, Tensor]:
    kept, where = scores.topk(min(count, scores.shape[1]), dim=1, sorted=True)
    return kept, index.gather(1, where)


def _sparse_candidates(rows, source, group, similarity, candidates):
    """The ``candidates`` highest similarities of every row over the whole bank, their global
    indices, and the argmax."""
    count, device = rows.shape[0], rows.device
    argmax = _Argmax(count, rows)
    kept = rows.new_empty(count, 0)
    kept_index = torch.empty(count, 0, dtype=torch.long, device=device)
    for start, keys, norms, _ in source.chunks():
        s = _scores(rows, keys, norms, similarity)
        argmax.update(start, s)
        index = torch.arange(start, start + s.shape[1], device=device).expand(count, -1)
        kept, kept_index = _top(torch.cat([kept, s], 1), torch.cat([kept_index, index], 1),
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
    kept, kept_index, argmax = _sparse_candidates(rows, source, group, similarity, candidates)
    # Everything relative to the row maximum: x = (alpha - 1) beta (s - s_max) in float64, <= 0,
    # finite for any beta and similarity in range, the support in x > -1.
    s_max = kept[:, 0].double()
    x = reference.relative_scores(kept.double(), s_max, (alpha - 1.0) * beta)
    tau = reference.solve_threshold(x, alpha)
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
    dot_px = torch.where(p > 0, p * x, 0.0).sum(dim=1)
    sum_p_alpha = _power(p, alpha).sum(dim=1)
    if unsettled.numel():
        # Every process found the same rows: the decision came from gathered data.
        relative = _RelativeScores(rows, unsettled, s_max[unsettled], source, similarity,
                                   (alpha - 1.0) * beta)  # fmt: skip
        tau_sub = _newton_threshold(
            _streamed_sums(relative, group, alpha), x[unsettled, 0], tau[unsettled], alpha
        )
        sums = _streamed_output(relative, tau_sub, source, group, alpha)
        for target, value in zip((weighted, total, support, dot_px, sum_p_alpha), sums):
            target[unsettled] = value.to(target.dtype)
    out = (weighted / total[:, None]).to(dtype)
    # Energy <p, z> + Tsallis entropy, <p, z> = beta s_max + <p, x> / (alpha - 1).
    lse = dot_px / (total * (alpha - 1.0)) + (1.0 - sum_p_alpha / total**alpha) / (
        alpha * (alpha - 1.0)
    )
    lse = lse + beta * (s_max - _l2_shift(rows, similarity))
    return out, support, argmax, lse.to(dtype)


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


class _RelativeScores:
    """``x = scale (s - s_max)`` (float64) of some rows, chunk by chunk. Every query is scored,
    as in the candidate pass, and the rows are picked afterwards: a product over fewer rows may
    round differently, and at large beta one ulp of a score is far more than the support's
    width."""

    def __init__(self, rows, which, s_max, source, similarity, scale):
        self.rows, self.which, self.s_max = rows, which, s_max
        self.source, self.similarity, self.scale = source, similarity, scale

    def chunks(self):
        for _, keys, norms, values in self.source.chunks():
            s = _scores(self.rows, keys, norms, self.similarity)[self.which].double()
            yield reference.relative_scores(s, self.s_max, self.scale), keys, values


def _streamed_sums(relative: _RelativeScores, group, alpha):
    """``partial_sums`` for Newton: one pass over the chunks, added across processes."""
    q = 1.0 / (alpha - 1.0)

    def partial_sums(tau: Tensor, x_max: Tensor):
        sum_q = torch.zeros_like(tau)
        sum_q1 = torch.zeros_like(tau)
        for x, _, _ in relative.chunks():
            ratio = torch.relu(x - tau[:, None]) / (x_max - tau)[:, None]
            sum_q += _power(ratio, q).sum(dim=1)
            sum_q1 += (ratio > 0).sum(dim=1) if q == 1.0 else _power(ratio, q - 1.0).sum(dim=1)
        return sum_in_order(group, sum_q), sum_in_order(group, sum_q1)

    return partial_sums


def _streamed_output(relative: _RelativeScores, tau, source, group, alpha):
    """Weighted values, total, support, <p, x> and sum p^alpha of rows with a known threshold."""
    q = 1.0 / (alpha - 1.0)
    count = relative.which.shape[0]
    weighted = torch.zeros(count, source.value_dim, dtype=torch.float64, device=tau.device)
    total, dot_px, sum_p_alpha = (torch.zeros_like(tau) for _ in range(3))
    support = torch.zeros(count, dtype=torch.long, device=tau.device)
    for x, keys, values in relative.chunks():
        p = _power(torch.relu(x - tau[:, None]), q)
        weighted += p @ (keys if values is None else values).double()
        total += p.sum(dim=1)
        support += (p > 0).sum(dim=1)
        dot_px += torch.where(p > 0, p * x, 0.0).sum(dim=1)
        sum_p_alpha += _power(p, alpha).sum(dim=1)
    return tuple(sum_in_order(group, t) for t in (weighted, total, support, dot_px, sum_p_alpha))
