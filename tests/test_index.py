"""A bank index (MemoryBank.build_index) and retrieval over it (hen_fast.indexed): the result of
the full scan under the accuracy rule (sparsemax / entmax: the same support), on data where the
bounds prune and on the adversarial cases where they cannot; the index's life (build, save,
load, verify, changes) and the eps contract."""

from __future__ import annotations

import math

import pytest
import torch

import hen_fast
from hen_fast import BankIntegrityError, MemoryBank, indexed, oracle
from hen_fast.index import BankIndex, cluster_statistics, kmeans_labels, score_bounds

from helpers import rel_err, tolerance, value_scale

pytestmark = pytest.mark.usefixtures("poisoned_buffers", "small_banks_indexed")
# The shipped rule, before the fixture below changes it for these tiny banks (README: 56 MiB a
# call and 12 MiB a query).
SHIPPED_OVERHEAD_BYTES = (indexed.CALL_OVERHEAD_BYTES, indexed.QUERY_OVERHEAD_BYTES)


@pytest.fixture
def small_banks_indexed(monkeypatch):
    """These banks are tiny: by default they would go to the scan, whose time a visit's fixed
    cost would exceed (test_small_banks_are_scanned), and their clusters are a twelfth of the
    bank each: the queries of a call share a quarter of it here."""
    monkeypatch.setattr(indexed, "CALL_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(indexed, "QUERY_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(indexed, "FALLBACK_FRACTION", 0.25)

BACKENDS = [name for name in ("torch", "cpu") if name in hen_fast.available_backends()]
# (similarity, separation, alpha): every combination over an index.
CASES = [
    (similarity, separation, alpha)
    for similarity in ("dot", "l2", "manhattan")
    for separation, alpha in (("softmax", 1.5), ("sparsemax", 1.5), ("entmax", 1.5),
                              ("entmax", 1.3), ("polynomial", 1.5))  # fmt: skip
    if separation != "polynomial" or similarity == "dot"
]
# Beta in the Hopfield regime of clustered_bank's data: the query's own group decides the
# result and the bounds of the other groups rule them out.
BETA = {"dot": 4.0, "l2": 1.0, "manhattan": 2.0}


def case_id(case) -> str:
    similarity, separation, alpha = case
    return f"{similarity}-{separation}" + (f"{alpha}" if separation == "entmax" else "")


def clustered_bank(gen, groups=12, per_group=41, dim=16, noise=0.1, values_dim=None, count=2):
    """Memories in ``groups`` well-separated groups (orthogonal centres of norm 4) and ``count``
    queries that are noisy copies of stored memories (few: the queries of a call share a quarter
    of the bank's rows here before they go to the scan)."""
    centres = 4.0 * torch.linalg.qr(torch.randn(dim, groups, generator=gen))[0].T
    labels = torch.arange(groups).repeat_interleave(per_group)
    keys = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=gen)
    values = None
    if values_dim is not None:
        values = torch.randn(keys.shape[0], values_dim, generator=gen)
    bank = MemoryBank(keys, values)
    # the groups themselves as clusters (k-means may split one and merge two: test_kmeans_*)
    bank.build_index(groups, labels=labels)
    picks = torch.randint(0, keys.shape[0], (count,), generator=gen)
    queries = bank.keys[picks] + 0.05 * noise * torch.randn(count, dim, generator=gen)
    return bank, queries


def scan(queries, bank, **kwargs):
    """The same call over the bank's tensors: no index, the full scan."""
    values = None if bank.auto_associative else bank.values
    return hen_fast.retrieve(queries, bank.keys, values, **kwargs)


