"""The ``torch`` backend: exact streaming retrieval in pure PyTorch, differentiable by autograd.

It streams over the memory bank in chunks (one chunk = the dense path), so the extra memory is
O(B * (d + dv + chunk)), never O(B * M) (with autograd on, the graph keeps each chunk's scores for
the backward pass). Softmax and polynomial weights use an online normaliser (a running maximum
that rescales the partial sums); sparsemax and entmax thresholds are exact across chunks: a first
pass keeps each query's ``candidates`` highest scores, the threshold is solved exactly on them, and
it is provably the threshold of the whole row when it lies at or above the smallest kept score;
the rare rows where it does not (supports larger than the buffer) are finished by Newton passes
over the bank (see :func:`hen_fast.numerics.newton_threshold`). Exact in the accumulation dtype
and differentiable by autograd, implicit threshold gradient included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..loop import iterate
from ..numerics import (
    SOFTMAX_SUPPORT_EPS,
    absolute_max_score,
    accumulation_dtype,
    dtype_beta,
    finite_scores,
    inner_power_sum,
    newton_threshold,
    power,
    relative_scores,
    separation_alpha,
    similarity_scores,
    solve_threshold,
    sparse_energy,
)
from ..partial import ArgmaxState, CandidateState

# Auto chunking: the whole B x M score matrix when it has at most this many entries, else chunks of
# about CHUNK_SCORES entries (a few MB: cache-sized, yet large enough for efficient matmuls).
DENSE_MAX_SCORES = 1 << 22


CHUNK_SCORES = 1 << 20


MIN_CHUNK = 128


# Candidate scores kept per query in the threshold pass. In the Hopfield regime (large beta) the
# support is a handful of memories, so the threshold is almost always settled by this buffer alone.
DEFAULT_CANDIDATES = 256


def default_chunk_size(num_queries: int, num_memories: int) -> int:
    if num_queries * num_memories <= DENSE_MAX_SCORES:
        return num_memories
    return max(MIN_CHUNK, CHUNK_SCORES // num_queries)


class BankStream:
    """Similarities ``s = sim(keys, x)`` (finite, see :func:`finite_scores`) and values, chunk by
    chunk, for fixed query rows. The scores are ``z = beta * s``; ``beta`` is applied by each
    separation to differences from the row maximum, ``beta * (s - max s)``, which never overflow
    to NaN, so beta up to 1e30 and scores beyond float32's range still give finite weights.

    A bank that fits in one chunk is scored once and the scores are reused by every pass.
    """

    def __init__(self, x, keys, values, *, beta, similarity, chunk_size, sq_norms, cached=None):
        self.x, self.keys, self.values = x, keys, values
        self.beta, self.similarity, self.sq_norms = beta, similarity, sq_norms
        self.chunk_size = chunk_size
        self.single = chunk_size >= keys.shape[0]
        self._cached = cached

    def __iter__(self):
        return self.chunks(grad=True)

    def chunks(self, grad: bool):
        """Yields ``(start, s, values)``; ``grad=False`` passes build no autograd graph (a single
        chunk is always scored with it, since its scores are cached for the passes that need it)."""
        if self._cached is not None:
            yield 0, *self._cached
            return
        dtype = self.x.dtype
        num_memories = self.keys.shape[0]
        for start in range(0, num_memories, self.chunk_size):
            stop = min(start + self.chunk_size, num_memories)
            with torch.set_grad_enabled(torch.is_grad_enabled() and (grad or self.single)):
                keys = self.keys[start:stop].to(dtype)
                norms = None if self.sq_norms is None else self.sq_norms[start:stop].to(dtype)
                s = finite_scores(similarity_scores(self.x, keys, self.similarity, norms))
                values = self.values[start:stop].to(dtype)
            if self.single:
                self._cached = (s, values)
            yield start, s, values


def softmax_step(stream: BankStream, want_info: bool):
    rows, dtype, device = stream.x.shape[0], stream.x.dtype, stream.x.device
    beta = stream.beta
    argmax = ArgmaxState.empty(rows, stream.x)
    running_sum = torch.zeros(rows, dtype=dtype, device=device)
    acc = torch.zeros(rows, stream.values.shape[1], dtype=dtype, device=device)
    running_max = None
    for start, s, values in stream:
        argmax = argmax.merge(ArgmaxState.of_scores(start, s))
        new_max = argmax.best  # finite: the scores are clamped
        # Shift invariance makes the (detached) running max a constant for autograd.
        weights = relative_scores(s, new_max, beta).exp_()  # in place: one B x chunk buffer
        if running_max is None:
            running_sum, acc = weights.sum(dim=1), weights @ values
        else:
            rescale = torch.exp((running_max - new_max) * dtype_beta(beta, new_max.dtype))
            running_sum = running_sum * rescale + weights.sum(dim=1)
            acc = acc * rescale[:, None] + weights @ values
        running_max = new_max
    out = acc / running_sum[:, None]
    lse_rel = torch.log(running_sum.detach())
    support = None
    if want_info:
        # p > eps  <=>  beta (s - max) > log(sum) + log(eps): a counting pass (free when cached).
        threshold = (lse_rel + math.log(SOFTMAX_SUPPORT_EPS))[:, None]
        support = sum(
            (relative_scores(s.detach(), running_max, beta) > threshold).sum(dim=1)
            for _, s, _ in stream.chunks(grad=False)
        )
    return out, support, argmax.index, lse_rel, running_max


def polynomial_step(stream: BankStream, degree: float):
    """Weights ``relu(beta s)^n`` normalised: beta > 0 cancels, so they are computed from ``s``."""
    rows, dtype, device = stream.x.shape[0], stream.x.dtype, stream.x.device
    argmax = ArgmaxState.empty(rows, stream.x)
    running_max = torch.zeros(rows, dtype=dtype, device=device)
    running_sum = torch.zeros(rows, dtype=dtype, device=device)
    acc = torch.zeros(rows, stream.values.shape[1], dtype=dtype, device=device)
    support = torch.zeros(rows, dtype=torch.long, device=device)
    for start, s, values in stream:
        argmax = argmax.merge(ArgmaxState.of_scores(start, s))
        rectified = torch.relu(s)
        new_max = torch.maximum(running_max, rectified.detach().max(dim=1).values)
        # Weights are scaled by the running max so relu(s)**degree never overflows; the scale
        # cancels in the normalisation, so it is a constant for autograd.
        divisor = torch.where(new_max > 0, new_max, torch.ones_like(new_max))
        rescale = (running_max / divisor) ** degree
        weights = (rectified / divisor[:, None]) ** degree
        running_sum = running_sum * rescale + weights.sum(dim=1)
        acc = acc * rescale[:, None] + weights @ values
        support += (s.detach() > 0).sum(dim=1)
        running_max = new_max
    nonzero = running_sum.detach() > 0
    safe_sum = torch.where(nonzero, running_sum, torch.ones_like(running_sum))
    out = torch.where(nonzero[:, None], acc / safe_sum[:, None], torch.zeros_like(acc))
    # log sum relu(beta s)^n, in float64 so that n log(beta s_max) does not overflow needlessly.
    log_partition = degree * (math.log(stream.beta) + torch.log(running_max.double())) + torch.log(
        running_sum.detach().double()
    )
    lse = torch.where(nonzero, log_partition, torch.full_like(log_partition, -math.inf))
    return out, support, argmax.index, lse, None  # float64: a streamed merge needs its bits


def _stream_sums(stream: BankStream, alpha: float, s_max: Tensor, rows: Tensor):
    """``partial_sums`` for Newton over the whole bank for some ``rows``, one pass per call
    (scores relative to each row's maximum ``s_max``, float64).

    The pass scores every query, as the first pass did, and keeps the rows asked for: a product
    over fewer rows may round differently (another BLAS kernel), and at large beta one ulp of a
    score moves ``beta * (s - s_max)`` by far more than 1.
    """
    q = 1.0 / (alpha - 1.0)
    scale = (alpha - 1.0) * stream.beta

    def partial_sums(tau: Tensor, x_max: Tensor):
        sum_q = torch.zeros_like(tau)
        sum_q1 = torch.zeros_like(tau)
        for _, s, _ in stream.chunks(grad=False):
            x = relative_scores(s.detach()[rows].double(), s_max, scale)
            ratio = torch.relu(x - tau[:, None]) / (x_max - tau)[:, None]
            sum_q += power(ratio, q).sum(dim=1)
            sum_q1 += inner_power_sum(ratio, q)
        return sum_q, sum_q1

    return partial_sums


def _sparse_threshold(stream: BankStream, alpha: float, candidates: int):
    """Exact entmax threshold of every row across all chunks, relative to the row's maximum
    ``(alpha - 1) beta max s`` (float64), the maximum similarity ``s_max`` and the argmax."""
    num_memories = stream.keys.shape[0]
    argmax = ArgmaxState.empty(stream.x.shape[0], stream.x)
    kept = CandidateState.empty(stream.x.shape[0], stream.x, with_index=False)
    for start, s, _ in stream.chunks(grad=False):
        argmax = argmax.merge(ArgmaxState.of_scores(start, s))
        kept = kept.merge(CandidateState.of_scores(start, s.detach(), False), candidates)
    kept = kept.scores
    s_max = kept[:, 0].double()
    x_kept = relative_scores(kept.double(), s_max, (alpha - 1.0) * stream.beta)
    tau = solve_threshold(x_kept, alpha)
    # Entries outside the buffer are <= its smallest, so when tau >= that they all get weight 0
    # and the buffer's threshold is the row's. Otherwise more memories may be in the support:
    # the true tau is >= the buffer's (adding entries only raises the sum), a valid Newton start.
    if kept.shape[1] < num_memories:
        unsettled = (tau < x_kept[:, -1]).nonzero().squeeze(1)
        if unsettled.numel():
            tau[unsettled] = newton_threshold(
                _stream_sums(stream, alpha, s_max[unsettled], unsettled),
                x_kept[unsettled, 0],
                tau[unsettled],
                alpha,
            )
    return tau, kept[:, 0], argmax.index


def _sparse_step(stream: BankStream, alpha: float, candidates: int, need_grad: bool):
    rows, dtype, device = stream.x.shape[0], stream.x.dtype, stream.x.device
    q = 1.0 / (alpha - 1.0)
    tau, s_max, argmax = _sparse_threshold(stream, alpha, candidates)
    tau = tau.to(dtype)[:, None]
    scale = (alpha - 1.0) * stream.beta
    dv = stream.values.shape[1]
    weighted = torch.zeros(rows, dv, dtype=dtype, device=device)
    total = torch.zeros(rows, dtype=dtype, device=device)
    support = torch.zeros(rows, dtype=torch.long, device=device)
    dot_px = torch.zeros(rows, dtype=dtype, device=device)
    sum_p_alpha = torch.zeros(rows, dtype=dtype, device=device)
    # For autograd, tau moves with the scores: sum_i g_i (dx_i - dtau) = 0 with g = dp/dx, so
    # dtau = sum_i g_i dx_i / sum_i g_i. `tau_shift` carries exactly that derivative (its value
    # is 0), and the output is corrected to first order: p(tau + s) = p(tau) - g s.
    grad_weighted = torch.zeros(rows, dv, dtype=dtype, device=device)
    grad_total = torch.zeros(rows, dtype=dtype, device=device)
    tau_shift_num = torch.zeros(rows, dtype=dtype, device=device)
    for _, s, values in stream:
        # (alpha - 1) beta (s - s_max): <= 0, and the support lies in (-1, 0].
        x = relative_scores(s, s_max, scale)
        excess = torch.relu(x - tau)
        p = power(excess, q)
        weighted = weighted + p @ values
        total = total + p.sum(dim=1)
        p_const = p.detach()
        in_support = p_const > 0
        support += in_support.sum(dim=1)
        # 0 * -inf would be NaN: entries outside the support add nothing.
        dot_px += torch.where(in_support, p_const * x.detach(), 0.0).sum(dim=1)
        sum_p_alpha += power(p_const, alpha).sum(dim=1)
        if need_grad:
            g = (excess.detach() > 0).to(dtype) if q == 1.0 else q * power(excess.detach(), q - 1.0)
            grad_weighted += g @ values.detach()
            grad_total += g.sum(dim=1)
            # x - x.detach() is 0 with x's derivative; entries outside the support (g = 0, x
            # possibly -inf) are left out so that no 0 * inf appears in value or gradient.
            tau_shift_num = tau_shift_num + torch.where(
                g > 0, g * (x - x.detach()), torch.zeros_like(g)
            ).sum(dim=1)
    if need_grad:
        tau_shift = (tau_shift_num / grad_total)[:, None]
        weighted = weighted - tau_shift * grad_weighted
        total = total - tau_shift.squeeze(1) * grad_total
    # Dividing by the total makes the weights sum to 1 to rounding whatever tau's last bit.
    out = weighted / total[:, None]
    total = total.detach()
    # Energy <p, z> + Tsallis entropy, with <p, z> = beta s_max + <p, x> / (alpha - 1).
    lse_rel = sparse_energy(dot_px, total, sum_p_alpha, alpha)
    return out, support, argmax, lse_rel, s_max


def _one_step(x, keys, values, *, beta, similarity, separation, alpha, degree, chunk_size,
              candidates, sq_norms, want_info):  # fmt: skip
    stream = BankStream(
        x, keys, values, beta=beta, similarity=similarity, chunk_size=chunk_size, sq_norms=sq_norms
    )
    if separation == "softmax":
        out, support, argmax, lse, s_max = softmax_step(stream, want_info)
    elif separation == "polynomial":
        out, support, argmax, lse, s_max = polynomial_step(stream, float(degree))
    else:
        need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, keys, values))
        out, support, argmax, lse, s_max = _sparse_step(
            stream, separation_alpha(separation, alpha), candidates, need_grad
        )
    if s_max is not None:
        lse = lse + absolute_max_score(s_max, x, beta, similarity).to(lse.dtype)
    return out, support, argmax, lse.to(out.dtype)


def retrieve(queries: Tensor, memories: Tensor, values: Tensor | None = None, *, beta: float = 1.0,
             similarity: str = "dot", separation: str = "softmax", alpha: float = 1.5,
             degree: float = 10, steps: int = 1, tol: float | None = None,
             clamp_mask: Tensor | None = None, return_info: bool = False,
             chunk_size: int | None = None, candidates: int = DEFAULT_CANDIDATES,
             sq_norms: Tensor | None = None):  # fmt: skip
    """Streaming exact retrieval ``Sep(beta * sim(K, X)) V`` for ``steps`` updates.

    Takes inputs as :func:`hen_fast.retrieve` has validated them: ``queries`` (B, d), ``memories``
    (M, d), ``values`` (M, dv) or None, ``clamp_mask`` broadcastable to (B, d) or None. Returns
    ``(out, info)`` with ``out`` (B, dv) in the queries' dtype and ``info`` a
    :class:`~hen_fast.info.RetrieveInfo` when ``return_info`` else None.

    ``chunk_size`` memories are scored at a time (default: all of them when the score matrix is
    small, see :func:`default_chunk_size`); ``candidates`` scores per query are kept for the sparse
    thresholds; ``sq_norms`` are cached ``||k||^2`` for ``l2``. Between steps the iterate stays in
    the accumulation dtype; queries that moved by at most ``tol`` stop and are not computed again.
    """
    values = memories if values is None else values
    num_queries, num_memories = queries.shape[0], memories.shape[0]
    dtype = accumulation_dtype(queries, memories, values)
    # Without cached norms each chunk computes its own: O(chunk * d) beside the O(B * chunk * d)
    # score product, and no O(M) buffer, so the extra memory stays flat in M.
    chunk_size = chunk_size or default_chunk_size(num_queries, num_memories)

    def one_step(rows):
        return _one_step(rows, memories, values, beta=beta, similarity=similarity,
                         separation=separation, alpha=alpha, degree=degree,
                         chunk_size=chunk_size, candidates=candidates, sq_norms=sq_norms,
                         want_info=return_info)  # fmt: skip

    return iterate(
        one_step,
        queries,
        dtype,
        steps=steps,
        tol=tol,
        clamp_mask=clamp_mask,
        return_info=return_info,
    )
