"""The retrieval contract, once, for every backend: output and RetrieveInfo against the float64
oracle (hen_fast.oracle) for every similarity x separation combination, steps/tol/clamp_mask,
half-precision inputs, a single query, degenerate shapes and odd strides, ties, extremes.

Each test runs once per backend (the ``backend`` fixture): ``torch`` and ``cpu`` on CPU tensors,
``triton`` on a GPU when there is one and otherwise on CPU tensors through the interpreter,
``cuda`` on a GPU only (marked ``gpu``). The cpu backend runs once per path it has (variants
``cpu-tiled``, ``cpu-onepass`` and the one-pass kernel on each narrower instruction set, forced
through HEN_FAST_CPU_PATH / HEN_FAST_CPU_ISA), besides its own choice (``cpu``). Inputs are
drawn on the CPU, moved to the backend's device (helpers.run_backend; on a GPU in random
layouts) and the results come back for the oracle. Every output buffer is poisoned first (NaN),
so an element a kernel forgets to write shows. Tolerances: the table in helpers.py.
Backend-specific paths (forced splits, candidate buffer overflow, vector loads, threads,
opcheck, registration, large banks) stay in test_<backend>.py.
"""

import importlib.util
import math
import os

import pytest
import torch

from hen_fast import oracle
from hen_fast.backends import cpu, cuda

from helpers import (
    COMBINATIONS,
    FORCED_SPLITS,
    backend_device,
    check_against_reference,
    combo_id,
    combo_kwargs,
    compute_dtypes,
    odd_strides,
    randint,
    random_problem,
    rel_err,
    run_backend,
    tolerance,
)

pytestmark = pytest.mark.usefixtures("poisoned_buffers")

# CI sets HEN_FAST_REQUIRE_EXT=1: there a missing extension fails the cpu cases, never skips them.
_NO_EXTENSION = pytest.mark.skipif(
    not cpu.load_extension() and os.environ.get("HEN_FAST_REQUIRE_EXT") != "1",
    reason="the C++ extension (hen_fast._C) is not built",
)
# The cpu backend's paths (csrc/cpu/retrieve_cpu.h), each forced for every case: "cpu" is the
# choice the kernel makes itself; the one-pass kernel runs on each instruction set this CPU has.
_CPU_VARIANTS = {
    "cpu": {},
    "cpu-tiled": {"HEN_FAST_CPU_PATH": "tiled"},
    "cpu-onepass": {"HEN_FAST_CPU_PATH": "onepass"},
    "cpu-onepass-avx2": {"HEN_FAST_CPU_PATH": "onepass", "HEN_FAST_CPU_ISA": "avx2"},
    "cpu-onepass-generic": {"HEN_FAST_CPU_PATH": "onepass", "HEN_FAST_CPU_ISA": "generic"},
}


def _cpu_variant(name):
    isa = _CPU_VARIANTS[name].get("HEN_FAST_CPU_ISA")
    runs_here = isa is None or isa in cpu.instruction_sets()
    marks = [_NO_EXTENSION, pytest.mark.skipif(not runs_here, reason=f"this CPU has no {isa}")]
    return pytest.param(("cpu", _CPU_VARIANTS[name]), id=name, marks=marks)


_BACKEND_PARAMS = [
    pytest.param(("torch", {}), id="torch"),
    *(_cpu_variant(name) for name in _CPU_VARIANTS),
    pytest.param(
        ("triton", {}),
        id="triton",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("triton") is None, reason="the triton package is not installed"
        ),
    ),
    pytest.param(
        ("cuda", {}),
        id="cuda",
        marks=[
            pytest.mark.gpu,  # conftest.py skips it without a CUDA device
            pytest.mark.skipif(
                torch.cuda.is_available() and not cuda.has_cuda_kernel(),
                reason="hen_fast._C is built without CUDA kernels",
            ),
        ],
    ),
]


@pytest.fixture(params=_BACKEND_PARAMS)
def backend(request, monkeypatch) -> str:
    name, environment = request.param
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    return name


def _interpreted(backend: str) -> bool:
    return backend == "triton" and backend_device(backend).type == "cpu"


