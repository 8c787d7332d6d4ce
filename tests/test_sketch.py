"""The bank index's row sketch (hen_fast.index: sketch_basis, row_sketch, sketch_query_terms) and
its filter (hen_fast.sketch_filter, the op hen_fast::sketch_filter): the rows it leaves out are
certified against a float64 reference, the C++ op and the torch version agree, and retrieval
over a sketched bank is the scan's (the same support) on the cases where the sketch answers
and where it must hand over."""

from __future__ import annotations

import math

import pytest
import torch
from test_index import assert_as_scan, scan

import hen_fast
from hen_fast import BankIntegrityError, MemoryBank, indexed
from hen_fast.index import auto_sketch_dim, row_sketch, sketch_basis, sketch_query_terms
from hen_fast.sketch_filter import sketch_filter_torch

from helpers import rel_err, tolerance, value_scale

pytestmark = pytest.mark.usefixtures("poisoned_buffers", "sketch_on_small_banks")
HAS_OP = "cpu" in hen_fast.available_backends()
FILTERS = [pytest.param(sketch_filter_torch, id="torch")] + (
    [pytest.param(lambda *a: torch.ops.hen_fast.sketch_filter(*a), id="op")] if HAS_OP else []
)


@pytest.fixture
def sketch_on_small_banks(monkeypatch):
    """These banks are tiny: by default they would go to the scan (test_index's fixture); the
    sketch may gather half of one."""
    monkeypatch.setattr(indexed, "CALL_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(indexed, "QUERY_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(indexed, "SKETCH_FRACTION", 0.5)


# Key size of the test banks: the smallest of float32 keys "auto" sketches with p = 8 (2 * 8 + 4
# bytes a row <= 8% of 4 * 64).
DIM = 64


def low_rank_keys(gen, rows=3000, dim=DIM, rank=6, noise=0.03):
    """Unit rows whose energy sits in ``rank`` directions: a sketch of 8 holds it."""
    keys = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, dim, generator=gen)
    keys = keys / rank**0.5 + noise * torch.randn(rows, dim, generator=gen)
    return torch.nn.functional.normalize(keys, dim=1)


def sketched_bank(gen, clusters=1, count=5, **kwargs):
    """A low-rank bank, indexed with a sketch, and noisy copies of stored memories. One cluster:
    the cluster bounds never prune, every query goes to the sketch."""
    bank = MemoryBank(low_rank_keys(gen, **kwargs))
    bank.build_index(clusters)
    assert bank.index.sketch_dim == 8
    picks = torch.randint(0, bank.keys.shape[0], (count,), generator=gen)
    queries = bank.keys[picks] + 0.01 * torch.randn(count, bank.keys.shape[1], generator=gen)
    return bank, queries


def random_problem(gen, queries=3, dims=7, dim=37, rows=5003, dtype=torch.float32):
    """Filter inputs with odd sizes (SIMD tails everywhere): x, keys, norms, coords, rest,
    sketch (float16), residual."""
    keys = torch.randn(rows, dim, generator=gen).to(dtype)
    x = torch.randn(queries, dim, generator=gen)
    coords = torch.randn(queries, dims, generator=gen)
    rest = torch.rand(queries, generator=gen)
    sketch = torch.randn(dims, rows, generator=gen).half()
    residual = torch.rand(rows, generator=gen)
    norms = torch.rand(rows, generator=gen)
    return x, keys, norms, coords, rest, sketch, residual


def reference_bounds(coords, rest, sketch, residual, norms):
    bound = coords.double() @ sketch.double() + rest.double()[:, None] * residual.double()
    return bound if norms is None else bound - norms.double()


