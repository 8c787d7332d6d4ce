"""One exact retrieval update over a bank split into parts, merging each part's partial state.

The parts are chunks of a bank read one at a time (out-of-core: a memory-mapped bank, or a bank
on the host while the queries are on a GPU) and shards held by other processes
(:mod:`hen_fast.distributed`). A :class:`~hen_fast.sources.BankSource` yields this process's
chunks; a group's ``gather`` exchanges per-process states (nothing to exchange in one process).
The states and their merges are :mod:`hen_fast.partial`'s. Every process folds
the gathered states in rank order, so all of them compute bit-identical results, and with
``steps > 1`` they take identical decisions (``tol``, thresholds) without further talk.

* softmax and polynomial: each chunk goes through a fused backend with ``return_info`` and gives
  ``(lse, out, argmax)``; states merge exactly by log-sum-exp weights,
  ``L = log(exp L_a + exp L_b)``, ``out = exp(L_a - L) out_a + exp(L_b - L) out_b`` (polynomial's
  ``lse`` is ``log sum relu(z)^n``, so the same rule is its running-max merge). Softmax's support
  count needs the global ``L``: a counting pass when ``return_info`` asks for it.
* sparsemax and entmax: one pass keeps each query's ``candidates`` highest scores over all parts
  with their memory indices; the global threshold is solved exactly on them (the same maths as
  :mod:`hen_fast.numerics`), and the output gathers only the support's value rows. Rows whose
  support outgrows the buffer get Newton passes whose sums add across chunks and processes, then an
  output pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import numerics
from .backends import torch_backend
from .backends.norms import remember_sq_norms
from .partial import ArgmaxState, CandidateState, DenseState, fold
from .sources import LOCAL, BankSource, sum_in_order


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
    :func:`hen_fast.loop.iterate` expects from ``one_step``."""
    if separation in ("softmax", "polynomial"):
        return _dense_step(rows, source, group, impl, beta, similarity, separation, degree,
                           want_info)  # fmt: skip
    alpha = numerics.separation_alpha(separation, alpha)
    return _sparse_step(rows, source, group, beta, similarity, alpha, candidates)


# ------------------------------------------------------------------------- softmax, polynomial
# A chunk's log-partition from a backend is float32: ``lse = beta * s_max + log(l)`` keeps log(l)
# to about |lse| * 6e-8, so beyond this magnitude the chunk's partial state is recomputed here,
# relative to its maximum (only with huge beta or scores; see _chunk_partial).
PRECISE_LSE = 256.0


def _dense_step(rows, source, group, impl, beta, similarity, separation, degree, want_info):
    scale = beta if separation == "softmax" else 0.0

    def merge(a: DenseState, b: DenseState) -> DenseState:
        return a.merge(b, scale)

    parts = (
        _chunk_partial(rows, start, keys, norms, values, impl, beta, similarity, separation, degree)
        for start, keys, norms, values in source.chunks()
    )
    # An empty shard contributes the empty state, the merge's identity.
    state = fold([DenseState.empty(rows.shape[0], source.value_dim, rows), *parts], merge)
    if group.size > 1:
        fields = [group.gather(t) for t in (state.rel, state.out, state.best, state.index,
                                            state.support)]  # fmt: skip
        state = fold([DenseState(*per_rank) for per_rank in zip(*fields)], merge)
    support = state.support
    if separation == "softmax" and want_info:
        support = _softmax_support(rows, source, group, beta, similarity, state.rel, state.best)
    return state.out, support, state.index, state.lse(scale).to(rows.dtype)


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
        return DenseState(rel, out.to(rows.dtype), best, info.argmax + start, info.support)
    stream = torch_backend.BankStream(
        rows, keys, keys if values is None else values, beta=beta, similarity=similarity,
        chunk_size=keys.shape[0], sq_norms=None if norms is None else norms.to(rows.dtype),
    )  # fmt: skip
    if separation == "polynomial":
        out, support, argmax, rel, _ = torch_backend.polynomial_step(stream, float(degree))
        best = _similarity_at(rows.double(), keys[argmax].double(), similarity)
        return DenseState(rel.double(), out.to(rows.dtype), best, argmax + start, support)
    out, _, argmax, rel, s_max = torch_backend.softmax_step(stream, False)
    # rel is relative to the chunk's computed maximum: that is the best kept (l2 shifted back by
    # the row's ||x||^2), so that beta never multiplies a difference of two roundings.
    best = s_max.double()
    if similarity == "l2":
        best = best - (rows.double() ** 2).sum(dim=1)
    support = torch.zeros_like(argmax)  # counted over the whole bank afterwards
    return DenseState(rel.double(), out.to(rows.dtype), best, argmax + start, support)