def assert_as_scan(queries, bank, backend="torch", **kwargs):
    """The indexed call agrees with the float64 oracle under the accuracy rule and with the full
    scan on support and argmax; returns its info."""
    kwargs.setdefault("return_info", True)
    out, info = hen_fast.retrieve(queries, bank, backend=backend, **kwargs)
    full, full_info = scan(queries, bank, backend=backend, **kwargs)
    oracle_kwargs = {k: v for k, v in kwargs.items() if k not in ("return_info", "eps")}
    values = None if bank.auto_associative else bank.values
    expected = oracle.naive_retrieve(queries, bank.keys, values, **oracle_kwargs)
    scale = value_scale(bank.values)
    # The accuracy rule: the table's tolerance, or twice the scan's own float32 error where
    # the inputs make that larger (queries far away, huge norms). The scan's rounding depends
    # on the rows it scores together (the matmul's blocking), and the queries that fall back
    # are scanned without the others: its error on those rows alone counts too.
    scan_error = rel_err(full, expected, scale=scale)
    scanned = (info.fraction_read == 1).nonzero()[:, 0]
    if scan_error > 0 and 0 < scanned.numel() < queries.shape[0]:
        part = {**kwargs, "return_info": False}
        mask = kwargs.get("clamp_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[0] > 1:
            part["clamp_mask"] = mask[scanned]
        alone = scan(queries[scanned], bank, backend=backend, **part)
        scan_error = max(scan_error, rel_err(alone, expected[scanned], scale=scale))
    allowed = max(tolerance(torch.float32, backend, kwargs.get("steps", 1)), 2 * scan_error)
    assert rel_err(out, expected, scale=scale) <= allowed
    assert torch.equal(info.argmax, full_info.argmax)
    assert torch.equal(info.steps, full_info.steps)
    if kwargs.get("separation") != "polynomial":  # polynomial counts the memories read
        assert torch.equal(info.support, full_info.support)
    assert torch.isfinite(info.lse).all() and torch.isfinite(out).all()
    assert bool(((info.fraction_read > 0) & (info.fraction_read <= 1)).all())
    return info


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_indexed_is_the_scan_and_reads_a_fraction(gen, case, backend):
    similarity, separation, alpha = case
    bank, queries = clustered_bank(gen)
    kwargs = dict(beta=BETA[similarity], similarity=similarity, separation=separation,
                  alpha=alpha)  # fmt: skip
    if separation == "polynomial":
        kwargs["degree"] = 20  # the other groups' relu(beta bound)^degree is then negligible
    info = assert_as_scan(queries, bank, backend, **kwargs)
    # Every query needs its own group, one cluster of twelve; the call reads their union.
    assert float(info.fraction_read.max()) <= 1.01 * queries.shape[0] / 12
    expected_mass = info.mass_bound if separation in ("softmax", "polynomial") else 0
    assert bool((info.mass_bound <= 2.0**-24).all()) and bool((info.mass_bound >= 0).all())
    assert torch.equal(info.mass_bound, torch.zeros_like(info.mass_bound) + expected_mass)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hetero_association_multi_step_and_masks(gen, case):
    similarity, separation, alpha = case
    bank, queries = clustered_bank(gen, values_dim=7)
    kwargs = dict(beta=BETA[similarity], similarity=similarity, separation=separation,
                  alpha=alpha, degree=20)  # fmt: skip
    assert_as_scan(queries, bank, **kwargs)
    auto, queries = clustered_bank(gen)
    mask = torch.zeros_like(queries, dtype=torch.bool)
    mask[:, :3] = True
    assert_as_scan(queries, auto, steps=3, tol=1e-6, clamp_mask=mask, **kwargs)


def test_softmax_eps_bounds_the_output_error(gen):
    """A looser eps reads less; the skipped weight is at most mass_bound <= eps, and the output
    moves by at most 2 mass_bound max ||v|| from the full scan."""
    bank, queries = clustered_bank(gen, noise=0.3)
    fractions = []
    for eps in (0.0, 1e-12, 1e-4, 0.2):
        out, info = hen_fast.retrieve(queries, bank, beta=1.0, eps=eps, return_info=True)
        full = oracle.naive_retrieve(queries, bank.keys, beta=1.0)
        largest = float(bank.values.double().norm(dim=1).max())
        allowed = 2 * info.mass_bound.double() * largest + 1e-5 * value_scale(bank.values)
        assert bool(((out.double() - full).norm(dim=1) <= allowed).all())
        assert bool((info.mass_bound <= eps).all())
        fractions.append(float(info.fraction_read.sum()))
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[-1] < fractions[0]


# ----------------------------------------------------------------------------- adversarial
def test_ties_at_the_threshold(gen):
    """Scores exactly at the sparsemax threshold (small integers, exact in float32): weight 0
    on both paths, in clusters whose bound equals the threshold."""
    dim = 4
    top = torch.tensor([[2.0, 0, 0, 0]])
    at_tau = torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 1, 0], [1.0, 0, 0, 1], [1.0, -1, 0, 0]])
    below = torch.tensor([[0.0, 2, 0, 0], [0.0, 0, 2, 0], [-1.0, 0, 0, 2]])
    keys = torch.cat([at_tau, below, top, at_tau, below])
    labels = torch.tensor([1, 1, 2, 3, 0, 0, 3, 4, 5, 5, 6, 6, 0, 0, 0])
    bank = MemoryBank(keys)
    bank.build_index(labels=labels)
    query = torch.tensor([[1.0, 0, 0, 0]])
    for separation in ("sparsemax", "entmax"):
        assert_as_scan(query, bank, beta=1.0, separation=separation)
    out = hen_fast.retrieve(query, bank, beta=1.0, separation="sparsemax")
    assert torch.equal(out, top)  # z = 2 alone: tau = 1, and the eight ties at 1 weigh 0
    assert dim == bank.keys.shape[1]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_cluster_and_one_per_memory(gen, case):
    similarity, separation, alpha = case
    kwargs = dict(beta=BETA[similarity], similarity=similarity, separation=separation,
                  alpha=alpha, degree=20)  # fmt: skip
    bank, queries = clustered_bank(gen, groups=3, per_group=13)
    bank.build_index(1)
    info = assert_as_scan(queries, bank, **kwargs)
    assert bool((info.fraction_read == 1).all())
    bank.build_index(len(bank))
    assert bank.index.num_clusters == len(bank)
    assert bool((bank.index.radius <= 1e-9).all())
    assert_as_scan(queries, bank, **kwargs)


