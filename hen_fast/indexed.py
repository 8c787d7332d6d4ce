"""Retrieval over an indexed bank: the queries of a call read the clusters that can matter and
skip the rest with a certificate (:mod:`hen_fast.index` holds the clusters and their score
bounds).

The queries visit clusters together (:class:`_Visit`), in rounds of 1, 1, 2, 4, ... clusters
per query (never more than it still needs): each query still needing names its unvisited
clusters that can matter most (by bound; softmax: by the bound on their weight), the union is
read once and every query scores all of it, so each query's state is the partial state that
:mod:`hen_fast.partial` defines for the same part of the bank:

* sparsemax and entmax: a memory with computed score ``s <= theta`` gets weight exactly 0, where
  ``theta = s_max + tau / ((alpha - 1) beta)`` is the score-space threshold. The threshold of the
  visited memories' best candidates bounds the whole bank's from below (taking memories in can
  only raise it), so every cluster whose bound is ``<= theta`` holds no support: a query is done
  when every unread bound is at or below it, and the update solved over the rows read is the
  whole bank's, exactly (:func:`hen_fast.merge.sparse_finish` over the clusters read).
* softmax: the skipped clusters' weight relative to the visited is at most
  ``sum_c n_c exp(beta (bound_c - best) - rel)`` (``lse = beta best + rel`` of those read); a
  query is done when that is ``<= eps`` and returns it as ``mass_bound``. Polynomial likewise
  with ``n_c relu(beta bound_c)^degree``: a cluster with bound ``<= 0`` weighs exactly nothing.

A call reads at most :data:`FALLBACK_FRACTION` of the bank (on a sketched bank, at most the
rows the sketch's bytes are worth): once the clusters its queries still need do not fit (bounds
that do not prune: real features, isotropic data, small beta), those queries read their best
few clusters (:data:`SEED_CLUSTERS`) and try the index's row sketch if it has one
(:func:`_sketch_stage`, a bound per row, within :data:`SKETCH_FRACTION` of the bank), and go to
the whole-bank kernel together otherwise; so
does every query of a call on a bank too small for the visit's fixed cost to pay (many
queries, small banks: :data:`CALL_OVERHEAD_BYTES`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import numerics
from .backends.norms import remember_sq_norms
from .index import BankIndex, score_bounds, sketch_query_terms
from .merge import (
    _chunk_partial,
    _scores,
    _softmax_support,
    sparse_finish,
    sparse_threshold,
)
from .partial import ArgmaxState, CandidateState, DenseState, fold
from .sketch_filter import sketch_filter
from .sources import LOCAL

# The softmax mass a call may skip unless it asks otherwise: float32's unit roundoff, below the
# rounding of any float32 output (the output moves by at most 2 eps max ||v||).
DEFAULT_EPS = 2.0**-24
# A call reads at most this share of the bank; queries that would need more go to the
# whole-bank scan: a visit costs a row several times what the scan does (gathered rows, rounds
# of small torch ops), so past about a tenth of the bank the scan is faster
# (benchmarks/index_cpu.py, 1e6 x 128, one query: 5-8% read ran 0.9-1.9x the scan's speed, 9%
# 0.55-1.0x across runs, 22% 0.5x).
FALLBACK_FRACTION = 0.1
# A call goes whole to the scan when the bank has fewer bytes than CALL_OVERHEAD_BYTES plus
# QUERY_OVERHEAD_BYTES per query: a visit's fixed cost (the bounds, the rounds' small torch ops:
# ~1.5 ms on a 2-core CPU, and ~0.3 ms more per query, whose rounds are shared) leaves too
# little to gain against a scan of that size. From benchmarks/index_cpu.py's sweeps on the
# clustered data: indexed, a 1e5 x 128 float32 bank (49 MiB) lost to the scan for one query at
# any fraction read; 3e5 x 128 (146 MiB) gained 1.1-1.6x for one sparse query (softmax 0.7x)
# and lost for eight (0.6-1.07x across runs); 1e6 x 128 (488 MiB) gained 2.3x for 32 queries
# and lost for 128 (0.7x).
CALL_OVERHEAD_BYTES = 56 << 20
QUERY_OVERHEAD_BYTES = 12 << 20
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


class GatheredSource:
    """Rows gathered from an indexed bank as a source for the update's finish
    (:func:`hen_fast.merge.sparse_finish`, the softmax support count), which read chunks
    without their start: one chunk, start None; values by the bank's indices."""

    offset = 0

    def __init__(self, bank, index, keys, norms, values):
        self.bank, self.block = bank, (None, keys, norms, values)
        self.local_count = bank.keys.shape[0]  # every global index is addressable here
        self.num_memories = keys.shape[0]
        self.value_dim = bank.value_dim

    def chunks(self):
        yield self.block

    def values_at(self, local_index: Tensor) -> Tensor:
        source = self.bank.keys if self.bank.values is None else self.bank.values
        return source[local_index.to(source.device)].to(self.block[1].device)


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
        return self.gather_rows(self.global_index(clusters, self.keys.device), device,
                                with_values)  # fmt: skip

    def gather_rows(self, index: Tensor, device, with_values: bool = True):
        """``(index, keys, norms or None, values or None)`` of these bank rows on ``device``."""
        index = index.to(self.keys.device)
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
    # The call may read FALLBACK_FRACTION of the bank's rows. A bank of fewer bytes than the
    # queries' fixed cost cannot pay for the visit: all scan; a pool of less than an average
    # cluster leaves the queries to the row sketch (if any), else to the scan.
    pool = FALLBACK_FRACTION * memories
    sketched = sketch_applies(bank, similarity, separation, eps)
    if sketched:  # clusters past the sketch's bytes cost more than one read of the sketch
        key_bytes = bank.keys.numel() * bank.keys.element_size()
        pool = min(pool, memories * bank.index.sketch_bytes / key_bytes)
    clusters_fit = pool >= memories / bank.num_clusters
    if (CALL_OVERHEAD_BYTES + count * QUERY_OVERHEAD_BYTES > bank.nbytes
            or not (clusters_fit or sketched)):  # fmt: skip
        fallback = torch.arange(count, device=rows.device)
    else:
        visit = _Visit(rows, score_bounds(rows, bank.index, similarity), bank, impl=impl,
                       beta=beta, similarity=similarity, separation=separation, alpha=alpha,
                       degree=degree, candidates=candidates, eps=eps)  # fmt: skip
        if clusters_fit:
            visit.run(pool, seed_rows=SKETCH_SEED_FRACTION * memories if sketched else 0.0)
        else:  # not one average cluster fits the pool: only the sketch can spare reads
            visit.scanned[:] = True
        done = (~visit.scanned).nonzero()[:, 0]
        if done.numel():
            for field, value in zip(fields, visit.result(done, want_info)):
                field[done.to(field.device)] = value.to(field.dtype)
        fallback = visit.scanned.nonzero()[:, 0]
        if fallback.numel() and sketched:
            fallback = _sketch_stage(visit, fallback, fields, want_info)
        fallback = fallback.to(rows.device)
    if fallback.numel():
        scanned = scan(rows[fallback])
        for field, value in zip(fields, scanned):
            if value is not None:  # None: info not asked for
                field[fallback] = value.to(field.dtype)
        fields[4][fallback] = 1.0
        fields[5][fallback] = 0.0
    return tuple(fields)