def _similarity_at(rows: Tensor, keys: Tensor, similarity: str) -> Tensor:
    """Each row's similarity to its own key (the chunk's best), to compare bests across chunks."""
    if similarity == "dot":
        return (rows * keys).sum(dim=1)
    if similarity == "l2":
        return -(rows - keys).pow(2).sum(dim=1)
    return -(rows - keys).abs().sum(dim=1)


def _scores(rows, keys, norms, similarity) -> Tensor:
    """Similarities of a chunk in the rows' dtype, clamped finite (l2 shifted by ``||x||^2``, as
    in the torch backend); beta multiplies differences from the row maximum only."""
    norms = None if norms is None else norms.to(rows.dtype)
    scores = numerics.similarity_scores(rows, keys.to(rows.dtype), similarity, norms)
    return numerics.finite_scores(scores)


def _l2_shift(rows: Tensor, similarity: str) -> Tensor | float:
    """The per-row shift of computed l2 scores, ``||x||^2`` (float64)."""
    return (rows.double() ** 2).sum(dim=1) if similarity == "l2" else 0.0


def _softmax_support(rows, source, group, beta, similarity, rel, best) -> Tensor:
    """Weights above 1e-6 given the global log-partition: ``beta (s - best) > rel + log(eps)``."""
    threshold = (rel + math.log(numerics.SOFTMAX_SUPPORT_EPS))[:, None]
    top = (best + _l2_shift(rows, similarity))[:, None]
    count = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    for _, keys, norms, _ in source.chunks():
        s = _scores(rows, keys, norms, similarity).double()
        gap = torch.where(s == top, 0.0, (s - top) * beta)
        count += (gap > threshold).sum(dim=1)
    return sum_in_order(group, count)


# --------------------------------------------------------------------------- sparsemax, entmax
def _sparse_candidates(rows, source, group, similarity, candidates):
    """The ``candidates`` highest similarities of every row over the whole bank, their global
    indices, and the argmax."""
    count = rows.shape[0]
    argmax = ArgmaxState.empty(count, rows)
    kept = CandidateState.empty(count, rows)
    for start, keys, norms, _ in source.chunks():
        s = _scores(rows, keys, norms, similarity)
        argmax = argmax.merge(ArgmaxState.of_scores(start, s))
        kept = kept.merge(CandidateState.of_scores(start, s), candidates)
    if group.size > 1:
        # Every process sends exactly `candidates` columns; the padding sorts below any score,
        # and keeping at most num_memories leaves it out.
        kept = kept.padded(candidates)
        capacity = min(candidates, source.num_memories)
        kept = fold([CandidateState(*per_rank) for per_rank in
                     zip(group.gather(kept.scores), group.gather(kept.index))],
                    lambda a, b: a.merge(b, capacity))  # fmt: skip
        argmax = fold([ArgmaxState(*per_rank) for per_rank in
                       zip(group.gather(argmax.best), group.gather(argmax.index))],
                      ArgmaxState.merge)  # fmt: skip
    return kept.scores, kept.index, argmax.index


def _sparse_step(rows, source, group, beta, similarity, alpha, candidates):
    kept, kept_index, argmax = _sparse_candidates(rows, source, group, similarity, candidates)
    return sparse_finish(rows, source, group, beta, similarity, alpha, kept, kept_index, argmax)