def test_empty_clusters_are_never_read(gen, monkeypatch):
    monkeypatch.setattr(indexed, "FALLBACK_FRACTION", 0.6)  # both queries may read a cluster
    bank, queries = clustered_bank(gen, groups=4, per_group=9)
    labels = torch.arange(4).repeat_interleave(9) * 3  # clusters 1, 2, 4, 5, ... stay empty
    bank.build_index(12, labels=labels)
    assert bank.index.sizes.tolist() == [9, 0, 0] * 4
    bounds = score_bounds(queries, bank.index, "dot")
    assert bool(torch.isneginf(bounds[:, bank.index.sizes == 0]).all())
    for separation in ("softmax", "sparsemax", "entmax"):
        info = assert_as_scan(queries, bank, beta=4.0, separation=separation)
        assert float(info.fraction_read.max()) <= 0.5 + 1e-7  # the two queries' clusters


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_queries_far_from_every_memory(gen, case):
    similarity, separation, alpha = case
    bank, _ = clustered_bank(gen)
    far = 1e3 * torch.randn(4, 16, generator=gen)
    assert_as_scan(far, bank, beta=BETA[similarity], similarity=similarity,
                   separation=separation, alpha=alpha)  # fmt: skip


def test_duplicated_memories_keep_the_scan_argmax(gen):
    """Every memory twice, in different clusters: ties everywhere, the argmax is the scan's
    (smallest index) and the weights split as in the scan."""
    keys = torch.randn(30, 8, generator=gen)
    bank = MemoryBank(torch.cat([keys, keys, keys[:5]]))
    bank.build_index(labels=torch.arange(65) % 7)
    queries = keys[:4] + 0.01 * torch.randn(4, 8, generator=gen)
    for similarity in ("dot", "l2", "manhattan"):
        for separation in ("softmax", "sparsemax", "entmax"):
            info = assert_as_scan(queries, bank, beta=8.0, similarity=similarity,
                                  separation=separation)  # fmt: skip
            assert bool((info.support >= 2).all())  # both copies


def test_many_queries_share_one_scan(gen):
    """The queries of a call visit together and read the union of what they need, within
    FALLBACK_FRACTION of the bank (a quarter here: three clusters); once what they still need
    does not fit, those still needing go to the scan together and the others keep their
    answers, in whatever order the queries come."""
    bank, queries = clustered_bank(gen, count=12)  # a cluster each: 12 > the pool's 3
    for separation in ("softmax", "sparsemax"):
        info = assert_as_scan(queries, bank, beta=4.0, separation=separation)
        assert bool((info.fraction_read == 1).all())
    # at the origin every memory scores 0 (dot): the whole bank is in the support
    origin = torch.zeros(1, 16)
    for pair in (torch.cat([queries[:1], origin]), torch.cat([origin, queries[:1]])):
        info = assert_as_scan(pair, bank, beta=4.0, separation="sparsemax")
        near, far = (0, 1) if pair[1].abs().sum() == 0 else (1, 0)
        # the first round: the query's own cluster and the origin's first, then the scan
        assert float(info.fraction_read[far]) == 1.0
        assert float(info.fraction_read[near]) <= 2 / 12 + 1e-7
    # between two groups: both clusters' bounds pass the threshold; with the other query's
    # cluster at most three, within the pool
    index = bank.index
    between = 0.5 * (index.centres[0] + index.centres[1]).float()[None]
    info = assert_as_scan(torch.cat([between, queries[:1]]), bank, beta=4.0,
                          separation="sparsemax")  # fmt: skip
    assert float(info.fraction_read.max()) <= 3 / 12 + 1e-7
    assert info.fraction_read[0] == info.fraction_read[1]  # both scored every row read
    # with a third query that needs the bank, the one near its group keeps its visit
    info = assert_as_scan(torch.cat([between, queries[:1], origin]), bank, beta=4.0,
                          separation="sparsemax")  # fmt: skip
    assert float(info.fraction_read[1]) <= 3 / 12 + 1e-7
    assert float(info.fraction_read[2]) == 1.0


