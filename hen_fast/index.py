"""A bank index: the memories partitioned into clusters, with a certified bound on each cluster's
best score for any query.

The bank is reordered so that every cluster is a contiguous range of rows (``offsets``). Per
cluster the index keeps its centre ``c`` (the mean of its keys, float64), its radius in L2 and in
L1 (the largest ``||k - c||`` of its keys) and its keys' largest norms. For a query ``x`` these
bound every score in the cluster from above:

* dot: ``x.k <= x.c + ||x|| r`` (Cauchy-Schwarz);
* l2: ``-||x - k||^2 <= -(max(0, ||x - c|| - r))^2`` (triangle inequality);
* manhattan: ``-||x - k||_1 <= -max(0, ||x - c||_1 - r_1)`` (triangle inequality in L1).

The bounds (:func:`score_bounds`) are for the scores as the kernels compute them: l2 shifted by
``||x||^2`` as everywhere in hen_fast, and widened by the worst rounding of a float32 (or float64)
score, so that a skipped memory's computed score lies below the bound too. :mod:`hen_fast.indexed`
visits clusters in the order of their bounds and stops when the rest cannot matter.

The partition comes from k-means (:func:`kmeans_labels`); the bounds are computed from the
partition actually used, so a poor clustering costs reads, never exactness.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# k-means: Lloyd iterations on a sample of this many points per cluster (at most SAMPLE_CAP),
# then one assignment pass over every row.
SAMPLE_PER_CLUSTER = 16
SAMPLE_CAP = 1 << 20
KMEANS_ITERS = 10
# k-means++ seeding looks at this many sample points per cluster.
SEED_PER_CLUSTER = 4
# Rows converted to float32 and assigned at a time (~64 MiB of them).
ASSIGN_BLOCK_BYTES = 64 << 20
# Scores of points against centres computed at a time (16 MiB of float32: the matrix product
# with ~1000 rows runs at its best rate; a whole (sample, centres) matrix would cost GiBs).
NEAREST_BLOCK_FLOATS = 1 << 22
# Progress bars appear (on a terminal) for k-means over at least this many rows.
PROGRESS_MIN_ROWS = 1 << 20


@dataclass(frozen=True)
class BankIndex:
    """Clusters of a bank reordered by cluster: cluster ``c`` holds rows
    ``offsets[c]:offsets[c + 1]``. float64 statistics, one row per cluster; an empty cluster has
    zero centre and radii and is never visited."""

    offsets: Tensor  # (C + 1,) int64, offsets[0] == 0, offsets[-1] == M
    centres: Tensor  # (C, d) float64
    radius: Tensor  # (C,) float64, max ||k - c||_2
    radius_l1: Tensor  # (C,) float64, max ||k - c||_1
    max_norm: Tensor  # (C,) float64, max ||k||_2 (the rounding margin of dot / l2 scores)
    max_norm_l1: Tensor  # (C,) float64, max ||k||_1 (the rounding margin of manhattan scores)
    # The row sketch (None: none): an orthonormal basis U of the keys' leading directions and,
    # per row, its coordinates U^T k and the norm of the rest, which bound each row's dot score.
    basis: Tensor | None = None  # (d, p) float64, U^T U = I
    sketch: Tensor | None = None  # (p, M) float16, U^T k per row (a column each: the filter
    # streams p rows of M, which vectorise, instead of M dot products of p)
    residual: Tensor | None = None  # (M,) float32, ||k - U U^T k|| rounded up

    @property
    def num_clusters(self) -> int:
        return self.centres.shape[0]

    @property
    def sketch_dim(self) -> int:
        return 0 if self.basis is None else self.basis.shape[1]

    @property
    def sketch_bytes(self) -> int:
        """The bytes one read of the row sketch takes (0: none)."""
        parts = (self.sketch, self.residual) if self.basis is not None else ()
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def sizes(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def tensors(self) -> dict[str, Tensor]:
        """The index as named tensors (what a bank file stores)."""
        names = INDEX_FIELDS + (SKETCH_FIELDS if self.basis is not None else ())
        return {f"index_{name}": getattr(self, name) for name in names}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> BankIndex:
        names = INDEX_FIELDS + (SKETCH_FIELDS if "index_basis" in tensors else ())
        return cls(**{name: tensors[f"index_{name}"] for name in names})


INDEX_FIELDS = ("offsets", "centres", "radius", "radius_l1", "max_norm", "max_norm_l1")
SKETCH_FIELDS = ("basis", "sketch", "residual")


def default_num_clusters(num_memories: int) -> int:
    """About ``4 sqrt(M)`` clusters of ``sqrt(M) / 4`` rows. Ranking the clusters costs a query
    ``C d`` and reading one ``M d / C``, balanced at ``C ~ sqrt(M)``; smaller clusters have
    smaller radii, and the radius decides what a bound prunes: on benchmarks/index_cpu.py's
    clustered 1e6-row bank, 2 sqrt(M) clusters read 4.6% of it per query, 4 sqrt(M) 0.05%. The
    build costs ``2 M C d`` flops per k-means pass (the whole build: ~21 s for 1e6 rows of 128
    on two cores)."""
    return max(1, min(num_memories, round(4 * math.sqrt(num_memories))))


def kmeans_labels(keys: Tensor, num_clusters: int, *, iters: int = KMEANS_ITERS, seed: int = 0,
                  progress: bool | None = None) -> Tensor:  # fmt: skip
    """A cluster label in ``[0, num_clusters)`` per row: Lloyd's k-means from k-means++ seeds on
    a seeded sample of the bank, then every row to its nearest centre. float32 throughout: the
    result only has to be a good partition, the bounds hold for any."""
    generator = torch.Generator().manual_seed(seed)
    show = progress or (progress is None and keys.shape[0] >= PROGRESS_MIN_ROWS)
    return _assign(keys, _lloyd(keys, num_clusters, iters, generator, show), show)


def _lloyd(keys: Tensor, num_clusters: int, iters: int, generator, show: bool) -> Tensor:
    """k-means centres (float32) on a sample of ``keys``."""
    rows = keys.shape[0]
    sample_size = min(rows, max(num_clusters, min(SAMPLE_CAP, SAMPLE_PER_CLUSTER * num_clusters)))
    pick = torch.randperm(rows, generator=generator)[:sample_size]
    sample = keys[pick.to(keys.device)].float()
    centres = _seeded_centres(sample, num_clusters, generator)
    rounds = range(iters)
    if show:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="k-means", leave=False, disable=None)
    for _ in rounds:
        labels = _nearest(sample, centres)
        sums = torch.zeros_like(centres).index_add_(0, labels, sample)
        counts = torch.bincount(labels, minlength=num_clusters).to(sample.dtype)
        filled = counts > 0
        # An emptied centre keeps its place (it may catch rows in the final assignment).
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def _seeded_centres(sample: Tensor, num_clusters: int, generator) -> Tensor:
    """k-means++ seeding on (at most) SEED_PER_CLUSTER points per cluster: each next centre is
    drawn with probability proportional to the squared distance to the nearest chosen one, so
    that separate groups of the data get separate centres (uniform picks merge groups, and a
    merged group's radius prunes nothing)."""
    points = sample[: min(sample.shape[0], SEED_PER_CLUSTER * num_clusters)]  # sample: random order
    chosen = torch.zeros(num_clusters, dtype=torch.long)
    norms = (points * points).sum(dim=1)
    nearest = _distances_to(points, norms, 0)
    nearest[0] = 0.0
    draws = torch.rand(num_clusters, generator=generator, dtype=torch.float64)
    for slot in range(1, num_clusters):
        cumulative = nearest.double().cumsum(0)
        if float(cumulative[-1]) <= 0.0:  # every point duplicates a chosen centre
            cumulative = torch.arange(1, points.shape[0] + 1, dtype=torch.float64)
        # right: the pick's own weight is positive (a chosen point is never drawn again)
        pick = int(torch.searchsorted(cumulative, draws[slot] * cumulative[-1], right=True)
                   .clamp(max=points.shape[0] - 1))  # fmt: skip
        chosen[slot] = pick
        nearest = torch.minimum(nearest, _distances_to(points, norms, pick))
        nearest[pick] = 0.0  # its distance to itself, which rounding leaves a little above 0
    return points[chosen.to(points.device)].clone()


def _distances_to(points: Tensor, norms: Tensor, which: int) -> Tensor:
    """Squared distances of every point to point ``which`` (one matrix-vector product)."""
    point = points[which]
    return (norms + norms[which] - 2.0 * (points @ point)).clamp(min=0.0)


def _nearest(points: Tensor, centres: Tensor) -> Tensor:
    """The nearest centre of each point: argmin ||p - c||^2 = argmax 2 p.c - ||c||^2, in
    blocks of points."""
    bias = (centres * centres).sum(dim=1).neg()
    block = max(1, NEAREST_BLOCK_FLOATS // max(1, centres.shape[0]))
    labels = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    for start in range(0, points.shape[0], block):
        part = points[start : start + block]
        labels[start : start + block] = torch.addmm(bias, part, centres.T, alpha=2.0).argmax(1)
    return labels


def _assign(keys: Tensor, centres: Tensor, show: bool) -> Tensor:
    rows = keys.shape[0]
    block = max(1, ASSIGN_BLOCK_BYTES // (4 * keys.shape[1]))
    starts = range(0, rows, block)
    if show:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="assigning clusters", leave=False, disable=None)
    labels = torch.empty(rows, dtype=torch.long, device=keys.device)
    centres = centres.to(keys.device)
    for start in starts:
        labels[start : start + block] = _nearest(keys[start : start + block].float(), centres)
    return labels


def cluster_order(labels: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """``(perm, offsets)``: the rows sorted by cluster (stable: a cluster keeps its rows' order)
    and where each cluster starts."""
    perm = torch.sort(labels, stable=True).indices
    counts = torch.bincount(labels, minlength=num_clusters)
    offsets = torch.zeros(num_clusters + 1, dtype=torch.long, device=labels.device)
    offsets[1:] = counts.cumsum(0)
    return perm, offsets


def cluster_statistics(keys: Tensor, offsets: Tensor) -> BankIndex:
    """The index of a bank already sorted by cluster (``offsets``), computed in float64 from the
    stored keys; one read of the bank, cluster by cluster."""
    num_clusters, dim = offsets.shape[0] - 1, keys.shape[1]
    centres = torch.zeros(num_clusters, dim, dtype=torch.float64)
    stats = torch.zeros(4, num_clusters, dtype=torch.float64)
    bounds = offsets.tolist()
    for cluster in range(num_clusters):
        begin, end = bounds[cluster], bounds[cluster + 1]
        if end == begin:
            continue
        members = keys[begin:end].double().cpu()
        centre = members.mean(dim=0)
        centres[cluster] = centre
        stats[:, cluster] = _member_maxima(members, centre)
    return BankIndex(offsets.cpu(), centres, *stats)


def _member_maxima(members: Tensor, centre: Tensor) -> Tensor:
    """Largest ``||k - c||_2``, ``||k - c||_1``, ``||k||_2``, ``||k||_1`` over a cluster's rows,
    widened by float64's rounding of those sums (relative 1e-12: d terms of 2^-53 each)."""
    gap = members - centre
    maxima = torch.stack([
        torch.linalg.vector_norm(gap, dim=1).max(), gap.abs().sum(dim=1).max(),
        torch.linalg.vector_norm(members, dim=1).max(), members.abs().sum(dim=1).max(),
    ])  # fmt: skip
    return maxima * (1 + 1e-12)


def score_bounds(rows: Tensor, index: BankIndex, similarity: str) -> Tensor:
    """``(B, C)`` float64 upper bounds on every computed score of each cluster (l2: shifted by
    ``||x||^2``); ``-inf`` for empty clusters."""
    x = rows.detach().double().cpu()
    centres = index.centres
    unit = torch.finfo(torch.float64 if rows.dtype == torch.float64 else torch.float32).eps / 2
    # A computed d-term score is within ~d units of roundoff of the sum of |terms|; 4 (d + 2)
    # covers blocked and fused summation orders and the l2 norms' own rounding.
    rounding = 4 * (x.shape[1] + 2) * unit
    if similarity == "manhattan":
        x_l1 = x.abs().sum(dim=1, keepdim=True)
        gap = torch.cdist(x, centres, p=1.0)
        bound = -torch.clamp(gap - index.radius_l1, min=0.0)
        bound = bound + rounding * (x_l1 + index.max_norm_l1)
    else:
        x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        if similarity == "dot":
            bound = x @ centres.T + x_norm * index.radius
            margin = x_norm * index.max_norm
        else:  # l2, shifted: ||x||^2 - (max(0, ||x - c|| - r))^2
            gap = torch.cdist(x, centres, p=2.0)
            bound = x_norm**2 - torch.clamp(gap - index.radius, min=0.0) ** 2
            margin = 2 * x_norm * index.max_norm + index.max_norm**2 + x_norm**2
        bound = bound + rounding * margin
    return torch.where(index.sizes > 0, bound, -math.inf)


def verified_index(index: BankIndex, keys: Tensor) -> tuple[BankIndex | None, str | None]:
    """``(index, None)`` when ``index`` is a valid index of the sorted bank ``keys``, else
    ``(None, why)``. Its offsets must partition the rows and its statistics must be those of the
    keys; they are recomputed here (one read of the bank) and the recomputed ones are returned,
    so a stored radius that is too small (which would skip memories that matter) is never used."""
    offsets = index.offsets
    rows, dim = keys.shape
    clusters = offsets.shape[0] - 1
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or clusters < 1:
        return None, "index offsets must be a 1-D int64 tensor of at least 2 entries"
    if int(offsets[0]) != 0 or int(offsets[-1]) != rows or bool((offsets[1:] < offsets[:-1]).any()):
        return None, f"index offsets must rise from 0 to the {rows} rows"
    shapes = {"centres": (clusters, dim), "radius": (clusters,), "radius_l1": (clusters,),
              "max_norm": (clusters,), "max_norm_l1": (clusters,)}  # fmt: skip
    for name, shape in shapes.items():
        tensor = getattr(index, name)
        if tensor.dtype != torch.float64 or tuple(tensor.shape) != shape:
            return None, f"index {name} must be float64 of shape {shape}"
    fresh = cluster_statistics(keys, offsets)
    for name in shapes:
        stored, computed = getattr(index, name), getattr(fresh, name)
        close = torch.isclose(stored, computed, rtol=1e-9, atol=1e-12, equal_nan=True)
        if not bool(close.all()):
            entry = (~close).nonzero()[0].tolist()
            return None, f"index {name} does not match the keys (entry {entry})"
    if index.basis is None:
        return fresh, None
    with_sketch = dataclasses.replace(fresh, basis=index.basis, sketch=index.sketch,
                                      residual=index.residual)  # fmt: skip
    return verified_sketch(with_sketch, keys)


# ------------------------------------------------------------------------------------ row sketch
# Cluster bounds prune little on real features (image patches, text embeddings): a ball around
# a k-means centre in tens of effective dimensions is loose. A bound per row is tighter: with an
# orthonormal U (d x p),
#     x.k = (U^T x).(U^T k) + x_perp.k_perp <= (U^T x).(U^T k) + ||x_perp|| ||k_perp||
# (x_perp = x - U U^T x), read from p + 1 numbers per row instead of d
# (hen_fast.sketch_filter). It needs a query well above the rest of the bank, not keys in few
# directions: a noisy copy of a stored unit key scores ~0.96 on it and at most ~0.4 on the
# other 2e5 isotropic keys of d = 128, whose bounds with p = 16 (13% of their energy) are
# ~0.87 +- 0.03, so ~1% of the rows pass at beta 100 (sparsemax). "auto" sizes the sketch by
# bytes: the largest p of SKETCH_DIMS whose 2p + 4 bytes a row are at most SKETCH_BYTES_SHARE
# of a key's. Where the bound cannot separate (smooth image patches: many rows within 0.01 of
# the best), the filter gives up early (hen_fast.indexed).
SKETCH_DIMS = (8, 16, 32, 64)
SKETCH_BYTES_SHARE = 0.08
# Rows of the sample the basis is computed from (their second moment, float64).
SKETCH_SAMPLE = 1 << 16


def auto_sketch_dim(dim: int, key_bytes: int) -> int:
    """``p`` for ``sketch_dim="auto"``: the largest of SKETCH_DIMS whose row of the sketch (p
    float16 numbers and a float32) takes at most SKETCH_BYTES_SHARE of a key's ``dim *
    key_bytes`` bytes; 0 where none does (keys too short for a sketch to spare reads)."""
    fits = [p for p in SKETCH_DIMS if 2 * p + 4 <= SKETCH_BYTES_SHARE * dim * key_bytes]
    return fits[-1] if fits else 0


def sketch_basis(keys: Tensor, sketch_dim: int | str, seed: int = 0) -> Tensor | None:
    """The ``(d, p)`` float64 orthonormal basis of the keys' leading directions (eigenvectors of
    the uncentred second moment of a seeded sample), or None: ``sketch_dim`` 0, or ``"auto"``
    where no ``p`` fits (:func:`auto_sketch_dim`)."""
    rows, dim = keys.shape
    if sketch_dim == "auto":
        sketch_dim = auto_sketch_dim(dim, keys.element_size())
    if sketch_dim == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(rows, generator=generator)[: min(rows, SKETCH_SAMPLE)]
    sample = keys[pick.to(keys.device)].double().cpu()
    vectors = torch.linalg.eigh(sample.T @ sample).eigenvectors.flip(1)  # descending energy
    # eigh's vectors are orthonormal to float64 rounding; one QR makes it so for the bound.
    return torch.linalg.qr(vectors[:, :sketch_dim]).Q.contiguous()


def row_sketch(keys: Tensor, basis: Tensor, progress: bool | None = False) -> tuple[Tensor, Tensor]:
    """``(U^T k as float16, ||k - U U^T k|| as float32 rounded up)`` per row (the first ``(p, M)``,
    a column per row; the second ``(M,)``), from float64, in blocks of rows. The rest's norm is
    taken of the difference itself, not as ``sqrt(||k||^2 - ||U^T k||^2)``, which cancels where
    the sketch holds nearly all of ``k``."""
    rows, dim = keys.shape
    sketch = torch.empty(basis.shape[1], rows, dtype=torch.float16)
    residual = torch.empty(rows, dtype=torch.float32)
    block = max(1, ASSIGN_BLOCK_BYTES // (8 * dim))
    starts = range(0, rows, block)
    if progress or (progress is None and rows >= PROGRESS_MIN_ROWS):
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="row sketch", leave=False, disable=None)
    for start in starts:
        part = keys[start : start + block].double().cpu()
        coords = part @ basis
        rest = torch.linalg.vector_norm(part - coords @ basis.T, dim=1) * (1 + 1e-12)
        rounded = rest.float()
        residual[start : start + block] = torch.where(
            rounded.double() < rest, torch.nextafter(rounded, torch.tensor(math.inf)), rounded
        )
        sketch[:, start : start + block] = coords.T.half()
    return sketch, residual


def sketch_query_terms(rows: Tensor, index: BankIndex, similarity: str):
    """What the sketch filter (:mod:`hen_fast.sketch_filter`) holds each row's bound to, per
    query: ``(coords, rest, margin)``, float32 ``(B, p)``, float32 ``(B,)``, float64 ``(B,)``,
    such that the score the kernels compute for query ``b`` and row ``i`` is at most
    ``coords[b] . sketch[:, i] + rest[b] * residual[i] (- norms[i] for l2) + margin[b]`` (dot;
    l2 shifted by ``||x||^2``, as the kernels score it: the coordinates and the rest doubled).

    ``margin`` covers float32 products of ``p + 1`` terms on float32-rounded inputs and the
    kernel's own rounding of the exact score, within ``(d + p + 8)`` units of ``||x|| max ||k||``
    (l2: of the score's terms), taken 4 times over, and the sketch's own rounding to float16:
    ``|coords . (s - fl16(s))| <= ||coords|| (2^-11 ||s|| + sqrt(p) 2^-25)`` (relative rounding
    of normal numbers, absolute of subnormal ones), ``||s|| <= max ||k||``."""
    x = rows.detach().double().cpu()
    basis = index.basis
    coords = x @ basis
    rest = torch.linalg.vector_norm(x - coords @ basis.T, dim=1) * (1 + 1e-6)
    x_norm = torch.linalg.vector_norm(x, dim=1)
    # float32 units whatever the bank's dtype: the filter computes its bounds and scores in
    # float32 (a float64 bank's own scores round less)
    unit = 2.0**-24
    rounding = 4 * (x.shape[1] + basis.shape[1] + 8) * unit
    max_norm = float(index.max_norm.max()) if index.max_norm.numel() else 0.0
    p = basis.shape[1]
    quantised = torch.linalg.vector_norm(coords, dim=1) * (2.0**-11 * max_norm + p**0.5 * 2.0**-25)
    if similarity == "dot":
        margin = rounding * x_norm * max_norm + quantised * (1 + 1e-6)
    else:
        margin = 2 * rounding * (2 * x_norm * max_norm + max_norm**2 + x_norm**2)
        margin = margin + 2 * quantised * (1 + 1e-6)
        coords, rest = 2.0 * coords, 2.0 * rest
    # float32 rounding of the terms themselves: the rest rounded up, the coordinates' rounding
    # (relative 2^-24 of each product) inside the margin above
    rest32 = rest.float()
    rest32 = torch.where(rest32.double() < rest, torch.nextafter(rest32, torch.tensor(math.inf)),
                         rest32)  # fmt: skip
    return coords.float(), rest32, margin


def verified_sketch(index: BankIndex, keys: Tensor) -> tuple[BankIndex | None, str | None]:
    """The index with its sketch recomputed from the keys and its basis, or ``(None, why)``: the
    basis must be orthonormal, and the stored sketch must be the keys'."""
    basis, rows, dim = index.basis, *keys.shape
    if basis.dtype != torch.float64 or basis.dim() != 2 or basis.shape[0] != dim:
        return None, f"index basis must be float64 of shape ({dim}, p)"
    p = basis.shape[1]
    if not 1 <= p <= dim:
        return None, f"index basis must have 1 to {dim} columns"
    gram = basis.T @ basis - torch.eye(p, dtype=torch.float64)
    if float(gram.abs().max()) > 1e-12:
        return None, "index basis is not orthonormal"
    for name, shape, dtype in (("sketch", (p, rows), torch.float16),
                               ("residual", (rows,), torch.float32)):  # fmt: skip
        tensor = getattr(index, name)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            return None, f"index {name} must be {dtype} of shape {shape}"
    sketch, residual = row_sketch(keys, basis)
    for name, fresh in (("sketch", sketch), ("residual", residual)):
        if not torch.equal(getattr(index, name), fresh):
            return None, f"index {name} does not match the keys"
    return dataclasses.replace(index, sketch=sketch, residual=residual), None