def _problem_sizes(backend: str, steps: int = 1) -> dict:
    """random_problem's largest sizes for the tests of every combination: past each kernel's
    blocks where that is affordable (cpu: 64-query blocks, 2048-memory tiles; triton on a GPU
    and cuda: many splits), small where the float64 oracle or the Triton interpreter is slow.
    Several steps cost as many oracle updates, so their bank is that many times smaller. Banks
    past the cpu kernel's splits are in test_cpu.py."""
    if backend == "torch":
        return {}  # random_problem's defaults: its chunking is tested in test_retrieve.py
    if backend == "cpu":
        max_queries, max_memories = 80, 3000
    elif _interpreted(backend):
        max_queries, max_memories = 20, 300
    else:
        max_queries, max_memories = 70, 9000
    return dict(max_queries=max_queries, max_memories=max_memories // steps)


def _half_bank_sizes(backend: str) -> dict:
    """random_problem's largest sizes for the half-precision banks: past a tile of the cpu
    kernel, and past a block of queries on a GPU."""
    if backend == "cpu":
        return dict(max_memories=3000)
    if backend in ("triton", "cuda") and not _interpreted(backend):
        return dict(max_queries=64, max_memories=3000)
    return {}


def _skip_bfloat16_in_the_interpreter(backend, *dtypes):
    if torch.bfloat16 in dtypes and _interpreted(backend):
        pytest.skip("the Triton interpreter has no bfloat16 (checked on a GPU)")


# ---------------------------------------------------------------------- every combination
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_matches_reference(gen, backend, combo, steps):
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, same_dims=steps > 1, **_problem_sizes(backend, steps)
    )
    if steps > 1:  # auto-association, or values of the queries' width
        values = None if randint(gen, 0, 1) else values
    kwargs = dict(combo_kwargs(combo), steps=steps)
    out, info = run_backend(backend, queries, memories, values, gen=gen, **kwargs)
    check_against_reference(out, info, queries, memories, values, backend=backend, **kwargs)


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if c[2] in (1.5, 1.25)], ids=combo_id)
def test_steps_tol_and_clamp(gen, backend, combo):
    queries, memories, _ = random_problem(gen, dtype=torch.float32, same_dims=True)
    mask = torch.rand(queries.shape[1], generator=gen) < 0.3
    kwargs = dict(combo_kwargs(combo), steps=5, tol=1e-3, clamp_mask=mask)
    out, info = run_backend(backend, queries, memories, gen=gen, **kwargs)
    check_against_reference(out, info, queries, memories, None, backend=backend, **kwargs)
    assert torch.equal(out[:, mask], queries[:, mask])


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_half_precision_banks(gen, backend, combo, bank_dtype):
    """float32 queries over a half-precision bank: the computation is float32 on the rounded
    bank, so the float32 tolerance holds (against the oracle on the same rounded values)."""
    _skip_bfloat16_in_the_interpreter(backend, bank_dtype)
    queries, memories, values = random_problem(gen, **_half_bank_sizes(backend))
    queries, memories, values = queries.float(), memories.to(bank_dtype), values.to(bank_dtype)
    kwargs = combo_kwargs(combo)
    out, info = run_backend(backend, queries, memories, values, gen=gen, **kwargs)
    expected = oracle.naive_retrieve(queries, memories, values, **kwargs)
    assert rel_err(out, expected) < tolerance(backend=backend)
    check_against_reference(out, info, queries, memories, values, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "query_dtype, bank_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax"])
def test_half_precision_queries(gen, backend, query_dtype, bank_dtype, separation):
    """The output comes back in the queries' dtype: only its rounding adds to float32's error."""
    _skip_bfloat16_in_the_interpreter(backend, query_dtype, bank_dtype)
    queries, memories, values = random_problem(gen)
    queries, memories, values = (
        queries.to(query_dtype),
        memories.to(bank_dtype),
        values.to(bank_dtype),
    )
    kwargs = dict(beta=0.7, separation=separation)
    out, _ = run_backend(backend, queries, memories, values, gen=gen, return_info=False, **kwargs)
    expected = oracle.naive_retrieve(queries, memories, values, **kwargs)
    assert out.dtype == query_dtype
    error = rel_err(out, expected)
    assert error < max(torch.finfo(query_dtype).eps, tolerance(backend=backend)), error


