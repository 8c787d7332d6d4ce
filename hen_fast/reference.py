"""Pure-PyTorch retrieval: the oracle every backend is tested against, and the ``torch`` backend.

Two implementations live here:

* :func:`retrieve` streams over the memory bank in chunks (one chunk = the dense path), so the
  extra memory is O(B * (d + dv + chunk)), never O(B * M) (with autograd on, the graph keeps each
  chunk's scores for the backward pass). Softmax and polynomial weights use an online normaliser
  (a running maximum that rescales the partial sums); sparsemax and entmax thresholds are exact
  across chunks: a first pass keeps each query's ``candidates`` highest scores, the threshold is
  solved exactly on them, and it is provably the threshold of the whole row when it lies at or
  above the smallest kept score; the rare rows where it does not (supports larger than the buffer)
  are finished by Newton passes over the bank (see :func:`_newton_threshold`). Exact in the
  accumulation dtype and differentiable by autograd, implicit threshold gradient included.
* :func:`naive_retrieve` is the deliberately plain float64 computation that materialises every
  score and pairwise difference, with a 200-step bisection for the sparse thresholds. It shares no
  code with :func:`retrieve` and exists to check it (small problems only).

Conventions (DESIGN.md): scores ``z = beta * sim``; ``l2`` similarity is ``-||x - k||^2`` and is
evaluated as ``2 x.k - ||k||^2`` (each row's ``-||x||^2`` cancels in every separation but the
polynomial one, which is defined for ``dot`` only); entmax with parameter alpha is
``p = [(alpha - 1) z - tau]_+ ^ (1 / (alpha - 1))`` with ``tau`` such that ``sum p = 1``, sparsemax
is alpha = 2; polynomial weights are ``relu(z) ** degree`` normalised, zero for an all-non-positive
row. Half-precision inputs are computed in float32, float64 inputs in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .info import RetrieveInfo

SIMILARITIES = ("dot", "l2", "manhattan")
SEPARATIONS = ("softmax", "sparsemax", "entmax", "polynomial")
# Softmax weights are never exactly zero; "support" counts those above this.
SOFTMAX_SUPPORT_EPS = 1e-6
# Auto chunking: the whole B x M score matrix when it has at most this many entries, else chunks of
# about CHUNK_SCORES entries (a few MB: cache-sized, yet large enough for efficient matmuls).
DENSE_MAX_SCORES = 1 << 22
CHUNK_SCORES = 1 << 20
MIN_CHUNK = 128
# Candidate scores kept per query in the threshold pass. In the Hopfield regime (large beta) the
# support is a handful of memories, so the threshold is almost always settled by this buffer alone.
DEFAULT_CANDIDATES = 256
NEWTON_MAX_ITERS = 100


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (half precision accumulates in float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def separation_alpha(separation: str, alpha: float) -> float:
    """The entmax parameter a separation stands for: 1 softmax, 2 sparsemax, alpha for entmax."""
    return {"softmax": 1.0, "sparsemax": 2.0, "entmax": float(alpha)}[separation]


def default_chunk_size(num_queries: int, num_memories: int) -> int:
    if num_queries * num_memories <= DENSE_MAX_SCORES:
        return num_memories
    return max(MIN_CHUNK, CHUNK_SCORES // num_queries)


def similarity_scores(
    queries: Tensor, keys: Tensor, similarity: str, sq_norms: Tensor | None = None
) -> Tensor:
    """Scores ``(B, M)`` of queries against keys, both in the accumulation dtype.

    ``l2`` gives the shifted score ``2 x.k - ||k||^2`` (the true ``-||x - k||^2`` plus ``||x||^2``);
    ``sq_norms`` are the keys' squared norms when the caller has them cached.
    """
    if similarity == "dot":
        return queries @ keys.T
    if similarity == "l2":
        if sq_norms is None:
            sq_norms = (keys * keys).sum(dim=1)
        return torch.addmm(sq_norms.neg(), queries, keys.T, alpha=2.0)
    if similarity == "manhattan":
        return torch.cdist(queries, keys, p=1.0).neg()
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


class _BankStream:
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


def finite_scores(scores: Tensor) -> Tensor:
    """Similarities clamped to the dtype's finite range (NaN stays NaN).

    A similarity beyond the range (inputs of magnitude ~1e19 in float32) overflows to +-inf, and
    ``inf - inf`` would turn the relative scores into NaN. Clamped, the memories that overflowed
    tie at the largest finite value: the weight is split evenly among them (the limit's rule
    applied to the similarities this precision can tell apart), and the others get weight 0.
    """
    big = torch.finfo(scores.dtype).max
    return scores.clamp(-big, big)


def relative_scores(s: Tensor, s_max: Tensor, beta: float) -> Tensor:
    """``beta * (s - s_max)`` per row (``s_max`` a detached column): <= 0, finite or -inf, never
    NaN for finite ``s`` (the difference is exact near the top, where the weights live)."""
    return (s - s_max[:, None]) * beta


class _Argmax:
    """Running (max score, first index of it) over chunks."""

    def __init__(self, rows: int, like: Tensor):
        self.best = torch.full((rows,), -math.inf, dtype=like.dtype, device=like.device)
        self.index = torch.zeros(rows, dtype=torch.long, device=like.device)

    def update(self, start: int, z: Tensor) -> Tensor:
        chunk_max, chunk_index = z.detach().max(dim=1)
        better = chunk_max > self.best  # strict: an earlier chunk keeps a tie
        self.best = torch.where(better, chunk_max, self.best)
        self.index = torch.where(better, chunk_index + start, self.index)
        return self.best


# Each step returns (out, support, argmax, lse_rel, s_max) with the log-partition (or entmax
# energy) lse = beta * s_max + lse_rel: kept apart so that neither part overflows on its own.


def _softmax_step(stream: _BankStream, want_info: bool):
    rows, dtype, device = stream.x.shape[0], stream.x.dtype, stream.x.device
    beta = stream.beta
    argmax = _Argmax(rows, stream.x)
    running_sum = torch.zeros(rows, dtype=dtype, device=device)
    acc = torch.zeros(rows, stream.values.shape[1], dtype=dtype, device=device)
    running_max = None
    for start, s, values in stream:
        new_max = argmax.update(start, s)  # finite: the scores are clamped
        # Shift invariance makes the (detached) running max a constant for autograd.
        weights = relative_scores(s, new_max, beta).exp_()  # in place: one B x chunk buffer
        if running_max is None:
            running_sum, acc = weights.sum(dim=1), weights @ values
        else:
            rescale = torch.exp((running_max - new_max) * beta)
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


def _polynomial_step(stream: _BankStream, degree: float):
    """Weights ``relu(beta s)^n`` normalised: beta > 0 cancels, so they are computed from ``s``."""
    rows, dtype, device = stream.x.shape[0], stream.x.dtype, stream.x.device
    argmax = _Argmax(rows, stream.x)
    running_max = torch.zeros(rows, dtype=dtype, device=device)
    running_sum = torch.zeros(rows, dtype=dtype, device=device)
    acc = torch.zeros(rows, stream.values.shape[1], dtype=dtype, device=device)
    support = torch.zeros(rows, dtype=torch.long, device=device)
    for start, s, values in stream:
        argmax.update(start, s)
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


def _power(base: Tensor, exponent: float) -> Tensor:
    """``base ** exponent`` for ``base >= 0``; the common exponents exactly and cheaply."""
    if exponent == 1.0:
        return base
    if exponent == 2.0:
        return base * base
    return base.pow(exponent)


def _sorted_threshold(x_sorted: Tensor, alpha: float) -> Tensor:
    """Exact ``tau`` per row of descending ``x_sorted = (alpha - 1) (z - max z)``: sparsemax and
    alpha 1.5.

    Closed forms over the candidate support sizes k: sparsemax ``tau_k = (sum_{i<=k} x_i - 1) / k``;
    alpha 1.5 solves ``sum_{i<=k} (x_i - tau)^2 = 1``. The support is the largest k whose tau_k lies
    below x_k. Relative to the row maximum (``x_sorted[:, 0] == 0``) every term is O(k): nothing
    cancels however large the scores, and a -inf entry only ends the support.
    """
    sizes = torch.arange(1, x_sorted.shape[1] + 1, dtype=x_sorted.dtype, device=x_sorted.device)
    # -inf entries (scores far below the top) are never in the support: zero them for the sums.
    finite = torch.where(torch.isfinite(x_sorted), x_sorted, torch.zeros_like(x_sorted))
    cumsum = finite.cumsum(dim=1)
    if alpha == 2.0:
        candidates = (cumsum - 1) / sizes
    else:
        mean = cumsum / sizes
        spread = (finite * finite).cumsum(dim=1) - sizes * mean * mean
        candidates = mean - torch.sqrt(torch.clamp((1 - spread) / sizes, min=0))
    support = (candidates < x_sorted).sum(dim=1, keepdim=True).clamp(min=1)
    return candidates.gather(1, support - 1).squeeze(1)


def _newton_threshold(
    partial_sums, x_max: Tensor, tau: Tensor, alpha: float, eps: float | None = None
) -> Tensor:
    """Solve ``sum_i [x_i - tau]_+^q = 1`` (q = 1/(alpha-1)) by Newton's method from the left.

    Newton runs on ``h(tau) = (sum_i [x_i - tau]_+^q)^(1/q)``, the q-norm of ``[x - tau]_+``: convex
    and decreasing, so from any start with ``h >= 1`` the iterates rise monotonically to the root
    without overshooting. For one dominant memory h is linear and one step lands on the root; for
    sparsemax h is piecewise linear and the iteration ends exactly. ``partial_sums(tau, x_max)``
    returns ``(sum r^q, sum_{r>0} r^(q-1))`` with ``r = [x - tau]_+ / (x_max - tau)``, which keeps
    every power in [0, 1] whatever q is. float64 throughout; ``eps`` is the relative precision of
    the sums (float64's by default), where the iteration stops. A row whose sums are empty (not
    being solved) keeps its tau. Callers pass scores relative to the row maximum (``x_max = 0``),
    so ``tau`` lies in [-1, 0) and the stopping rule is absolute.
    """
    q = 1.0 / (alpha - 1.0)
    eps = torch.finfo(torch.float64).eps if eps is None else eps
    for _ in range(NEWTON_MAX_ITERS):
        span = x_max - tau
        sum_q, sum_q1 = partial_sums(tau, x_max)
        norm = sum_q ** (1.0 / q)
        step = (span * norm - 1.0) / (norm / sum_q * sum_q1)
        step = torch.clamp(torch.nan_to_num(step, nan=0.0), min=0.0)
        tau = tau + step
        if bool((step <= 4 * eps * torch.maximum(tau.abs(), span)).all()):
            break
    return tau


def _row_sums(x: Tensor, q: float):
    """``partial_sums`` for Newton over scores held in memory (``x`` float64, rows x candidates)."""

    def partial_sums(tau: Tensor, x_max: Tensor):
        ratio = torch.relu(x - tau[:, None]) / (x_max - tau)[:, None]
        return _power(ratio, q).sum(dim=1), _inner_power_sum(ratio, q)

    return partial_sums


def _inner_power_sum(ratio: Tensor, q: float) -> Tensor:
    if q == 1.0:
        return (ratio > 0).sum(dim=1).to(ratio.dtype)
    return _power(ratio, q - 1.0).sum(dim=1)


def _stream_sums(stream: _BankStream, alpha: float, s_max: Tensor, rows: Tensor):
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
            sum_q += _power(ratio, q).sum(dim=1)
            sum_q1 += _inner_power_sum(ratio, q)
        return sum_q, sum_q1

    return partial_sums


def solve_threshold(x_kept: Tensor, alpha: float) -> Tensor:
    """Exact tau (float64) of each row's descending candidates ``x_kept`` (relative to the row
    maximum: ``x_kept[:, 0] == 0``)."""
    if alpha in (1.5, 2.0):
        return _sorted_threshold(x_kept, alpha)
    start = x_kept[:, 0] - 1.0
    return _newton_threshold(_row_sums(x_kept, 1.0 / (alpha - 1.0)), x_kept[:, 0], start, alpha)


def _sparse_threshold(stream: _BankStream, alpha: float, candidates: int):
    """Exact entmax threshold of every row across all chunks, relative to the row's maximum
    ``(alpha - 1) beta max s`` (float64), the maximum similarity ``s_max`` and the argmax."""
    num_memories = stream.keys.shape[0]
    argmax = _Argmax(stream.x.shape[0], stream.x)
    kept = None
    for start, s, _ in stream.chunks(grad=False):
        argmax.update(start, s)
        merged = s.detach() if kept is None else torch.cat([kept, s.detach()], dim=1)
        kept = merged.topk(min(candidates, merged.shape[1]), dim=1, sorted=True).values
    s_max = kept[:, 0].double()
    x_kept = relative_scores(kept.double(), s_max, (alpha - 1.0) * stream.beta)
    tau = solve_threshold(x_kept, alpha)
    # Entries outside the buffer are <= its smallest, so when tau >= that they all get weight 0
    # and the buffer's threshold is the row's. Otherwise more memories may be in the support:
    # the true tau is >= the buffer's (adding entries only raises the sum), a valid Newton start.
    if kept.shape[1] < num_memories:
        unsettled = (tau < x_kept[:, -1]).nonzero().squeeze(1)
        if unsettled.numel():
            tau[unsettled] = _newton_threshold(
                _stream_sums(stream, alpha, s_max[unsettled], unsettled),
                x_kept[unsettled, 0],
                tau[unsettled],
                alpha,
            )
    return tau, kept[:, 0], argmax.index


def _sparse_step(stream: _BankStream, alpha: float, candidates: int, need_grad: bool):
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
        p = _power(excess, q)
        weighted = weighted + p @ values
        total = total + p.sum(dim=1)
        p_const = p.detach()
        in_support = p_const > 0
        support += in_support.sum(dim=1)
        # 0 * -inf would be NaN: entries outside the support add nothing.
        dot_px += torch.where(in_support, p_const * x.detach(), 0.0).sum(dim=1)
        sum_p_alpha += _power(p_const, alpha).sum(dim=1)
        if need_grad:
            g = (
                (excess.detach() > 0).to(dtype)
                if q == 1.0
                else q * _power(excess.detach(), q - 1.0)
            )
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
    lse_rel = dot_px / (total * (alpha - 1.0)) + (1.0 - sum_p_alpha / total**alpha) / (
        alpha * (alpha - 1.0)
    )
    return out, support, argmax, lse_rel, s_max


def _one_step(
    x,
    keys,
    values,
    *,
    beta,
    similarity,
    separation,
    alpha,
    degree,
    chunk_size,
    candidates,
    sq_norms,
    want_info,
):
    stream = _BankStream(
        x, keys, values, beta=beta, similarity=similarity, chunk_size=chunk_size, sq_norms=sq_norms
    )
    if separation == "softmax":
        out, support, argmax, lse, s_max = _softmax_step(stream, want_info)
    elif separation == "polynomial":
        out, support, argmax, lse, s_max = _polynomial_step(stream, float(degree))
    else:
        need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, keys, values))
        out, support, argmax, lse, s_max = _sparse_step(
            stream, separation_alpha(separation, alpha), candidates, need_grad
        )
    if s_max is not None:
        lse = lse + absolute_max_score(s_max, x, beta, similarity).to(lse.dtype)
    return out, support, argmax, lse.to(out.dtype)


def absolute_max_score(s_max: Tensor, x: Tensor, beta: float, similarity: str) -> Tensor:
    """``beta * max sim`` per row from the maximum computed score: l2 scores are shifted by
    ``||x||^2`` (``2 x.k - ||k||^2``), shifted back here before beta multiplies, so that a huge
    beta does not meet ``inf - inf``. float64; may be +-inf beyond float64's range only."""
    s_max = s_max.detach().double()
    if similarity == "l2":
        s_max = s_max - (x.detach().double() ** 2).sum(dim=1)
    return beta * s_max