def _empty_fields(rows: Tensor, value_dim: int):
    count, device = rows.shape[0], rows.device
    long = torch.zeros(count, dtype=torch.long, device=device)
    real = torch.zeros(count, dtype=rows.dtype, device=device)
    return [rows.new_zeros(count, value_dim), long, long.clone(), real, real.clone(), real.clone()]


class _Visit:
    """The queries of a call visiting clusters together, in rounds: each round every query
    that still needs clusters names its best unread ones (by bound; softmax: by the bound on
    their weight), the union is gathered once and every query scores all of it, so the
    queries share the rows read (one gather and one product per round, whatever their number:
    a visit per query would cost each the rounds' small ops).

    The rows read stay within ``pool``: when the clusters the queries still need (at their
    current thresholds, which only rise) do not fit in what is left, every query still needing
    goes to the scan, which reads the bank once for all of them (memory-bound for as many
    queries as a call may have here); the queries already answered keep their answers. A query
    whose bounds are not finite (its rule) goes to the scan at once."""

    def __init__(self, rows, bounds, bank, *, impl, beta, similarity, separation, alpha, degree,
                 candidates, eps):  # fmt: skip
        self.rows, self.bank, self.beta, self.degree = rows, bank, beta, degree
        self.sparse = separation in ("sparsemax", "entmax")
        self.alpha = numerics.separation_alpha(separation, alpha) if self.sparse else alpha
        if self.sparse:
            self.state = _SparseVisit(rows, similarity, min(candidates, VISIT_CANDIDATES))
        else:
            self.state = _DenseVisit(rows, impl, beta, similarity, separation, degree,
                                     bank.value_dim)  # fmt: skip
        self.log_eps = math.log(eps) if eps > 0 else -math.inf
        filled = bank.size_table > 0
        self.scanned = ~torch.isfinite(bounds[:, filled]).all(dim=1)
        self.unbounded = self.scanned.clone()  # queries no bound holds for (their rule)
        # The unread clusters' bounds (-inf: read or empty), per query.
        self.unread = bounds.clone()
        self.taken: list[Tensor] = []
        self.read, self.round_size = 0.0, 1
        self.mass = torch.zeros(rows.shape[0], dtype=torch.float64)

    def weights_and_needs(self) -> tuple[Tensor, Tensor]:
        """Per query and cluster: what orders the clusters, and whether it is still needed."""
        sizes = self.bank.size_table
        if self.sparse:  # bound above the threshold of what was read
            floor = self.state.floor(self.beta, self.alpha)
            return self.unread, self.unread > floor[:, None]
        weights = self.state.log_mass(self.unread, sizes, self.beta, self.degree)
        return weights, _needed_for_eps(weights, self.log_eps)

    def run(self, pool: float, seed_rows: float = 0.0) -> None:
        """Visits clusters in rounds until every query is answered or needs more than ``pool``
        rows in all. ``seed_rows``: the queries that give up first read their best clusters
        (by bound) up to that many rows in all, at most SEED_CLUSTERS each, so that the row
        sketch starts from a cut near their best score."""
        sizes = self.bank.size_table
        # the first round: each query's best bound
        needed = torch.zeros_like(self.unread, dtype=torch.bool)
        needed[torch.arange(needed.shape[0]), self.unread.argmax(dim=1)] = True
        weights = self.unread
        while True:
            needed &= ~self.scanned[:, None]
            if not bool(needed.any()):
                break
            # The rows the queries still need, at the current thresholds (which only rise):
            # past the pool, a scan is certain, and every query still needing goes to it.
            union = needed.any(dim=0)
            if self.read + float(sizes[union].sum()) > pool:
                giving_up = needed.any(dim=1)
                if seed_rows > 0:
                    self._seed(giving_up, needed, weights, seed_rows)
                self.scanned |= giving_up
                break
            # This round: each query's round_size best needed clusters, joined.
            take = min(self.round_size, int(needed.sum(dim=1).max()))
            ranked = torch.where(needed, weights, -math.inf).topk(take, dim=1)
            chosen = torch.zeros_like(union)
            chosen[ranked.indices[torch.isfinite(ranked.values)]] = True
            step = chosen.nonzero()[:, 0]
            self.state.take(self.bank, step)
            self.taken.append(step)
            self.unread[:, step] = -math.inf
            self.read += float(sizes[step].sum())
            self.round_size = 2 * self.round_size if len(self.taken) > 1 else 1
            weights, needed = self.weights_and_needs()
            if not self.sparse:  # the bound on what is left unread, as of this round
                self.mass = torch.logsumexp(weights, dim=1).exp().clamp(max=1.0)

    def _seed(self, queries: Tensor, needed: Tensor, weights: Tensor, rows: float) -> None:
        """Reads, for each of ``queries`` (a mask), its best needed clusters, up to ``rows`` rows
        for them all (an equal share, at least one cluster each, at most SEED_CLUSTERS)."""
        sizes = self.bank.size_table
        count = int(queries.sum())
        average = float(sizes.sum()) / max(1, int((sizes > 0).sum()))
        each = int(min(SEED_CLUSTERS, needed.shape[1], max(1.0, rows / (count * average))))
        ranked = torch.where(needed[queries], weights[queries], -math.inf).topk(each, dim=1)
        chosen = torch.zeros(needed.shape[1], dtype=torch.bool)
        chosen[ranked.indices[torch.isfinite(ranked.values)]] = True
        step = chosen.nonzero()[:, 0]
        if step.numel():
            self.state.take(self.bank, step)
            self.taken.append(step)
            self.unread[:, step] = -math.inf
            self.read += float(sizes[step].sum())

    def cut(self, which: Tensor, memories: int) -> Tensor:
        """Per query of ``which``, the score at or below which an unread row cannot matter, by
        what the visit read (float64, CPU; l2 shifted by ``||x||^2``, as the bounds are): sparse,
        the threshold of the rows read; softmax, the best score less ``log(M / eps) / beta``
        (every row below weighs at most ``eps / M`` of the best)."""
        if not self.taken:  # nothing read: no row bounds anything yet
            return torch.full((which.numel(),), -math.inf, dtype=torch.float64)
        if self.sparse:
            return self.state.floor(self.beta, self.alpha)[which]
        best = self.state.state.best.double().cpu()[which]
        if self.state.similarity == "l2":
            best = best + (self.rows[which].double() ** 2).sum(dim=1).cpu()
        return best - self.cut_gap(memories)

    def cut_gap(self, memories: int) -> float:
        """How far below the best score the cut of :meth:`cut` may lie at most: sparse, below
        the best score by ``1 / ((alpha - 1) beta)`` (tau >= -1); softmax ``log(M / eps) /
        beta``."""
        if self.sparse:
            return 1.0 / ((self.alpha - 1.0) * self.beta)
        return (math.log(memories) - self.log_eps) / self.beta

    def fresh_state(self, rows: Tensor):
        """An empty state like the visit's, for ``rows``."""
        state = self.state
        if self.sparse:
            return _SparseVisit(rows, state.similarity, state.candidates)
        return _DenseVisit(rows, state.impl, self.beta, state.similarity, state.separation,
                           self.degree, self.bank.value_dim)  # fmt: skip

    def result(self, which: Tensor, want_info: bool):
        """``(out, support, argmax, lse, fraction_read, mass_bound)`` of queries ``which``."""
        rows, bank = self.rows, self.bank
        source = PrefixSource(bank, bank.ranges(torch.cat(self.taken)), rows.device)
        out, support, argmax, lse = self.state.finish(which, source, self.beta, self.alpha,
                                                      want_info)  # fmt: skip
        fraction = rows.new_full((which.numel(),), self.read / bank.keys.shape[0])
        return out, support, argmax, lse, fraction, self.mass[which.cpu()].to(rows.dtype)


