"""Retrieval over an indexed bank: each query reads the clusters that can matter and skips the
rest with a certificate (:mod:`hen_fast.index` holds the clusters and their score bounds).

Per query, clusters are visited in rounds of 1, 1, 2, 4, ... clusters (never more than are
still needed), each round the unvisited clusters that can matter most (by bound; softmax: by the
bound on their weight), and the visited clusters' partial state is the one
:mod:`hen_fast.partial` defines for any part of a bank:

* sparsemax and entmax: a memory with computed score ``s <= theta`` gets weight exactly 0, where
  ``theta = s_max + tau / ((alpha - 1) beta)`` is the score-space threshold. The threshold of the
  visited memories' best candidates bounds the whole bank's from below (taking memories in can
  only raise it), so every cluster whose bound is ``<= theta`` holds no support: the visit stops
  when the next bound is at or below it, and the update solved over the prefix is the whole
  bank's, exactly (:func:`hen_fast.merge.sparse_finish` over the clusters read).
* softmax: the skipped clusters' weight relative to the visited is at most
  ``sum_c n_c exp(beta (bound_c - best) - rel)`` (``lse = beta best + rel`` of those read); the
  visit stops when that is ``<= eps`` and returns it as ``mass_bound``. Polynomial likewise with
  ``n_c relu(beta bound_c)^degree``: a cluster with bound ``<= 0`` weighs exactly nothing.

The queries of a call share :data:`FALLBACK_FRACTION` of the bank (:func:`_visit_within`):
queries whose needed clusters do not fit it (bounds that do not prune: isotropic data, small
beta) go to the whole-bank kernel together, and so does every query of a call on a bank too
small for the visits' fixed cost to pay (many queries, small banks: :data:`QUERY_OVERHEAD_BYTES`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import numerics
from .backends.norms import remember_sq_norms
from .index import BankIndex, score_bounds
from .merge import (
    _chunk_partial,
    _scores,
    _softmax_support,
    sparse_finish,
    sparse_threshold,
)
from .partial import ArgmaxState, CandidateState, DenseState, fold
from .sources import LOCAL

# The softmax mass a call may skip unless it asks otherwise: float32's unit roundoff, below the
# rounding of any float32 output (the output moves by at most 2 eps max ||v||).
DEFAULT_EPS = 2.0**-24
# A query that would read more of the bank than this goes to the whole-bank scan instead: a
# visit costs a row 3-9x what the scan does (gathered rows, rounds of small torch ops), so past
# about a tenth of the bank the scan is faster (benchmarks/index_cpu.py, 1e6 x 128: 9% read ran
# 1.0-1.6x faster than the scan, 22% 2x slower).
FALLBACK_FRACTION = 0.1
# A call on a bank of fewer bytes than this per query goes whole to the scan: a visit's fixed
# cost (bounds, a few rounds of small torch ops: ~1.3 ms on a 2-core CPU) leaves too little to
# gain against a scan of that size (~3 ms at ~20 GB/s). From benchmarks/index_cpu.py's sweep:
# indexed, a 1e5 x 128 float32 bank (49 MiB) lost to the scan for one query at any fraction
# read, 3e5 x 128 (146 MiB) gained for one query (1.2-2.1x) and lost for eight, 1e6 x 128
# (488 MiB) gained for eight.
QUERY_OVERHEAD_BYTES = 56 << 20
# Candidates a sparse visit keeps: a larger support gets Newton passes over the rows read (few),
# and every round's top-k over the candidates costs in proportion.
VISIT_CANDIDATES = 512


class PrefixSource:
    """Some clusters of an indexed bank as a :class:`~hen_fast.sources.BankSource`: chunks are the
    clusters' row ranges (adjacent ranges joined), indices stay the bank's."""

    offset = 0

    def __init__(self, bank, ranges: list[tuple[int, int]], device):
        self.bank, self.device = bank, device
        self.ranges = _joined(ranges)
        self.local_count = bank.keys.shape[0]  # every global index is addressable here
        self.num_memories = sum(end - begin for begin, end in self.ranges)
        self.value_dim = bank.value_dim

    def chunks(self):
        for begin, end in self.ranges:
            yield (begin, *self.bank.rows(begin, end, self.device))

    def values_at(self, local_index: Tensor) -> Tensor:
        source = self.bank.keys if self.bank.values is None else self.bank.values
        return source[local_index.to(source.device)].to(self.device)


def _joined(ranges):
    joined: list[tuple[int, int]] = []
    for begin, end in sorted(ranges):
        if joined and joined[-1][1] == begin:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((begin, end))
    return joined


class IndexedBank:
    """The tensors of an indexed bank, as the indexed step reads them."""

    def __init__(self, keys, values, norms, index: BankIndex):
        self.keys, self.values, self.norms, self.index = keys, values, norms, index
        self.value_dim = keys.shape[1] if values is None else values.shape[1]
        self.nbytes = sum(t.numel() * t.element_size() for t in (keys, values) if t is not None)
        self.num_clusters = index.num_clusters
        self.size_counts = index.sizes.cpu()
        self.size_table = self.size_counts.double()
        self.start_table = index.offsets[:-1].cpu()

    def global_index(self, clusters: Tensor, device) -> Tensor:
        """The bank rows of these clusters, in this order (one vectorised op: a round may take
        hundreds of small clusters)."""
        sizes, starts = self.size_counts[clusters], self.start_table[clusters]
        total = int(sizes.sum())
        # row i of cluster j is starts[j] + i: the cluster's start minus the rows before it
        shift = starts - (torch.cumsum(sizes, 0) - sizes)
        index = torch.repeat_interleave(shift, sizes, output_size=total) + torch.arange(total)
        return index.to(device)

    def ranges(self, clusters: Tensor) -> list[tuple[int, int]]:
        starts = self.start_table[clusters]
        return list(zip(starts.tolist(), (starts + self.size_counts[clusters]).tolist()))

    def gather(self, clusters: Tensor, device, with_values: bool = True):
        """``(global index, keys, norms or None, values or None)`` of these clusters' rows, in
        one block on ``device``: one gather and one scoring per round of a visit, since a call
        per cluster costs more than a small cluster's rows."""
        index = self.global_index(clusters, self.keys.device)
        keys = self.keys.index_select(0, index).to(device)
        norms = None if self.norms is None else self.norms.index_select(0, index).to(device)
        if norms is not None:
            remember_sq_norms(keys, norms)
        values = None
        if with_values and self.values is not None:
            values = self.values.index_select(0, index).to(device)
        return index.to(device), keys, norms, values

    def rows(self, begin: int, end: int, device):
        """``(keys, norms, values or None)`` of rows ``begin:end`` on ``device``."""
        keys = self.keys[begin:end].to(device)
        norms = None if self.norms is None else self.norms[begin:end].to(device)
        if norms is not None:
            remember_sq_norms(keys, norms)
        values = None if self.values is None else self.values[begin:end].to(device)
        return keys, norms, values