def retrieve(
    queries: Tensor,
    memories: Tensor,
    values: Tensor | None = None,
    *,
    beta: float = 1.0,
    similarity: str = "dot",
    separation: str = "softmax",
    alpha: float = 1.5,
    degree: float = 10,
    steps: int = 1,
    tol: float | None = None,
    clamp_mask: Tensor | None = None,
    return_info: bool = False,
    chunk_size: int | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    sq_norms: Tensor | None = None,
):
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
        return _one_step(
            rows,
            memories,
            values,
            beta=beta,
            similarity=similarity,
            separation=separation,
            alpha=alpha,
            degree=degree,
            chunk_size=chunk_size,
            candidates=candidates,
            sq_norms=sq_norms,
            want_info=return_info,
        )

    return iterate(
        one_step,
        queries,
        dtype,
        steps=steps,
        tol=tol,
        clamp_mask=clamp_mask,
        return_info=return_info,
    )


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


# --------------------------------------------------------------------------------------------------
# The independent float64 oracle.


def naive_scores(queries: Tensor, keys: Tensor, similarity: str) -> Tensor:
    """True similarities in float64 from explicit pairwise differences (B x M x d in memory)."""
    queries, keys = queries.double(), keys.double()
    if similarity == "dot":
        return queries @ keys.T
    diff = queries[:, None, :] - keys[None, :, :]
    if similarity == "l2":
        return -(diff * diff).sum(dim=-1)
    if similarity == "manhattan":
        return -diff.abs().sum(dim=-1)
    raise ValueError(f"unknown similarity {similarity!r}")