def _needed_for_eps(log_mass: Tensor, log_eps: float) -> Tensor:
    """Per query (row), the fewest clusters, largest bound on weight first, whose reading leaves
    at most ``exp(log_eps)`` of weight unread: a mask. Only clusters above ``eps / C`` are
    ranked (a top-k as wide as the most any query has): those below sum to at most ``eps``
    together and come last in any case."""
    queries, clusters = log_mass.shape
    big = log_mass > log_eps - math.log(clusters)
    width = int(big.sum(dim=1).max())
    needed = torch.zeros_like(big)
    if width == 0:
        return needed
    small_total = torch.logsumexp(torch.where(big, -math.inf, log_mass), dim=1, keepdim=True)
    ordered, order = torch.where(big, log_mass, -math.inf).topk(width, dim=1, sorted=True)
    # tail[:, i]: the weight of ranked clusters i, i+1, ... and every small one; it falls along
    # the order, so the clusters to read are those before it drops to eps
    tail = torch.logaddexp(torch.logcumsumexp(ordered.flip(1), dim=1).flip(1), small_total)
    keep = (tail > log_eps) & torch.isfinite(ordered)
    return needed.scatter_(1, order, keep)


class _SparseVisit:
    """The queries' best candidates over the clusters visited so far."""

    def __init__(self, rows, similarity, candidates):
        self.rows, self.similarity, self.candidates = rows, similarity, candidates
        self.argmax = ArgmaxState.empty(rows.shape[0], rows)
        self.kept = CandidateState.empty(rows.shape[0], rows)

    def take(self, bank, clusters):
        self.take_rows(*bank.gather(clusters, self.rows.device, with_values=False))

    def take_rows(self, index, keys, norms, values=None):
        scores = _scores(self.rows, keys, norms, self.similarity)
        best = ArgmaxState.of_scores(0, scores)
        self.argmax = self.argmax.merge(ArgmaxState(best.best, index[best.index]))
        part = CandidateState.of_scores(0, scores)
        part = CandidateState(part.scores, index[part.index])
        self.kept = self.kept.merge(part, self.candidates)

    def floor(self, beta, alpha) -> Tensor:
        """Per query, the score-space threshold of its candidates so far (float64, CPU): no
        memory at or below it has weight in the whole bank's update (after a first read)."""
        s_max, _, tau = sparse_threshold(self.kept.scores, beta, alpha)
        floor = s_max + tau / ((alpha - 1.0) * numerics.dtype_beta(beta, tau.dtype))
        return floor.cpu()

    def finish(self, which, source, beta, alpha, want_info):
        kept = self.kept
        return sparse_finish(self.rows[which], source, LOCAL, beta, self.similarity, alpha,
                             kept.scores[which], kept.index[which],
                             self.argmax.index[which])  # fmt: skip