def test_small_banks_are_scanned(gen, monkeypatch):
    """A call on a bank of fewer bytes than CALL_OVERHEAD_BYTES + QUERY_OVERHEAD_BYTES per query
    is scanned, of more indexed."""
    assert SHIPPED_OVERHEAD_BYTES == (56 << 20, 12 << 20)
    monkeypatch.setattr(indexed, "CALL_OVERHEAD_BYTES", SHIPPED_OVERHEAD_BYTES[0])
    monkeypatch.setattr(indexed, "QUERY_OVERHEAD_BYTES", SHIPPED_OVERHEAD_BYTES[1])
    bank, queries = clustered_bank(gen, count=2)
    info = assert_as_scan(queries, bank, beta=4.0, separation="sparsemax")
    assert bool((info.fraction_read == 1).all())
    size = 4 * bank.keys.numel()  # float32 keys, no values: the bank's bytes
    for call, per_query, indexed_call in ((size - 21, 10, True), (size - 19, 10, False),
                                          (0, size // 2, True), (0, size // 2 + 1, False)):
        monkeypatch.setattr(indexed, "CALL_OVERHEAD_BYTES", call)
        monkeypatch.setattr(indexed, "QUERY_OVERHEAD_BYTES", per_query)
        info = assert_as_scan(queries, bank, beta=4.0, separation="sparsemax")
        if indexed_call:
            assert float(info.fraction_read.max()) < 0.5
        else:
            assert bool((info.fraction_read == 1).all())


def test_isotropic_data_and_small_beta_fall_back_to_the_scan(gen):
    """Bounds that do not prune send the query to the scan: fraction_read is 1."""
    bank = MemoryBank(torch.randn(600, 32, generator=gen))
    bank.build_index()
    queries = bank.keys[:6] + 0.1 * torch.randn(6, 32, generator=gen)
    for separation in ("softmax", "sparsemax"):
        info = assert_as_scan(queries, bank, beta=0.05, separation=separation)
        assert bool((info.fraction_read == 1).all())


def test_extreme_beta_and_large_norms(gen):
    bank, queries = clustered_bank(gen)
    for similarity in ("dot", "l2", "manhattan"):
        for separation in ("softmax", "sparsemax", "entmax"):
            assert_as_scan(queries, bank, beta=1e30, similarity=similarity,
                           separation=separation)  # fmt: skip
    # far from the origin: l2's bounds are shifted by ||x||^2 ~ 1e8, rounding margins included
    shifted = MemoryBank(bank.keys + 1e4)
    shifted.build_index(12)
    for separation in ("softmax", "sparsemax"):
        assert_as_scan(queries + 1e4, shifted, beta=1.0, similarity="l2", separation=separation)


def test_bfloat16_and_float64_banks(gen):
    bank, queries = clustered_bank(gen)
    # the same clusters as the float32 bank's (k-means may merge two groups: test_kmeans_*)
    labels = torch.repeat_interleave(torch.arange(bank.index.num_clusters), bank.index.sizes)
    for dtype in (torch.bfloat16, torch.float64):
        other = MemoryBank(bank.keys.to(dtype))
        other.build_index(12, labels=labels)
        rows = queries.to(dtype)
        for separation in ("softmax", "sparsemax", "entmax"):
            out, info = hen_fast.retrieve(rows, other, beta=4.0, separation=separation,
                                          return_info=True)  # fmt: skip
            full, full_info = scan(rows, other, beta=4.0, separation=separation, return_info=True)
            assert out.dtype == dtype
            assert rel_err(out, full, scale=value_scale(other.values)) <= tolerance(dtype)
            assert torch.equal(info.support, full_info.support)
            assert float(info.fraction_read.max()) < 0.5


def test_a_query_with_nan_is_scanned(gen):
    bank, queries = clustered_bank(gen)
    queries[1, 3] = math.nan
    out, info = hen_fast.retrieve(queries, bank, beta=4.0, separation="sparsemax",
                                  check_finite=False, return_info=True)  # fmt: skip
    full = scan(queries, bank, beta=4.0, separation="sparsemax", check_finite=False)
    assert bool(torch.isnan(out[1]).all()) and bool(torch.isnan(full[1]).all())
    assert torch.allclose(out[0], full[0], atol=1e-5) and float(info.fraction_read[0]) < 0.5


def test_single_query_and_autograd(gen):
    bank, queries = clustered_bank(gen)
    out, info = hen_fast.retrieve(queries[0], bank, beta=4.0, return_info=True)
    assert out.shape == (16,) and info.fraction_read.shape == () and info.mass_bound.shape == ()
    assert float(info.fraction_read) < 0.5
    # with autograd the bank is scanned (and differentiable)
    rows = queries.clone().requires_grad_()
    out, info = hen_fast.retrieve(rows, bank, beta=4.0, return_info=True)
    out.sum().backward()
    assert rows.grad is not None and bool((info.fraction_read == 1).all())


def test_memory_mapped_indexed_bank(gen, tmp_path):
    bank, queries = clustered_bank(gen)
    bank.save(tmp_path / "bank.hfb")
    mapped = MemoryBank.load(tmp_path / "bank.hfb", mmap=True)
    assert mapped.mapped and mapped.index is not None
    for separation in ("softmax", "sparsemax"):
        info = assert_as_scan(queries, mapped, beta=4.0, separation=separation)
        assert float(info.fraction_read.max()) < 0.5
        out = hen_fast.retrieve(queries, mapped, beta=4.0, separation=separation, memory_cap=4096)
        assert torch.allclose(out, hen_fast.retrieve(queries, bank, beta=4.0,
                                                     separation=separation), atol=1e-5)


# ------------------------------------------------------------------------------ info fields
def test_a_scan_reports_everything_read():
    keys = torch.randn(50, 6)
    _, info = hen_fast.retrieve(keys[:3], keys, return_info=True)
    assert torch.equal(info.fraction_read, torch.ones(3))
    assert torch.equal(info.mass_bound, torch.zeros(3))
    _, info = hen_fast.retrieve(keys[:3], keys, memory_cap=1024, return_info=True)
    assert torch.equal(info.fraction_read, torch.ones(3))


# ---------------------------------------------------------------------------- index's life
def test_build_index_reorders_by_cluster_and_keeps_ids(gen):
    keys = torch.randn(40, 5, generator=gen)
    values = torch.randn(40, 3, generator=gen)
    bank = MemoryBank(keys, values, ids=torch.arange(100, 140))
    labels = torch.arange(40) % 4
    index = bank.build_index(labels=labels)
    assert index is bank.index and index.num_clusters == 4
    assert index.offsets.tolist() == [0, 10, 20, 30, 40]
    position = bank.ids - 100
    assert torch.equal(bank.keys, keys[position]) and torch.equal(bank.values, values[position])
    assert torch.equal(labels[position], torch.arange(4).repeat_interleave(10))
    centre = keys[labels == 2].double().mean(0)
    assert torch.allclose(index.centres[2], centre)
    radius = (keys[labels == 2].double() - centre).norm(dim=1).max()
    assert float(radius) <= float(index.radius[2]) <= float(radius) * (1 + 1e-9)
    assert "4 clusters" in repr(bank)


def test_kmeans_is_seeded_and_separates_groups(gen):
    bank, _ = clustered_bank(gen, groups=6, per_group=30)
    first = kmeans_labels(bank.keys, 6, seed=3)
    assert torch.equal(first, kmeans_labels(bank.keys, 6, seed=3))
    groups = torch.arange(6).repeat_interleave(30)
    truth = torch.zeros(180, dtype=torch.long)
    truth[bank.ids] = groups  # the bank is sorted by its own clustering; ids name the rows
    pairs = torch.unique(first * 6 + truth)
    assert pairs.numel() == 6  # each cluster is one group


def test_changes_drop_the_index(gen):
    bank, _ = clustered_bank(gen)
    bank.append(torch.randn(2, 16))
    assert bank.index is None
    bank.build_index(5)
    bank.remove(bank.ids[:3])
    assert bank.index is None
    bank.build_index(5)
    bank.drop_index()
    assert bank.index is None


def test_save_load_and_tampered_index(gen, tmp_path):
    bank, queries = clustered_bank(gen)
    path = bank.save(tmp_path / "bank.hfb")
    loaded = MemoryBank.load(path)
    for name in ("offsets", "centres", "radius", "radius_l1", "max_norm", "max_norm_l1"):
        assert torch.equal(getattr(loaded.index, name), getattr(bank.index, name))
    assert torch.equal(hen_fast.retrieve(queries, loaded, beta=4.0),
                       hen_fast.retrieve(queries, bank, beta=4.0))  # fmt: skip
    # a radius too small (checksums intact: the writer was wrong) would skip memories: refused
    index = bank.index
    small = BankIndex(index.offsets, index.centres, index.radius * 0.5, index.radius_l1,
                      index.max_norm, index.max_norm_l1)  # fmt: skip
    object.__setattr__(bank, "_state", bank.state.__class__(
        bank.keys, None, bank.norms, bank.ids, False, small))  # fmt: skip
    bank.save(tmp_path / "bad.hfb")
    with pytest.raises(BankIntegrityError, match="radius does not match"):
        MemoryBank.load(tmp_path / "bad.hfb")
    offsets = index.offsets.clone()
    offsets[1] = offsets[2] + 1
    shuffled = BankIndex(offsets, *(getattr(index, n) for n in ("centres", "radius",
                         "radius_l1", "max_norm", "max_norm_l1")))  # fmt: skip
    object.__setattr__(bank, "_state", bank.state.__class__(
        bank.keys, None, bank.norms, bank.ids, False, shuffled))  # fmt: skip
    bank.save(tmp_path / "bad2.hfb")
    with pytest.raises(BankIntegrityError, match="offsets"):
        MemoryBank.load(tmp_path / "bad2.hfb")


def test_statistics_are_float64_of_the_stored_keys(gen):
    keys = torch.randn(20, 3, generator=gen).to(torch.bfloat16)
    offsets = torch.tensor([0, 7, 7, 20])
    index = cluster_statistics(keys, offsets)
    assert index.centres.dtype == torch.float64 and index.sizes.tolist() == [7, 0, 13]
    assert torch.equal(index.centres[1], torch.zeros(3)) and float(index.radius[1]) == 0.0
    assert torch.allclose(index.max_norm[2], keys[7:].double().norm(dim=1).max())


# ------------------------------------------------------------------------------- arguments
def test_bad_arguments():
    bank = MemoryBank(torch.randn(10, 4))
    with pytest.raises(ValueError, match="num_clusters"):
        bank.build_index(0)
    with pytest.raises(ValueError, match="num_clusters"):
        bank.build_index(11)
    with pytest.raises(ValueError, match="num_clusters"):
        bank.build_index(True)
    with pytest.raises(TypeError, match="labels must be integers"):
        bank.build_index(labels=torch.zeros(10))
    with pytest.raises(ValueError, match="one cluster per memory"):
        bank.build_index(labels=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        bank.build_index(2, labels=torch.arange(10) % 3)
    with pytest.raises(ValueError, match="iters must be an int"):
        bank.build_index(2, iters=-1)
    with pytest.raises(ValueError, match="seed must be an int"):
        bank.build_index(2, seed=1.5)
    with pytest.raises(ValueError, match="at least one memory"):
        MemoryBank(torch.randn(0, 4)).build_index()
    bank.build_index(2)
    for eps in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="eps must"):
            hen_fast.retrieve(torch.randn(4), bank, eps=eps)
    with pytest.raises(ValueError, match="takes no eps"):
        hen_fast.retrieve(torch.randn(4), bank, separation="sparsemax", eps=1e-3)
    with pytest.raises(TypeError):
        hen_fast.retrieve(torch.randn(4), bank, eps="small")


def test_build_progress_bars(gen, monkeypatch):
    """progress=True shows bars for k-means and the assignment (on a terminal: tqdm's
    disable=None), progress=False none; the default shows them from 2^20 rows."""
    import tqdm.auto

    shown = []

    def recording(iterable, desc=None, **kwargs):
        shown.append(desc)
        return iterable

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    bank = MemoryBank(torch.randn(300, 8, generator=gen))
    bank.build_index(6, progress=True)
    assert shown == ["k-means", "assigning clusters"]
    shown.clear()
    bank.build_index(6, progress=False)
    bank.build_index(6)  # 300 rows: under the default's 2^20
    assert shown == []