# ------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("run", FILTERS)
@pytest.mark.parametrize("l2", [False, True], ids=["dot", "l2"])
def test_fixed_cut_passes_exactly_the_rows_above_it(gen, run, l2):
    """With an infinite gap the cut stays put: the rows above it (float64 reference, up to
    float32 rounding at the boundary) and each query's count."""
    x, keys, norms, coords, rest, sketch, residual = random_problem(gen)
    norms = norms if l2 else None
    bound = reference_bounds(coords, rest, sketch, residual, norms)
    cut = bound.quantile(0.9, dim=1).float()
    gap = torch.full((3,), math.inf)
    rows, counts, used = run(x, keys, norms, coords, rest, sketch, residual, cut, gap, -1)
    margin = 1e-4 * (1 + bound.abs().max())
    sure = (bound > cut.double()[:, None] + margin).any(dim=0).nonzero()[:, 0]
    maybe = (bound > cut.double()[:, None] - margin).any(dim=0).nonzero()[:, 0]
    assert rows.dtype == torch.long and bool((rows[1:] > rows[:-1]).all())
    assert set(sure.tolist()) <= set(rows.tolist()) <= set(maybe.tolist())
    per_query = (bound > cut.double()[:, None]).sum(dim=1)
    assert bool(((counts - per_query).abs() <= 3).all())
    assert torch.equal(used, cut)