def sparse_threshold(kept: Tensor, beta: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(s_max, x, tau)`` of descending candidate scores: ``x = (alpha - 1) beta (s - s_max)``
    and the exact threshold ``tau`` of those candidates (float64). Taking in more memories can
    only raise ``tau``, so it bounds the threshold of any superset from below."""
    s_max = kept[:, 0].double()
    x = numerics.relative_scores(kept.double(), s_max, (alpha - 1.0) * beta)
    return s_max, x, numerics.solve_threshold(x, alpha)


def sparse_finish(rows, source, group, beta, similarity, alpha, kept, kept_index, argmax):
    """One sparse update from each row's best ``kept`` scores over ``source`` (descending, with
    their global indices): the threshold solved on them, Newton passes over the source for rows
    whose support outgrew them, the support's value rows gathered."""
    q = 1.0 / (alpha - 1.0)
    dtype = rows.dtype
    # Everything relative to the row maximum: x = (alpha - 1) beta (s - s_max) in float64, <= 0,
    # finite for any beta and similarity in range, the support in x > -1.
    s_max, x, tau = sparse_threshold(kept, beta, alpha)
    # As in the torch backend: the buffer's threshold is the row's when it lies at or above the
    # smallest kept score (or nothing was left out); other rows need passes over the bank.
    if kept.shape[1] < source.num_memories:
        unsettled = (tau < x[:, -1]).nonzero().squeeze(1)
    else:
        unsettled = tau.new_empty(0, dtype=torch.long)

    p = numerics.power(torch.relu(x - tau[:, None]), q)
    weighted = _gather_weighted(p, kept_index, source, group)
    total = p.sum(dim=1)
    support = (p > 0).sum(dim=1)
    dot_px = torch.where(p > 0, p * x, 0.0).sum(dim=1)
    sum_p_alpha = numerics.power(p, alpha).sum(dim=1)
    if unsettled.numel():
        # Every process found the same rows: the decision came from gathered data.
        relative = _RelativeScores(rows, unsettled, s_max[unsettled], source, similarity,
                                   (alpha - 1.0) * beta)  # fmt: skip
        tau_sub = numerics.newton_threshold(
            _streamed_sums(relative, group, alpha), x[unsettled, 0], tau[unsettled], alpha
        )
        sums = _streamed_output(relative, tau_sub, source, group, alpha)
        for target, value in zip((weighted, total, support, dot_px, sum_p_alpha), sums):
            target[unsettled] = value.to(target.dtype)
    out = (weighted / total[:, None]).to(dtype)
    lse = numerics.sparse_energy(dot_px, total, sum_p_alpha, alpha)
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
            yield numerics.relative_scores(s, self.s_max, self.scale), keys, values


def _streamed_sums(relative: _RelativeScores, group, alpha):
    """``partial_sums`` for Newton: one pass over the chunks, added across processes."""
    q = 1.0 / (alpha - 1.0)

    def partial_sums(tau: Tensor, x_max: Tensor):
        sum_q = torch.zeros_like(tau)
        sum_q1 = torch.zeros_like(tau)
        for x, _, _ in relative.chunks():
            ratio = torch.relu(x - tau[:, None]) / (x_max - tau)[:, None]
            sum_q += numerics.power(ratio, q).sum(dim=1)
            sum_q1 += numerics.inner_power_sum(ratio, q)
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
        p = numerics.power(torch.relu(x - tau[:, None]), q)
        weighted += p @ (keys if values is None else values).double()
        total += p.sum(dim=1)
        support += (p > 0).sum(dim=1)
        dot_px += torch.where(p > 0, p * x, 0.0).sum(dim=1)
        sum_p_alpha += numerics.power(p, alpha).sum(dim=1)
    return tuple(sum_in_order(group, t) for t in (weighted, total, support, dot_px, sum_p_alpha))