# ---------------------------------------------------------------------- shapes and layouts
@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if c[2] in (1.5, 1.25)], ids=combo_id)
def test_degenerate_shapes(gen, backend, combo):
    """One memory, one feature, one value column, one query."""
    for num_queries, num_memories, dim, value_dim in [(1, 1, 1, 1), (3, 1, 5, 2), (1, 7, 1, 1)]:
        queries = torch.randn(num_queries, dim, generator=gen)
        memories = torch.randn(num_memories, dim, generator=gen)
        values = torch.randn(num_memories, value_dim, generator=gen)
        kwargs = combo_kwargs(combo)
        out, info = run_backend(backend, queries, memories, values, gen=gen, **kwargs)
        check_against_reference(out, info, queries, memories, values, backend=backend, **kwargs)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_unspecialised_odd_strides(gen, backend, combo):
    """Strides neither 1 nor a multiple of 16 (helpers.odd_strides), kept on the device, over two
    bank splits where the backend takes that knob."""
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=150)
    odd = [odd_strides(t.contiguous(), gen) for t in (queries, memories, values)]
    kwargs = combo_kwargs(combo)
    out, info = run_backend(backend, *odd, layout="same", splits=2, **kwargs)
    check_against_reference(out, info, queries, memories, values, backend=backend, **kwargs)


def test_single_query_returns_vector_and_scalar_info(gen, backend):
    problem = random_problem(gen)
    for kwargs in ({}, dict(beta=0.5, separation="entmax", alpha=1.7)):
        expected = oracle.naive_retrieve(*problem, **kwargs)[0]
        for dtype in compute_dtypes(backend):
            queries, memories, values = (t.to(dtype) for t in problem)
            out, info = run_backend(backend, queries[0], memories, values, gen=gen, **kwargs)
            batch, batch_info = run_backend(
                backend, queries[:1], memories, values, gen=gen, **kwargs
            )
            where = (dtype, kwargs)
            assert out.shape == (values.shape[1],)
            assert torch.equal(out, batch[0]), where
            for field, batch_field in zip(info.as_tuple(), batch_info.as_tuple()):
                assert field.shape == () and field == batch_field[0], where
            assert rel_err(out, expected) < tolerance(dtype, backend), where


def test_without_tol_every_step_runs(gen, backend):
    for dtype in compute_dtypes(backend):
        queries, memories, _ = random_problem(gen, dtype=dtype, same_dims=True)
        _, info = run_backend(backend, queries, memories, gen=gen, steps=7)
        assert bool((info.steps == 7).all()), dtype


# ---------------------------------------------------------------------- weights and ties
def test_weights_are_on_the_simplex(gen, backend):
    """Values = identity make the output the weight vector itself."""
    queries, memories, _ = random_problem(gen, dtype=torch.float32)
    eye = torch.eye(memories.shape[0])
    for separation, alpha in [
        ("softmax", 1.5),
        ("sparsemax", 1.5),
        ("entmax", 1.1),
        ("entmax", 1.5),
        ("entmax", 1.9),
        ("polynomial", 1.5),
    ]:
        for beta in (0.05, 1.0, 20.0):
            p, info = run_backend(
                backend, queries, memories, eye, gen=gen, beta=beta, separation=separation,
                alpha=alpha,
            )  # fmt: skip
            where = (separation, alpha, beta)
            assert bool((p >= 0).all()), where
            total = p.sum(1)
            if separation == "polynomial":
                total = total[info.support > 0]
            assert (total - 1).abs().max() < 1e-6, where