@pytest.mark.parametrize("run", FILTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rising_cut_leaves_out_only_rows_at_or_below_it(gen, run, dtype):
    """The cut rises to each scored row's score less the gap: every row left out has a bound at
    or below the cut returned, which is the best score less the gap (the best row passes)."""
    x, keys, norms, coords, rest, sketch, residual = random_problem(gen, dtype=dtype)
    # bounds that hold: the sketch of the keys themselves plus their rest
    dim = keys.shape[1]
    basis = torch.linalg.qr(torch.randn(dim, 7, generator=gen, dtype=torch.float64)).Q
    sketch, residual = row_sketch(keys, basis)
    coords = (x.double() @ basis).float()
    rest = torch.linalg.vector_norm(x.double() - (x.double() @ basis) @ basis.T, dim=1).float()
    rest = rest * (1 + 1e-5)
    gap = torch.tensor([0.5, 2.0, 8.0])
    cut = torch.full((3,), -math.inf)
    rows, counts, used = run(x, keys, None, coords, rest, sketch, residual, cut, gap, -1)
    bound = reference_bounds(coords, rest, sketch, residual, None)
    scores = x.double() @ keys.double().T
    left_out = torch.ones(keys.shape[0], dtype=torch.bool)
    left_out[rows] = False
    assert bool((bound[:, left_out] <= used.double()[:, None] + 1e-4).all())
    best = scores.max(dim=1).values
    assert bool(((used.double() - (best - gap.double())).abs() <= 1e-3).all())
    assert bool((counts >= 1).all()) and bool((counts <= rows.numel()).all())


@pytest.mark.skipif(not HAS_OP, reason="the extension is not built")
def test_op_and_torch_version_agree_and_limit_stops_early(gen):
    x, keys, norms, coords, rest, sketch, residual = random_problem(gen, rows=40000)
    bound = reference_bounds(coords, rest, sketch, residual, norms)
    cut = bound.quantile(0.99, dim=1).float()
    gap = torch.full((3,), math.inf)
    args = (x, keys, norms, coords, rest, sketch, residual, cut, gap)
    op = torch.ops.hen_fast.sketch_filter(*args, -1)
    ref = sketch_filter_torch(*args, -1)
    assert abs(op[0].numel() - ref[0].numel()) <= 3 and bool(((op[1] - ref[1]).abs() <= 3).all())
    # a limit below what passes stops the op: a count above the limit says so, rows are fewer
    stopped = torch.ops.hen_fast.sketch_filter(*args, 50)
    assert bool((stopped[1] > 50).any()) and stopped[0].numel() < op[0].numel()
    # a limit above what passes changes nothing (the pace check sees them spread over the bank)
    roomy = torch.ops.hen_fast.sketch_filter(*args, 4 * int(op[1].max()))
    assert abs(roomy[0].numel() - op[0].numel()) <= 3
    # empty bank, no queries
    none = torch.ops.hen_fast.sketch_filter(x, keys[:0], None, coords, rest, sketch[:, :0],
                                            residual[:0], cut, gap, -1)  # fmt: skip
    assert none[0].numel() == 0 and torch.equal(none[1], torch.zeros(3, dtype=torch.long))


@pytest.mark.skipif(not HAS_OP, reason="the extension is not built")
def test_op_rejects_bad_arguments(gen):
    x, keys, norms, coords, rest, sketch, residual = random_problem(gen, rows=100)
    cut, gap = torch.zeros(3), torch.ones(3)
    op = torch.ops.hen_fast.sketch_filter
    with pytest.raises(RuntimeError, match="float16"):
        op(x, keys, None, coords, rest, sketch.float(), residual, cut, gap, -1)
    with pytest.raises(RuntimeError, match="one entry per query"):
        op(x, keys, None, coords, rest[:2], sketch, residual, cut, gap, -1)
    with pytest.raises(RuntimeError, match="columns"):
        op(x[:, :5], keys, None, coords, rest, sketch, residual, cut, gap, -1)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(x, keys.double(), None, coords, rest, sketch, residual, cut, gap, -1)


@pytest.mark.skipif(not HAS_OP, reason="the extension is not built")
def test_op_reads_key_rows_past_2_31_elements():
    """Row offsets are 64-bit: rows of a huge row stride over untouched address space (only
    the rows written are ever touched)."""
    rows, dim, stride = 5, 24, 1 << 29  # row 4 starts at element 2^31
    base = torch.empty(stride * (rows - 1) + dim)
    keys = base.as_strided((rows, dim), (stride, 1))
    gen = torch.Generator().manual_seed(0)
    for i in range(rows):
        keys[i] = torch.randn(dim, generator=gen)
    x = keys[4:5].clone()
    coords, rest = torch.zeros(1, 2), torch.ones(1)
    sketch, residual = torch.zeros(2, rows).half(), torch.full((rows,), 100.0)
    # every row passes a cut of 0 until row 4 scores ||k_4||^2 and the cut rises past the rest
    out = torch.ops.hen_fast.sketch_filter(x, keys, None, coords, rest, sketch, residual,
                                           torch.zeros(1), torch.zeros(1), -1)  # fmt: skip
    assert math.isclose(float(out[2]), float(keys[4] @ keys[4]), rel_tol=1e-5)


# ------------------------------------------------------------------------------ the sketch
def test_basis_choice_and_sketch_rounding(gen):
    keys = low_rank_keys(gen, rows=500)
    basis = sketch_basis(keys, "auto")
    assert basis.shape == (DIM, 8) and basis.dtype == torch.float64
    assert torch.allclose(basis.T @ basis, torch.eye(8, dtype=torch.float64), atol=1e-12)
    # the leading directions: the rank-6 part of the keys lies in the basis' span
    leading = torch.linalg.svd(keys.double(), full_matrices=False).Vh[:6].T
    assert float(torch.linalg.matrix_norm(leading - basis @ (basis.T @ leading), 2)) < 0.1
    # "auto" goes by bytes (2p + 4 <= 0.32 d of float32 keys): none below 63 numbers, 16 from
    # 113, 32 from 213, 64 from 413; bfloat16 keys need twice as many numbers
    assert sketch_basis(keys[:, :62], "auto") is None
    edges = (62, 63, 112, 113, 212, 213, 412, 413, 1024)
    sizes = [auto_sketch_dim(dim, 4) for dim in edges]
    assert sizes == [0, 8, 8, 16, 16, 32, 32, 64, 64]
    assert auto_sketch_dim(128, 2) == 8 and auto_sketch_dim(128, 8) == 32
    assert sketch_basis(torch.randn(500, 128, generator=gen), "auto").shape == (128, 16)
    assert sketch_basis(keys, 0) is None and sketch_basis(keys, 3).shape == (DIM, 3)
    sketch, residual = row_sketch(keys, basis)
    assert sketch.shape == (8, 500) and sketch.dtype == torch.float16
    exact = keys.double() - (keys.double() @ basis) @ basis.T
    # the rest's norm is rounded up, never down
    assert bool((residual.double() >= torch.linalg.vector_norm(exact, dim=1)).all())


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_query_terms_bound_every_computed_score(gen, similarity):
    """coords . sketch + rest * residual (- norms) + margin is at least the score the kernels
    compute, for every row, on large-norm keys too."""
    for scale in (1.0, 300.0):
        bank = MemoryBank(scale * low_rank_keys(gen, rows=800))
        bank.build_index(4)
        queries = bank.keys[:6] + scale * 0.3 * torch.randn(6, DIM, generator=gen)
        coords, rest, margin = sketch_query_terms(queries, bank.index, similarity)
        bound = reference_bounds(coords, rest, bank.index.sketch, bank.index.residual,
                                 bank.norms if similarity == "l2" else None)  # fmt: skip
        bound = bound + margin[:, None]
        scores = queries @ bank.keys.T
        if similarity == "l2":
            scores = 2 * scores - bank.norms  # shifted by ||x||^2, as the kernels score
        assert bool((scores.double() <= bound).all())
        # and it is tight where the sketch holds the rows (within the rest's product)
        assert float((bound - scores.double()).median()) < 0.2 * scale**2


# ------------------------------------------------------------------------- retrieval over it
CASES = [(similarity, separation, alpha, beta)
         for similarity in ("dot", "l2")
         for separation, alpha, beta in (("sparsemax", 2.0, 300.0), ("entmax", 1.5, 300.0),
                                         ("entmax", 1.25, 300.0),
                                         ("softmax", 1.0, 3000.0))]  # fmt: skip


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu")
                                     if b in hen_fast.available_backends()])  # fmt: skip
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}{c[2]}")
def test_sketch_answers_as_the_scan(gen, case, backend):
    similarity, separation, alpha, beta = case
    bank, queries = sketched_bank(gen)
    info = assert_as_scan(queries, bank, backend, beta=beta, similarity=similarity,
                          separation=separation, alpha=alpha)  # fmt: skip
    # the sketch (8 float16 and a float32 of 64 float32 per row: 7.8%) and a few rows
    share = (8 * 2 + 4 + (4 if similarity == "l2" else 0)) / (DIM * 4)
    assert bool((info.fraction_read < share + 0.05).all())
    assert bool((info.fraction_read > share).all())
    if separation == "softmax":
        assert bool((info.mass_bound <= 2.0**-24).all()) and bool((info.mass_bound > 0).all())


