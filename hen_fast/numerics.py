"""The numerics every retrieval path shares: similarities, extreme-value rules, and the exact
entmax threshold solvers.

Conventions (DESIGN.md): scores ``z = beta * sim``; ``l2`` similarity is ``-||x - k||^2`` and is
evaluated as ``2 x.k - ||k||^2`` (each row's ``-||x||^2`` cancels in every separation but the
polynomial one, which is defined for ``dot`` only); entmax with parameter alpha is
``p = [(alpha - 1) z - tau]_+ ^ (1 / (alpha - 1))`` with ``tau`` such that ``sum p = 1``, sparsemax
is alpha = 2; polynomial weights are ``relu(z) ** degree`` normalised, zero for an all-non-positive
row. Half-precision inputs are computed in float32, float64 inputs in float64.

Extremes: beta multiplies differences from each row's maximum similarity (:func:`relative_scores`),
never a similarity itself, and similarities are clamped to the compute dtype's finite range
(:func:`finite_scores`), so any finite beta and scores beyond float32's range give finite weights.
Thresholds are solved on scores relative to the row maximum, where ``tau`` lies in ``[-1, 0)``.

The torch backend, the streamed/sharded merge, the Triton host code and the U-Hop layer use
these; :mod:`hen_fast.oracle` does not (it checks them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .codes import SIMILARITIES

# Softmax weights are never exactly zero; "support" counts those above this.
SOFTMAX_SUPPORT_EPS = 1e-6
NEWTON_MAX_ITERS = 100


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (half precision accumulates in float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def separation_alpha(separation: str, alpha: float) -> float:
    """The entmax parameter a separation stands for: 1 softmax, 2 sparsemax, alpha for entmax."""
    return {"softmax": 1.0, "sparsemax": 2.0, "entmax": float(alpha)}[separation]


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
    return (s - s_max[:, None]) * dtype_beta(beta, s.dtype)


def dtype_beta(beta: float, dtype: torch.dtype) -> float:
    """``beta`` as it may multiply a tensor of ``dtype``: a Python float past the dtype's range
    becomes inf there, and inf * 0 (the maximum's own difference) NaN. The dtype's largest value
    gives the same limit: every difference from the maximum but 0 goes to -inf."""
    return min(beta, torch.finfo(dtype).max)


def power(base: Tensor, exponent: float) -> Tensor:
    """``base ** exponent`` for ``base >= 0``; the common exponents exactly and cheaply."""
    if exponent == 1.0:
        return base
    if exponent == 2.0:
        return base * base
    return base.pow(exponent)


def sorted_threshold(x_sorted: Tensor, alpha: float) -> Tensor:
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


def newton_threshold(
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


def row_sums(x: Tensor, q: float):
    """``partial_sums`` for Newton over scores held in memory (``x`` float64, rows x candidates)."""

    def partial_sums(tau: Tensor, x_max: Tensor):
        ratio = torch.relu(x - tau[:, None]) / (x_max - tau)[:, None]
        return power(ratio, q).sum(dim=1), inner_power_sum(ratio, q)

    return partial_sums


def inner_power_sum(ratio: Tensor, q: float) -> Tensor:
    if q == 1.0:
        return (ratio > 0).sum(dim=1).to(ratio.dtype)
    return power(ratio, q - 1.0).sum(dim=1)


def solve_threshold(x_kept: Tensor, alpha: float) -> Tensor:
    """Exact tau (float64) of each row's descending candidates ``x_kept`` (relative to the row
    maximum: ``x_kept[:, 0] == 0``)."""
    if alpha in (1.5, 2.0):
        return sorted_threshold(x_kept, alpha)
    start = x_kept[:, 0] - 1.0
    return newton_threshold(row_sums(x_kept, 1.0 / (alpha - 1.0)), x_kept[:, 0], start, alpha)


def absolute_max_score(s_max: Tensor, x: Tensor, beta: float, similarity: str) -> Tensor:
    """``beta * max sim`` per row from the maximum computed score: l2 scores are shifted by
    ``||x||^2`` (``2 x.k - ||k||^2``), shifted back here before beta multiplies, so that a huge
    beta does not meet ``inf - inf``. float64; may be +-inf beyond float64's range only."""
    s_max = s_max.detach().double()
    if similarity == "l2":
        s_max = s_max - (x.detach().double() ** 2).sum(dim=1)
    return beta * s_max


def sparse_energy(dot_px: Tensor, total: Tensor, sum_p_alpha: Tensor, alpha: float) -> Tensor:
    """The entmax energy ``<p, z> + Tsallis entropy`` relative to ``beta * s_max``, from sums over
    the unnormalised weights ``p`` of one row: ``<p, x>`` with ``x = (alpha - 1) beta (s - s_max)``,
    ``sum p`` and ``sum p^alpha``. Normalising here makes it exact whatever tau's last bit."""
    return dot_px / (total * (alpha - 1.0)) + (1.0 - sum_p_alpha / total**alpha) / (
        alpha * (alpha - 1.0)
    )