def test_polynomial_rows_with_no_positive_score_are_zero(gen, backend):
    memories = torch.rand(40, 6, generator=gen, dtype=torch.float64) + 0.1
    queries = torch.stack([-torch.rand(6, generator=gen, dtype=torch.float64), memories[3]])
    kwargs = dict(separation="polynomial", degree=3)
    expected = oracle.naive_retrieve(queries, memories, **kwargs)
    for dtype in compute_dtypes(backend):
        for splits in (None, 3) if backend in FORCED_SPLITS else (None,):
            out, info = run_backend(
                backend, queries.to(dtype), memories.to(dtype), splits=splits, **kwargs
            )
            assert torch.equal(out[0], torch.zeros(6, dtype=dtype))
            assert info.support.tolist() == [0, 40] and info.lse[0] == -math.inf
            assert rel_err(out, expected) < tolerance(dtype, backend), (dtype, splits)


def test_polynomial_huge_scores_do_not_overflow(gen, backend):
    memories = 1e3 * torch.randn(20, 6, generator=gen)
    kwargs = dict(beta=1e4, separation="polynomial", degree=10)
    out, _ = run_backend(backend, memories[:4], memories, return_info=False, **kwargs)
    expected = oracle.naive_retrieve(memories[:4], memories, **kwargs)
    assert rel_err(out, expected) < tolerance(backend=backend)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_argmax_ties_take_the_first_memory_across_splits(gen, backend, separation):
    """The longest memory has the top dot product with itself; its copy later in the bank (in
    another chunk or split, where the backend takes that knob) ties with it."""
    for num_memories, copy, split_counts in [(9, 6, (1, 2, 4, 9)), (700, 650, (1, 3))]:
        memories = torch.randn(num_memories, 4, generator=gen, dtype=torch.float64)
        memories[2] *= 10
        memories[copy] = memories[2]
        for dtype in compute_dtypes(backend):
            for splits in split_counts if backend in FORCED_SPLITS else (None,):
                _, info = run_backend(
                    backend, memories[2:3].to(dtype), memories.to(dtype), separation=separation,
                    splits=splits,
                )  # fmt: skip
                assert info.argmax.item() == 2, (num_memories, dtype, splits)


def test_large_beta_is_the_nearest_memory(gen, backend):
    memories = torch.randn(300, 8, generator=gen)
    queries = memories[:5] + 0.01 * torch.randn(5, 8, generator=gen)
    for separation in ("softmax", "sparsemax", "entmax"):
        out, info = run_backend(
            backend, queries, memories, gen=gen, beta=1e4, similarity="l2", separation=separation
        )
        assert torch.equal(info.argmax, torch.arange(5)), separation
        assert rel_err(out, memories[:5]) < 1e-6, separation


# ---------------------------------------------------------------------- extremes
EXTREME_BETAS = (1e3, 1e8, 1e30)