class _DenseVisit:
    """Softmax and polynomial: the prefix's merged partial state of each query."""

    def __init__(self, rows, impl, beta, similarity, separation, degree, value_dim):
        self.rows, self.impl, self.beta = rows, impl, beta
        self.similarity, self.separation, self.degree = similarity, separation, degree
        self.scale = beta if separation == "softmax" else 0.0
        self.state = DenseState.empty(rows.shape[0], value_dim, rows)

    def take(self, bank, clusters):
        self.take_rows(*bank.gather(clusters, self.rows.device))

    def take_rows(self, index, keys, norms, values):
        part = _chunk_partial(self.rows, 0, keys, norms, values, self.impl, self.beta,
                              self.similarity, self.separation, self.degree)  # fmt: skip
        part = DenseState(part.rel, part.out, part.best, index[part.index], part.support)
        self.state = fold([self.state, part], lambda a, b: a.merge(b, self.scale))

    def log_mass(self, bounds, sizes, beta, degree) -> Tensor:
        """``(B, C)`` ``log`` of the bound on each cluster's weight relative to each query's
        visited weight (bounds of ``-inf``: nothing)."""
        state = self.state
        rel = state.rel.double().cpu()[:, None]
        if self.similarity == "l2":  # bounds shifted by ||x||^2; best is the true -||x - k||^2
            bounds = bounds - (self.rows.double() ** 2).sum(dim=1).cpu()[:, None]
        if self.separation == "softmax":
            gap = numerics.relative_scores(bounds, state.best.double().cpu(), beta)
            return sizes.log() + gap - rel
        # relu(beta * bound) ** degree, log-partition rel (scale 0)
        positive = torch.clamp(bounds * beta, min=0.0)
        return sizes.log() + degree * positive.log() - rel

    def finish(self, which, source, beta, alpha, want_info):
        state = self.state
        support = state.support[which]
        if self.separation == "softmax" and want_info:
            support = _softmax_support(self.rows[which], source, LOCAL, beta, self.similarity,
                                       state.rel[which], state.best[which])  # fmt: skip
        lse = state.lse(self.scale)[which].to(self.rows.dtype)
        return state.out[which], support, state.index[which], lse


