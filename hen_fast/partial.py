"""Partial states: what one part of a bank contributes to an update, and their exact merges.

A bank split into parts (chunks read one at a time, shards on other processes) is retrieved from
by computing each part's partial state and merging the states. This module is the one definition
of those states and merges; :mod:`hen_fast.merge` drives them over a bank's parts, the torch
backend folds its chunks with :class:`ArgmaxState`, and the kernels' combine steps (Triton's
``_combine_kernel``, the C++ thread merge, the CUDA combine kernel) implement the same rules on
their splits: a larger maximum wins and the earlier part keeps a tie; log-partitions add as
``logaddexp`` relative to the larger maximum; sparse candidates merge by keeping the best
``capacity`` entries of the union.

Every merge is associative and gives the same answer for any grouping of the parts; empty parts
(no memories) are identities. ``tests/test_partial.py`` checks these properties alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ArgmaxState:
    """Each row's best similarity and the first global index where it occurs."""

    best: Tensor
    index: Tensor

    @classmethod
    def empty(cls, rows: int, like: Tensor) -> ArgmaxState:
        best = torch.full((rows,), -math.inf, dtype=like.dtype, device=like.device)
        return cls(best, torch.zeros(rows, dtype=torch.long, device=like.device))

    @classmethod
    def of_scores(cls, start: int, scores: Tensor) -> ArgmaxState:
        """The state of one part's scores ``(rows, part size)`` whose first memory is ``start``."""
        best, index = scores.detach().max(dim=1)
        return cls(best, index + start)

    def merge(self, later: ArgmaxState) -> ArgmaxState:
        """A larger best wins; a tie keeps the smaller index, as one pass over the whole bank
        would (parts may come in any order: an indexed bank visits its clusters by bound)."""
        better = (later.best > self.best) | ((later.best == self.best) & (later.index < self.index))
        return ArgmaxState(
            torch.where(better, later.best, self.best), torch.where(better, later.index, self.index)
        )


@dataclass
class DenseState:
    """Softmax and polynomial: a part's normalised output and its log-partition.

    ``lse = scale * best + rel``, with ``best`` the part's highest similarity (float64; with
    ``index`` also its argmax) and ``rel`` the log-partition relative to it, kept apart so that a
    merge never subtracts two huge, nearly equal numbers. Softmax has ``scale = beta``;
    polynomial, not shift-invariant, keeps its whole lse in ``rel`` (``scale = 0``). A part with
    no mass has ``rel = -inf`` (polynomial: every score <= 0) and weighs nothing in a merge.
    """

    rel: Tensor
    out: Tensor
    best: Tensor
    index: Tensor
    support: Tensor

    @classmethod
    def empty(cls, rows: int, value_dim: int, like: Tensor) -> DenseState:
        minus_inf = torch.full((rows,), -math.inf, dtype=torch.float64, device=like.device)
        zeros = torch.zeros(rows, dtype=torch.long, device=like.device)
        return cls(minus_inf, like.new_zeros(rows, value_dim), minus_inf.clone(), zeros,
                   zeros.clone())  # fmt: skip

    def lse(self, scale: float) -> Tensor:
        return self.rel if scale == 0.0 else self.rel + scale * self.best

    def merge(self, later: DenseState, scale: float) -> DenseState:
        """``L = log(exp L_a + exp L_b)``, ``out = exp(L_a - L) out_a + exp(L_b - L) out_b``,
        both relative to the larger best."""
        argmax = ArgmaxState(self.best, self.index).merge(ArgmaxState(later.best, later.index))
        top = argmax.best
        mine, theirs = self._rel_to(top, scale), later._rel_to(top, scale)
        rel = torch.logaddexp(mine, theirs)
        out = self.out * _weight(mine, rel)[:, None] + later.out * _weight(theirs, rel)[:, None]
        return DenseState(rel, out, top, argmax.index, self.support + later.support)

    def _rel_to(self, top: Tensor, scale: float) -> Tensor:
        """The log-partition relative to ``scale * top`` (``top >= best``)."""
        if scale == 0.0:
            return self.rel
        gap = torch.where(self.best == top, 0.0, (self.best - top) * scale)  # -inf - -inf: 0
        return self.rel + gap


def _weight(part_rel: Tensor, rel: Tensor) -> Tensor:
    # A part with no mass weighs 0, also when no part has any (rel = -inf: no 0 * NaN).
    return torch.where(torch.isneginf(part_rel), 0.0, torch.exp(part_rel - rel))


@dataclass
class CandidateState:
    """Sparsemax and entmax: each row's ``capacity`` highest similarities over the parts seen,
    descending, with their global memory indices (None where only the threshold is wanted:
    the indices cost a gather per merge). The exact threshold is solved on them."""

    scores: Tensor
    index: Tensor | None

    @classmethod
    def empty(cls, rows: int, like: Tensor, with_index: bool = True) -> CandidateState:
        index = torch.empty(rows, 0, dtype=torch.long, device=like.device) if with_index else None
        return cls(like.new_empty(rows, 0), index)

    @classmethod
    def of_scores(cls, start: int, scores: Tensor, with_index: bool = True) -> CandidateState:
        rows, count = scores.shape
        if not with_index:
            return cls(scores, None)
        return cls(
            scores, torch.arange(start, start + count, device=scores.device).expand(rows, -1)
        )

    def merge(self, later: CandidateState, capacity: int) -> CandidateState:
        """The best ``capacity`` of the union. topk does not promise which of tied entries it
        keeps, but ties carry equal scores, so the threshold solved on them is the same."""
        scores = torch.cat([self.scores, later.scores], dim=1)
        kept, where = scores.topk(min(capacity, scores.shape[1]), dim=1, sorted=True)
        if self.index is None:
            return CandidateState(kept, None)
        return CandidateState(kept, torch.cat([self.index, later.index], dim=1).gather(1, where))

    def padded(self, capacity: int) -> CandidateState:
        """Exactly ``capacity`` columns (an exchange needs one shape on every process): padding
        is ``-inf`` with index -1, below any score, and never carries weight."""
        pad = capacity - self.scores.shape[1]
        if pad < 0:
            raise ValueError(f"{self.scores.shape[1]} candidates do not fit in {capacity}")
        return CandidateState(
            torch.nn.functional.pad(self.scores, (0, pad), value=-math.inf),
            torch.nn.functional.pad(self.index, (0, pad), value=-1),
        )


def fold(states, merge):
    """``states`` merged left to right (in part order) by ``merge(a, b)``: the same bits wherever
    the fold runs (every process folds the gathered states in rank order)."""
    states = iter(states)
    total = next(states)
    for state in states:
        total = merge(total, state)
    return total