def _exact_problem(gen, num_queries, num_memories, dim, value_dim, scale=1.0):
    """Inputs on a grid of 1/64 (times a power of two ``scale``): every similarity is exact in
    float32, so a float32 kernel and the float64 oracle see the same scores, the same ties, and
    gaps of at least 2^-12 * scale^2 between different scores."""

    def grid(*shape):
        return torch.randint(-64, 65, shape, generator=gen).float() / 64

    memories, values = grid(num_memories, dim) * scale, grid(num_memories, value_dim)
    if num_memories > 4:  # duplicated memories: exact ties, wherever they fall in the ranking
        memories[num_memories - 1] = memories[1]
        memories[num_memories // 2] = memories[1]
    queries = grid(num_queries, dim) * scale
    queries[0] = memories[min(1, num_memories - 1)]
    return queries, memories, values


def _float64_expectation(queries, memories, values, *, beta, similarity, separation, alpha):
    """(the float64 output, its argmax limit, the first best memory). The oracle's weights are
    computed on scores shifted to a row maximum of 0 (the same weights, exactly: softmax and
    entmax are shift invariant, polynomial is beta invariant), so they stay finite at any beta;
    the limit puts all weight on the best-scoring memories, split evenly among exact ties."""
    scores = oracle.naive_scores(queries, memories, similarity)
    top = scores.max(dim=1, keepdim=True).values
    if separation == "polynomial":
        weights = oracle.naive_separation(scores, "polynomial")
    else:
        weights = oracle.naive_separation(beta * (scores - top), separation, alpha)
    best = (scores == top).double()
    limit = (best / best.sum(dim=1, keepdim=True)) @ values.double()
    return weights @ values.double(), limit, scores.argmax(dim=1)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_extreme_beta_and_scores_are_finite_and_exact(backend, combo):
    """beta 1e3, 1e8 and 1e30 (beta * score far past float32's range) on exact scores, with ties
    and duplicated memories, one-memory banks, d = 1, and scores near float32's maximum: the
    float64 oracle's output, the argmax limit once beta is large, never NaN. The sparse
    separations also take the fallback of an overflowing candidate buffer (2 entries)."""
    similarity, separation, alpha = combo
    gen = torch.Generator().manual_seed(12)
    huge = 2.0**60 if similarity != "manhattan" else 2.0**120  # scores ~1e37
    cases = [
        ("ties", _exact_problem(gen, 5, 37, 6, 3)),
        ("one memory", _exact_problem(gen, 3, 1, 4, 2)),
        ("d = 1", _exact_problem(gen, 4, 9, 1, 2)),
        ("scores near float32 max", _exact_problem(gen, 3, 11, 6, 2, scale=huge)),
    ]
    sparse = separation in ("sparsemax", "entmax")
    for name, (queries, memories, values) in cases:
        for beta in EXTREME_BETAS:
            kwargs = dict(beta=beta, similarity=similarity, separation=separation, alpha=alpha)
            expected, limit, first_best = _float64_expectation(queries, memories, values, **kwargs)
            for capacity in (256, 2) if sparse else (256,):
                out, info = run_backend(
                    backend, queries, memories, values, capacity=capacity, **kwargs
                )
                where = (name, beta, capacity)
                assert bool(torch.isfinite(out).all()), where
                assert rel_err(out, expected) < 1e-5, (where, rel_err(out, expected))
                if beta == 1e30 and separation != "polynomial":
                    assert rel_err(out, limit) < 1e-6, where
                assert torch.equal(info.argmax, first_best), where


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_scores_that_overflow_float32_give_the_limit(backend, separation):
    """beta * score = 1e30 * ~1e9 is +inf in float32 for every memory: the best one still takes
    all the weight (not a NaN from inf - inf, nor an even split over every overflowed score)."""
    memories = torch.tensor([[3.0e4], [3.2e4], [-3.0e4], [3.1e4]])
    queries = torch.tensor([[3.0e4], [-3.0e4]])
    values = torch.eye(4)
    for splits in (1, 3) if backend in FORCED_SPLITS else (None,):
        out, _ = run_backend(backend, queries, memories, values, beta=1e30, separation=separation,
                             splits=splits, return_info=False)  # fmt: skip
        if separation == "polynomial":  # relu(z)^10 normalised: beta cancels; row 2 is zero
            expected = oracle.naive_retrieve(queries, memories, values, separation=separation)
            assert rel_err(out, expected) < 1e-5
        else:
            assert torch.equal(out, torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0]])), splits


def test_a_split_whose_scores_are_all_minus_inf_adds_nothing(backend):
    """l2 scores of -1e30 * 1e9: -inf in float32 for a whole bank split and tile. The online
    softmax and the split merge shift such rows by 0 instead of computing exp(-inf - -inf)."""
    memories = torch.cat([torch.full((300, 2), 3.0e4), torch.zeros(5, 2)])
    values = torch.arange(305.0)[:, None]
    queries = torch.zeros(1, 2)
    for separation in ("softmax", "sparsemax", "entmax"):
        out, _ = run_backend(backend, queries, memories, values, beta=1e30, similarity="l2",
                             separation=separation, splits=2, return_info=False)  # fmt: skip
        # the mean of 300..304, to float32 rounding of the weights (1/5 is not a float; entmax's
        # threshold in the interpreter of triton 3.9 rounds the sum one ulp up)
        ulp = torch.finfo(torch.float32).eps * 302
        assert float((out - 302.0).abs().max()) <= 2 * ulp, (separation, out)