def indexed_step(rows: Tensor, bank: IndexedBank, scan, *, impl, beta, similarity, separation,
                 alpha, degree, candidates, eps, want_info):  # fmt: skip
    """``(out, support, argmax, lse, fraction_read, mass_bound)`` of one update of ``rows``, as
    :func:`hen_fast.loop.iterate` takes from ``one_step`` (with two info fields more).
    ``scan(rows)`` is one update over the whole bank, for the queries that fall back to it."""
    count, memories = rows.shape[0], bank.keys.shape[0]
    fields = _empty_fields(rows, bank.value_dim)
    # The queries share FALLBACK_FRACTION of the bank's rows. A pool of less than an average
    # cluster, or a bank of fewer bytes than the queries' fixed cost, cannot pay for the
    # visits: all scan.
    pool = FALLBACK_FRACTION * memories
    hopeless = pool < memories / bank.num_clusters
    hopeless |= count * QUERY_OVERHEAD_BYTES > bank.nbytes
    if hopeless:
        fallback = list(range(count))
    else:
        bounds = score_bounds(rows, bank.index, similarity)
        visits = [_QueryVisit(rows[row : row + 1], bounds[row], bank, impl=impl, beta=beta,
                              similarity=similarity, separation=separation, alpha=alpha,
                              degree=degree, candidates=candidates, eps=eps)
                  for row in range(count)]  # fmt: skip
        fallback = _visit_within(visits, pool)
        scanned = set(fallback)
        for row, visit in enumerate(visits):
            if row not in scanned:
                for field, value in zip(fields, visit.result(want_info)):
                    field[row] = value[0]
    if fallback:
        which = torch.tensor(fallback, device=rows.device)
        scanned = scan(rows[which])
        for field, value in zip(fields, scanned):
            if value is not None:  # None: info not asked for
                field[which] = value.to(field.dtype)
        fields[4][which] = 1.0
        fields[5][which] = 0.0
    return tuple(fields)