def test_clusters_first_then_the_sketch(gen):
    """With clusters that prune the visit answers alone; multi-step calls and values too."""
    bank, queries = sketched_bank(gen, clusters=40)
    values = torch.randn(bank.keys.shape[0], 5, generator=gen)
    hetero = MemoryBank(bank.keys, values)
    hetero.build_index(40)
    for separation in ("sparsemax", "softmax"):
        beta = 300.0 if separation == "sparsemax" else 3000.0
        assert_as_scan(queries, bank, beta=beta, separation=separation, steps=3)
        assert_as_scan(queries, hetero, beta=beta, separation=separation)


@pytest.mark.parametrize("separation", ["sparsemax", "softmax"])
def test_clusters_that_mislead_the_first_round_are_seeded_past(gen, monkeypatch, separation):
    """A query whose best-bound clusters are decoys (antipodal pairs: centre 0, radius 1, so
    their bound ||x|| beats its own singleton cluster's 0.96) reads the decoys first; the seed
    round then reads its best clusters up to SEED_CLUSTERS, finds its own memory, and the
    sketch answers from a cut near its score. Without the seed the op's cut starts from a
    decoy's score, every row before its memory passes (it lies in the second block of rows),
    and the call scans (the torch filter scores each block's rows of highest bound first and
    may find it)."""
    rows, dim, decoys = 2000, DIM, 3
    keys = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    keys[rows - decoys :] = -keys[rows - 2 * decoys : rows - decoys]
    labels = torch.arange(rows)
    labels[rows - decoys :] = labels[rows - 2 * decoys : rows - decoys]  # each pair one cluster
    labels = torch.unique(labels, return_inverse=True)[1]
    bank = MemoryBank(keys)
    bank.build_index(labels=labels, sketch_dim=8)
    source = int((bank.ids == 1500).nonzero())
    query = bank.keys[source] + 0.02 * torch.randn(dim, generator=gen)
    query = torch.nn.functional.normalize(query, dim=0)[None]
    beta = 300.0 if separation == "sparsemax" else 3000.0
    info = assert_as_scan(query, bank, beta=beta, separation=separation)
    assert float(info.fraction_read[0]) < 0.5
    assert int(info.argmax[0]) == source
    monkeypatch.setattr(indexed, "SEED_CLUSTERS", 0)
    info = assert_as_scan(query, bank, beta=beta, separation=separation)
    if HAS_OP:
        assert float(info.fraction_read[0]) == 1.0