def naive_separation(z: Tensor, separation: str, alpha: float = 1.5, degree: float = 10) -> Tensor:
    """Weights over the last dimension of float64 scaled scores ``z``.

    Sparse thresholds by 200 bisection steps between ``max - 1`` and ``max - M^(1-alpha)``, on the
    scores minus their row maximum (else ``max - 1 == max`` once the scores pass ~1e16).
    """
    z = z.double()
    if separation == "softmax":
        return torch.softmax(z, dim=-1)
    if separation == "polynomial":
        rectified = torch.relu(z)
        top = rectified.max(dim=-1, keepdim=True).values
        weights = (rectified / torch.where(top > 0, top, torch.ones_like(top))) ** degree
        total = weights.sum(dim=-1, keepdim=True)
        return torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 0.0)
    a = separation_alpha(separation, alpha)
    x = (a - 1.0) * (z - z.max(dim=-1, keepdim=True).values)
    q = 1.0 / (a - 1.0)
    lo = torch.full_like(x[..., :1], -1.0)
    hi = torch.full_like(lo, -(z.shape[-1] ** (1.0 - a)))
    for _ in range(200):
        mid = (lo + hi) / 2
        mass = (torch.relu(x - mid) ** q).sum(dim=-1, keepdim=True)
        lo, hi = torch.where(mass >= 1, mid, lo), torch.where(mass >= 1, hi, mid)
    p = torch.relu(x - lo) ** q
    return p / p.sum(dim=-1, keepdim=True)