def _empty_fields(rows: Tensor, value_dim: int):
    count, device = rows.shape[0], rows.device
    long = torch.zeros(count, dtype=torch.long, device=device)
    real = torch.zeros(count, dtype=rows.dtype, device=device)
    return [rows.new_zeros(count, value_dim), long, long.clone(), real, real.clone(), real.clone()]


def _visit_within(visits: list, pool: float) -> list[int]:
    """Advance every query's visit within ``pool`` rows in all; the queries left to the scan.

    Each query first reads within an equal share of the pool. Those that need more wait: when
    none has to be scanned and their needs (as their bounds stand) fit in what is left, they
    read on in it. Once a scan is certain (a query that is not finite, its rule; needs that do
    not fit), every query waiting or not yet tried goes to it: the scan reads the bank once for
    all of them (it is memory-bound for as many queries as a call may have here), so a visit
    then would only add to its time."""
    share = pool / len(visits)
    waiting: list[int] = []
    for row, visit in enumerate(visits):
        if not visit.finite:
            return waiting + list(range(row, len(visits)))
        if not visit.advance(share):
            waiting.append(row)
            left = pool - sum(tried.read for tried in visits[: row + 1])
            if sum(visits[i].need - visits[i].read for i in waiting) > left:
                return waiting + list(range(row + 1, len(visits)))
    scanned = []
    for row in waiting:
        left = pool - sum(tried.read for tried in visits)
        if not visits[row].advance(visits[row].read + left):
            scanned.append(row)
    return scanned


class _QueryVisit:
    """One query's visit of the clusters it needs, in rounds, resumable: :meth:`advance` reads
    on while the rows still needed fit a budget."""

    def __init__(self, row, bounds, bank, *, impl, beta, similarity, separation, alpha, degree,
                 candidates, eps):  # fmt: skip
        self.row, self.bank, self.beta, self.degree = row, bank, beta, degree
        self.sparse = separation in ("sparsemax", "entmax")
        self.alpha = numerics.separation_alpha(separation, alpha) if self.sparse else alpha
        if self.sparse:
            self.visit = _SparseVisit(row, similarity, min(candidates, VISIT_CANDIDATES))
        else:
            self.visit = _DenseVisit(row, impl, beta, similarity, separation, degree,
                                     bank.value_dim)  # fmt: skip
        self.log_eps = math.log(eps) if eps > 0 else -math.inf
        self.finite = bool(torch.isfinite(bounds[bank.size_table > 0]).all())
        # The unvisited clusters' bounds (-inf: visited or empty); no sort of all of them: a
        # round takes its clusters by topk, cheaper for the few clusters a pruning query needs.
        self.unvisited = bounds.clone()
        self.taken: list[Tensor] = []
        self.read, self.mass, self.round_size = 0.0, 0.0, 1
        # the first round: the best bound; need: the rows read once the needed ones are
        self.next = self.unvisited.topk(1).indices
        self.need = float(bank.size_table[self.next].sum())

    def advance(self, budget: float) -> bool:
        """Read rounds while the rows needed fit ``budget`` in all; True when done."""
        sizes = self.bank.size_table
        while self.next is not None:
            if self.need > budget:
                return False
            # One gather and one scoring of the round's clusters: a call per cluster would
            # cost more than reading it.
            step = self.next
            self.visit.take(self.bank, step)
            self.taken.append(step)
            self.unvisited[step] = -math.inf
            self.read += float(sizes[step].sum())
            if self.sparse:  # clusters that may hold support: bound above the threshold so far
                weights = self.unvisited
                needed = self.unvisited > self.visit.floor(self.beta, self.alpha)
            else:  # clusters by their weight bound; the rest may stay while they sum to <= eps
                weights = self.visit.log_mass(self.unvisited, sizes, self.beta, self.degree)
                needed = _needed_for_eps(weights, self.log_eps)
            count = int(needed.sum())
            if count == 0:
                if not self.sparse:
                    self.mass = math.exp(float(torch.logsumexp(weights, dim=0)))
                self.next = None
                break
            self.need = self.read + float(sizes[needed].sum())
            self.round_size = min(count, 2 * self.round_size if len(self.taken) > 1 else 1)
            self.next = torch.where(needed, weights, -math.inf).topk(self.round_size).indices
        return True

    def result(self, want_info: bool):
        """``(out, support, argmax, lse, fraction_read, mass_bound)`` of a finished visit."""
        row, bank = self.row, self.bank
        source = PrefixSource(bank, bank.ranges(torch.cat(self.taken)), row.device)
        out, support, argmax, lse = self.visit.finish(source, self.beta, self.alpha, want_info)
        fraction = row.new_tensor([self.read / bank.keys.shape[0]])
        return out, support, argmax, lse, fraction, row.new_tensor([min(self.mass, 1.0)])