def test_a_hard_query_sends_its_call_to_the_scan(gen, monkeypatch):
    """A query equally near every memory (the zero vector: every score ties at 0) passes every
    row: the filter stops and the call's queries scan together (one read of the bank for all);
    alone, the others are answered from the sketch."""
    monkeypatch.setattr(indexed, "SKETCH_FRACTION", 0.2)
    bank, queries = sketched_bank(gen, count=4)
    queries[2] = 0.0
    for separation in ("sparsemax", "softmax"):
        info = assert_as_scan(queries, bank, beta=300.0, separation=separation)
        assert bool((info.fraction_read == 1).all())
        alone = assert_as_scan(queries[[0, 1, 3]], bank, beta=300.0, separation=separation)
        assert bool((alone.fraction_read < 0.2).all())


def test_duplicates_ties_and_far_queries(gen):
    keys = low_rank_keys(gen, rows=1000)
    bank = MemoryBank(torch.cat([keys, keys[:50]]))  # 50 memories twice
    bank.build_index(1)
    queries = torch.cat([bank.keys[:3], 30 * bank.keys[3:4], -bank.keys[4:5]])
    for separation in ("sparsemax", "entmax", "softmax"):
        assert_as_scan(queries, bank, beta=100.0, separation=separation)


def test_low_precision_banks_and_nan_queries(gen):
    bank, queries = sketched_bank(gen)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        other = MemoryBank(bank.keys.to(dtype))
        other.build_index(1, sketch_dim=8)  # "auto" would give 16-bit keys of d = 64 none
        rows = queries.to(dtype)
        out, info = hen_fast.retrieve(rows, other, beta=300.0, separation="sparsemax",
                                      return_info=True)  # fmt: skip
        full, full_info = scan(rows, other, beta=300.0, separation="sparsemax", return_info=True)
        assert torch.equal(info.support, full_info.support) and out.dtype == dtype
        assert rel_err(out, full, scale=value_scale(other.values)) <= tolerance(dtype)
        assert bool((info.fraction_read < 0.3).all())  # the sketch: 20 of 128 bytes a row
    queries[1, 3] = math.nan
    out, info = hen_fast.retrieve(queries, bank, beta=300.0, separation="sparsemax",
                                  check_finite=False, return_info=True)  # fmt: skip
    assert bool(torch.isnan(out[1]).all()) and float(info.fraction_read[1]) == 1.0
    assert float(info.fraction_read[0]) < 0.2


def test_without_the_extension_the_torch_filter_runs(gen, monkeypatch):
    import hen_fast.backends.cpu as cpu

    bank, queries = sketched_bank(gen)
    expected = hen_fast.retrieve(queries, bank, beta=300.0, separation="sparsemax",
                                 backend="torch")  # fmt: skip
    monkeypatch.setattr(cpu, "load_extension", lambda: False)
    out, info = hen_fast.retrieve(queries, bank, beta=300.0, separation="sparsemax",
                                  backend="torch", return_info=True)  # fmt: skip
    assert torch.equal(out, expected) and bool((info.fraction_read < 0.2).all())


def test_eps_zero_and_polynomial_do_not_use_it(gen):
    bank, queries = sketched_bank(gen)
    for kwargs in (dict(separation="softmax", eps=0.0), dict(separation="polynomial")):
        info = assert_as_scan(queries, bank, beta=3000.0, **kwargs)
        assert bool((info.fraction_read == 1).all())


# --------------------------------------------------------------------------- its life
def test_sketch_saved_verified_and_refused_when_tampered(gen, tmp_path):
    bank, queries = sketched_bank(gen)
    loaded = MemoryBank.load(bank.save(tmp_path / "bank.hfb"))
    for name in ("basis", "sketch", "residual"):
        assert torch.equal(getattr(loaded.index, name), getattr(bank.index, name))
    assert torch.equal(hen_fast.retrieve(queries, loaded, beta=300.0),
                       hen_fast.retrieve(queries, bank, beta=300.0))  # fmt: skip
    import dataclasses

    for name, change in (("residual", lambda t: t * 0.5), ("sketch", lambda t: t + 0.25),
                         ("basis", lambda t: t * 1.01)):  # fmt: skip
        index = dataclasses.replace(bank.index, **{name: change(getattr(bank.index, name))})
        object.__setattr__(bank, "_state", bank.state.__class__(
            bank.keys, None, bank.norms, bank.ids, False, index))  # fmt: skip
        bank.save(tmp_path / f"bad-{name}.hfb")
        with pytest.raises(BankIntegrityError, match=name):
            MemoryBank.load(tmp_path / f"bad-{name}.hfb")