# ------------------------------------------------------------------------------ the row sketch
# The queries the clusters leave to the scan (their bounds do not prune: real features, whose
# clusters are loose balls in tens of effective dimensions) may still skip most rows by the
# index's row sketch, a bound per row (hen_fast.sketch_filter): one read of p float16 numbers
# and one float32 per row names the rows above each query's cut, and only those are gathered
# and scored. The cut starts from what the cluster visit reached and rises inside the filter as
# it scores the rows that pass: a row's score less the gap bounds the threshold from below
# (sparse: theta >= s_max - 1 / ((alpha - 1) beta); softmax: every row more than
# log(M / eps) / beta below the best weighs at most eps / M of it). Every row left out has a
# bound at or below the final cut, so the update over the rows that passed is the whole bank's.
# The stage gathers at most SKETCH_FRACTION of the bank's rows, an equal share per query; once one
# query needs more (or passes rows at a pace that will), the filter stops and the call's queries
# go to the scan together (which reads the bank once for all of them, so one query that scans
# costs the others little). On 1e6 MiniLM token embeddings (p = 32) one noisy copy passes
# under 1% of the rows at beta 30-1000 (sparse); on the 0.9e6 image patches about half the
# queries at beta 100-1000 have 20-45% of the bank within their cut (smooth patches that differ
# in fine detail), which no bound separates (benchmarks/index_cpu.py).
SKETCH_FRACTION = 0.05
# The cut the filter starts from is only as high as the best row read: a query whose clusters do
# not prune reads its SEED_CLUSTERS best clusters (by bound) first, up to SKETCH_SEED_FRACTION
# of the bank's rows for the call's queries together. On 2e5 isotropic keys (1789 clusters) a
# noisy copy's own cluster had the best bound for 61% of the queries and was among the best 18
# for all; missing it, the filter's cut starts from the second best score (~0.4 there), every
# row passes, and the query scans.
SEED_CLUSTERS = 16
SKETCH_SEED_FRACTION = 0.01