def _needed_for_eps(log_mass: Tensor, log_eps: float) -> Tensor:
    """The fewest clusters, largest bound on weight first, whose reading leaves at most
    ``exp(log_eps)`` of weight unread: a mask. Only clusters above ``eps / C`` are sorted: those
    below sum to at most ``eps`` together and come last in any case."""
    clusters = log_mass.shape[0]
    big = log_mass > log_eps - math.log(clusters)
    small_total = torch.logsumexp(torch.where(big, -math.inf, log_mass), dim=0)
    needed = torch.zeros_like(big)
    if not bool(big.any()):
        return needed
    which = big.nonzero()[:, 0]
    ordered, order = torch.sort(log_mass[which], descending=True, stable=True)
    # tail[i]: the weight of clusters i, i+1, ... of the sorted big ones, with every small one
    tail = torch.logaddexp(torch.logcumsumexp(ordered.flip(0), dim=0).flip(0), small_total)
    keep = int((tail > log_eps).sum())  # tail falls along the order: read up to where it drops
    needed[which[order[:keep]]] = True
    return needed


class _SparseVisit:
    """A query's best candidates over the clusters visited so far."""

    def __init__(self, row, similarity, candidates):
        self.row, self.similarity, self.candidates = row, similarity, candidates
        self.argmax = ArgmaxState.empty(1, row)
        self.kept = CandidateState.empty(1, row)

    def take(self, bank, clusters):
        index, keys, norms, _ = bank.gather(clusters, self.row.device, with_values=False)
        scores = _scores(self.row, keys, norms, self.similarity)
        best = ArgmaxState.of_scores(0, scores)
        self.argmax = self.argmax.merge(ArgmaxState(best.best, index[best.index]))
        part = CandidateState.of_scores(0, scores)
        part = CandidateState(part.scores, index[part.index])
        self.kept = self.kept.merge(part, self.candidates)

    def floor(self, beta, alpha) -> float:
        """The score-space threshold of the candidates so far: no memory at or below it has
        weight in the whole bank's update."""
        s_max, _, tau = sparse_threshold(self.kept.scores, beta, alpha)
        return float(s_max[0] + tau[0] / ((alpha - 1.0) * numerics.dtype_beta(beta, tau.dtype)))

    def finish(self, source, beta, alpha, want_info):
        kept = self.kept
        return sparse_finish(self.row, source, LOCAL, beta, self.similarity, alpha, kept.scores,
                             kept.index, self.argmax.index)  # fmt: skip


class _DenseVisit:
    """Softmax and polynomial: the prefix's merged partial state."""

    def __init__(self, row, impl, beta, similarity, separation, degree, value_dim):
        self.row, self.impl, self.beta = row, impl, beta
        self.similarity, self.separation, self.degree = similarity, separation, degree
        self.scale = beta if separation == "softmax" else 0.0
        self.state = DenseState.empty(1, value_dim, row)

    def take(self, bank, clusters):
        index, keys, norms, values = bank.gather(clusters, self.row.device)
        part = _chunk_partial(self.row, 0, keys, norms, values, self.impl, self.beta,
                              self.similarity, self.separation, self.degree)  # fmt: skip
        part = DenseState(part.rel, part.out, part.best, index[part.index], part.support)
        self.state = fold([self.state, part], lambda a, b: a.merge(b, self.scale))

    def log_mass(self, bounds, sizes, beta, degree) -> Tensor:
        """``log`` of the bound on each cluster's weight relative to the visited weight (bounds
        of ``-inf``: nothing)."""
        state = self.state
        if self.similarity == "l2":  # bounds shifted by ||x||^2; best is the true -||x - k||^2
            bounds = bounds - float((self.row.double() ** 2).sum())
        if self.separation == "softmax":
            best = float(state.best[0])
            gap = numerics.relative_scores(bounds[None], bounds.new_tensor([best]), beta)[0]
            return sizes.log() + gap - float(state.rel[0])
        # relu(beta * bound) ** degree, log-partition rel (scale 0)
        positive = torch.clamp(bounds * beta, min=0.0)
        return sizes.log() + degree * positive.log() - float(state.rel[0])

    def finish(self, source, beta, alpha, want_info):
        state = self.state
        support = state.support
        if self.separation == "softmax" and want_info:
            support = _softmax_support(self.row, source, LOCAL, beta, self.similarity, state.rel,
                                       state.best)  # fmt: skip
        return state.out, support, state.index, state.lse(self.scale).to(self.row.dtype)