def test_sketch_dim_argument(gen):
    bank = MemoryBank(low_rank_keys(gen, rows=300))
    bank.build_index(3, sketch_dim=0)
    assert bank.index.basis is None and bank.index.sketch_dim == 0
    bank.build_index(3, sketch_dim=5)
    assert bank.index.sketch_dim == 5 and bank.index.sketch.shape == (5, 300)
    for bad in (-1, DIM + 1, 2.5, True, "big"):
        with pytest.raises(ValueError, match="sketch_dim"):
            bank.build_index(3, sketch_dim=bad)


@pytest.mark.skipif(not HAS_OP, reason="the extension is not built")
def test_op_schema_and_fake_kernel(gen):
    x, keys, norms, coords, rest, sketch, residual = random_problem(gen, rows=300)
    args = (x, keys, norms, coords, rest, sketch, residual, torch.zeros(3), torch.ones(3), -1)
    torch.library.opcheck(torch.ops.hen_fast.sketch_filter.default, args,
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


@pytest.mark.skipif(not HAS_OP, reason="the extension is not built")
def test_every_instruction_set_gives_the_same_rows(gen, monkeypatch):
    """The bounds loop of each instruction set this CPU runs (HEN_FAST_CPU_ISA), against the
    float64 reference; a set it does not run is refused."""
    import hen_fast.backends.cpu as cpu

    # 15 queries: the loops' groups of 8, 4, 2 and 1
    x, keys, norms, coords, rest, sketch, residual = random_problem(gen, queries=15)
    bound = reference_bounds(coords, rest, sketch, residual, norms)
    cut = bound.quantile(0.95, dim=1).float()
    args = (x, keys, norms, coords, rest, sketch, residual, cut, torch.full((15,), math.inf), -1)
    margin = 1e-4 * (1 + bound.abs().max())
    sure = set((bound > cut.double()[:, None] + margin).any(dim=0).nonzero()[:, 0].tolist())
    maybe = set((bound > cut.double()[:, None] - margin).any(dim=0).nonzero()[:, 0].tolist())
    for isa in cpu.instruction_sets():
        monkeypatch.setenv("HEN_FAST_CPU_ISA", "avx512" if isa == "amx" else isa)
        rows, counts, _ = torch.ops.hen_fast.sketch_filter(*args)
        assert sure <= set(rows.tolist()) <= maybe, isa
        for q in (0, 9, 14):  # alone, a query passes as it did in its group
            alone = [t[q : q + 1] if t.shape[0] == 15 and t is not keys else t for t in args[:-1]]
            _, one_count, _ = torch.ops.hen_fast.sketch_filter(*alone, -1)
            assert int(one_count[0]) == int(counts[q]), (isa, q)
    if "avx512" not in cpu.instruction_sets():
        monkeypatch.setenv("HEN_FAST_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="does not run"):
            torch.ops.hen_fast.sketch_filter(*args)


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_huge_beta_and_large_norms(gen, similarity):
    """beta 1e30 (sparse: the gap vanishes, the margin alone separates; softmax: argmax) and keys
    of norm 300 (the margins scale with the norms)."""
    bank, queries = sketched_bank(gen)
    for separation in ("sparsemax", "entmax", "softmax"):
        info = assert_as_scan(queries, bank, beta=1e30, similarity=similarity,
                              separation=separation)  # fmt: skip
        assert bool((info.fraction_read < 0.2).all())
    big = MemoryBank(300.0 * bank.keys)
    big.build_index(1)
    beta = 300.0 / 300.0**2  # the same scaled scores as beta 300 on unit keys
    info = assert_as_scan(300.0 * queries, big, beta=beta, similarity=similarity,
                          separation="sparsemax")  # fmt: skip
    assert bool((info.fraction_read < 0.3).all())