def sketch_applies(bank: IndexedBank, similarity: str, separation: str, eps: float) -> bool:
    """Whether queries the clusters do not prune for may try the row sketch: a bank with one,
    dot or l2 (with the bank's norms), a separation whose skipped rows are certified (sparsemax
    / entmax: weight 0; softmax with eps > 0: weight within eps), and a bank in CPU memory (the
    filter runs there)."""
    if bank.index.basis is None or separation not in ("sparsemax", "entmax", "softmax"):
        return False
    if (separation == "softmax" and not eps > 0) or bank.keys.device.type != "cpu":
        return False  # eps = 0: every row with any weight, which no bound certifies
    return similarity == "dot" or (similarity == "l2" and bank.norms is not None)


def _sketch_stage(visit: _Visit, queries: Tensor, fields, want_info: bool) -> Tensor:
    """Answers what it can of ``queries`` (CPU indices the cluster visit left to the scan) from
    the rows the sketch filter passes, into ``fields``; returns the queries left to the scan."""
    queries = queries[~visit.unbounded[queries]]
    left = visit.scanned.nonzero()[:, 0]
    left = left[visit.unbounded[left]]  # a query no bound holds for: always the scan
    if not queries.numel():
        return torch.cat([left, queries])
    bank, memories = visit.bank, visit.bank.keys.shape[0]
    limit = int(SKETCH_FRACTION * memories) // queries.numel()  # rows each query may pass
    rows = visit.rows[queries]
    similarity = visit.state.similarity
    coords, rest, margin = sketch_query_terms(rows, bank.index, similarity)
    cut = _rounded_down(torch.nan_to_num(visit.cut(queries, memories), nan=-math.inf) - margin)
    # A row's score less the gap bounds the threshold from below, less the margin (the filter's
    # float32 score and the kernels' are each within it of the exact score).
    gap = (visit.cut_gap(memories) + 3 * margin).float() * (1 + 1e-6)
    x = rows.detach().float().cpu() * (2.0 if similarity == "l2" else 1.0)
    norms = bank.norms.float().cpu() if similarity == "l2" else None
    keys = bank.keys if bank.keys.dtype in (torch.bfloat16, torch.float16) else bank.keys.float()
    filtered = (x, keys.cpu(), norms, coords, rest, bank.index.sketch, bank.index.residual, cut,
                gap)  # fmt: skip
    passed, counts, cut = sketch_filter(*filtered, limit)
    if bool((counts > limit).any()) or passed.numel() > limit * queries.numel():
        return torch.cat([left, queries])  # then they all scan: a scan reads the bank once
    state = visit.fresh_state(rows)
    gathered = bank.gather_rows(passed, rows.device)
    state.take_rows(*gathered)
    source = GatheredSource(bank, *gathered)
    out, support, argmax, lse = state.finish(torch.arange(queries.numel()), source, visit.beta,
                                             visit.alpha, want_info)  # fmt: skip
    # The share of the bank's bytes read: the clusters visited, the rows gathered, the sketch
    # (and l2's norms).
    sketch_bytes = bank.index.sketch_bytes + (norms.numel() * 4 if norms is not None else 0)
    fraction = (visit.read + passed.numel()) / memories + sketch_bytes / bank.nbytes
    mass = torch.zeros(queries.numel(), dtype=torch.float64)
    if not visit.sparse:  # each row left out weighs at most what its bound, the cut, allows
        skipped = (memories - counts).double()[:, None]
        mass = state.log_mass((cut.double() + margin)[:, None], skipped, visit.beta,
                              visit.degree)[:, 0].exp().clamp(max=1.0)  # fmt: skip
    device = visit.rows.device
    where = queries.to(device)
    for field, value in zip(fields, (out, support, argmax, lse)):
        field[where] = value.to(field.dtype)
    fields[4][where] = min(fraction, 1.0)
    fields[5][where] = mass.to(device=device, dtype=fields[5].dtype)
    return left


def _rounded_down(values: Tensor) -> Tensor:
    """float64 values as float32, each at or below its value."""
    rounded = values.float()
    low = torch.nextafter(rounded, torch.tensor(-math.inf))
    return torch.where(rounded.double() > values, low, rounded)