def naive_info(
    scores: Tensor, p: Tensor, beta: float, separation: str, alpha: float = 1.5, degree: float = 10
) -> tuple[Tensor, Tensor, Tensor]:
    """(support, argmax, lse) of one update from its float64 true scores and weights."""
    z = beta * scores
    if separation == "softmax":
        return (p > SOFTMAX_SUPPORT_EPS).sum(1), scores.argmax(1), torch.logsumexp(z, dim=1)
    if separation == "polynomial":
        return (
            (z > 0).sum(1),
            scores.argmax(1),
            torch.logsumexp(degree * torch.log(torch.relu(z)), 1),
        )
    a = separation_alpha(separation, alpha)
    tsallis = (1.0 - (p**a).sum(1)) / (a * (a - 1.0))
    return (p > 0).sum(1), scores.argmax(1), (p * z).sum(1) + tsallis


def naive_retrieve(
    queries: Tensor,
    memories: Tensor,
    values: Tensor | None = None,
    *,
    beta: float = 1.0,
    similarity: str = "dot",
    separation: str = "softmax",
    alpha: float = 1.5,
    degree: float = 10,
    steps: int = 1,
    tol: float | None = None,
    clamp_mask: Tensor | None = None,
    return_info: bool = False,
):
    """The float64 output of :func:`hen_fast.retrieve` computed the plain way (small inputs only),
    with the :class:`RetrieveInfo` as well when ``return_info``."""
    keys = memories.double()
    values = keys if values is None else values.double()
    x0 = queries.double()
    x = x0
    rows = x.shape[0]
    moving = torch.ones(rows, dtype=torch.bool, device=x.device)
    info = [
        torch.zeros(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.float64),
    ]
    for _ in range(steps):
        scores = naive_scores(x, keys, similarity)
        p = naive_separation(beta * scores, separation, alpha, degree)
        new = p @ values
        if clamp_mask is not None:
            new = torch.where(clamp_mask.to(x.device), x0, new)
        step_info = (info[0] + 1, *naive_info(scores, p, beta, separation, alpha, degree))
        info = [torch.where(moving, now, before) for now, before in zip(step_info, info)]
        if tol is not None and steps > 1:
            new = torch.where(moving[:, None], new, x)
            moving = moving & (torch.linalg.vector_norm(new - x, dim=1) > tol)
        x = new
    return (x, RetrieveInfo(*info)) if return_info else x


# --------------------------------------------------------------------------------------------------
# U-Hop's separation loss, the plain way (torch.pdist materialises all M (M - 1) / 2 distances).

SEPARATION_REDUCTIONS = ("average", "max")


def naive_separation_loss(
    features: Tensor, t: float = 2.0, reduction: str = "average", dtype=torch.float64
) -> Tensor:
    """U-Hop's separation loss of the rows of ``features`` (M, D) by ``torch.pdist``, in ``dtype``.

    ``"average"``: ``log mean_{u != v} exp(-t ||z_u - z_v||^2)`` over the M (M - 1) ordered pairs
    (each unordered pair twice, which the mean does not see); ``"max"`` (Appendix G.2):
    ``max_{u != v} -t ||z_u - z_v||^2``, the log-kernel of the closest pair. Differentiable.
    """
    num_rows = features.shape[0]
    log_kernel = -t * torch.pdist(features.to(dtype)) ** 2
    if reduction == "max":
        return log_kernel.max()
    return torch.logsumexp(log_kernel, dim=0) - math.log(num_rows * (num_rows - 1) / 2)
