"""The CUDA backend (csrc/cuda): its registration, and its kernels' own paths against the float64
oracle (hen_fast.oracle): vector loads with a scalar tail, value slabs, candidate window
overflow, many query blocks and splits, threads, the op contract shared with the cpu kernel.
The contract shared by every backend is in test_conformance.py.

The kernel tests need a CUDA device and an extension built with CUDA (marked ``gpu``; skipped
elsewhere). Problems are drawn on the CPU, where the float64 oracle runs, and copied to the GPU in
random or chosen layouts (helpers.to_device): contiguous, padded rows (16-byte aligned or not, so
the vector loads' scalar tail and the scalar path both run), every other column, column-major;
skipped entries hold NaN.
"""

import pytest
import torch

import hen_fast
from hen_fast.backends import Request
from hen_fast.backends import cuda as cuda_backend

from helpers import (
    COMBINATIONS,
    check_against_reference,
    combo_id,
    combo_kwargs,
    poison_cuda_allocator,
    randint,
    random_problem,
    rel_err,
    to_device,
)

requires_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_backend.has_cuda_kernel()),
    reason="needs a CUDA device and hen_fast._C built with CUDA",
)


# -- registration: runs everywhere ---------------------------------------------------------


def test_registered_but_never_picked_by_auto():
    backend = cuda_backend.BACKEND
    assert "cuda" in hen_fast.backends.registered_backends()
    request = Request(torch.device("cuda"), (torch.float32,), False)
    assert backend.refusal(request) is None
    assert "auto does not pick it" in backend.refusal(request, auto=True)
    assert "cuda" not in hen_fast.available_backends("cuda")


def test_declines_what_it_cannot_compute():
    assert "CUDA tensors" in cuda_backend.check(
        Request(torch.device("cpu"), (torch.float32,), False)
    )
    float64 = Request(torch.device("cuda"), (torch.float32, torch.float64), False)
    assert "float64" in cuda_backend.check(float64)
    grad = Request(torch.device("cuda"), (torch.float32,), True)
    assert "backward" in cuda_backend.check(grad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_named_without_a_gpu_raises_with_a_hint():
    with pytest.raises(hen_fast.BackendUnavailableError, match="CUDA GPU"):
        hen_fast.retrieve(torch.randn(2, 3), torch.randn(4, 3), backend="cuda")


# -- kernels: a CUDA device and a CUDA build ------------------------------------------------


@pytest.mark.gpu
@requires_kernel
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["aligned_padded", "padded", "contiguous"])
def test_vector_loads_with_a_tail(gen, bank_dtype, layout):
    """d and dv odd, so never a multiple of a 16-byte piece: rows padded to 16 bytes take the
    vector path plus a scalar tail; odd row strides (contiguous rows of odd d) the scalar path."""
    dim, value_dim = randint(gen, 9, 31) | 1, randint(gen, 9, 45) | 1
    queries = torch.randn(randint(gen, 1, 20), dim, generator=gen)
    memories = torch.randn(randint(gen, 300, 4000), dim, generator=gen).to(bank_dtype)
    values = torch.randn(memories.shape[0], value_dim, generator=gen).to(bank_dtype)
    for separation in ("softmax", "sparsemax", "entmax"):
        kwargs = dict(beta=0.5, separation=separation, similarity="l2")
        out, info = hen_fast.retrieve(
            to_device(queries, "cuda", gen),
            to_device(memories, "cuda", gen, layout),
            to_device(values, "cuda", gen, layout),
            backend="cuda",
            return_info=True,
            **kwargs,
        )
        expected = hen_fast.oracle.naive_retrieve(queries, memories, values, **kwargs)
        assert rel_err(out.cpu(), expected) < 1e-5


@pytest.mark.gpu
@requires_kernel
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("separation", ["softmax", "polynomial", "sparsemax"])
def test_wide_values_in_slabs(gen, bank_dtype, separation):
    """More value columns than one launch accumulates (1024 float32 / 2048 16-bit when rows are
    16-byte aligned, 256 when not): the bank is scored once per slab of columns."""
    value_dim = 2100 if bank_dtype == torch.bfloat16 else randint(gen, 1030, 1500)
    queries = torch.randn(randint(gen, 1, 9), 40, generator=gen)
    memories = torch.randn(randint(gen, 100, 2000), 40, generator=gen).to(bank_dtype)
    values = torch.randn(memories.shape[0], value_dim, generator=gen).to(bank_dtype)
    kwargs = dict(beta=0.3, separation=separation)
    for layout in ("aligned_padded", "padded"):
        poison_cuda_allocator()
        out, info = hen_fast.retrieve(
            to_device(queries, "cuda", gen),
            to_device(memories, "cuda", gen),
            to_device(values, "cuda", gen, layout),
            backend="cuda",
            return_info=True,
            **kwargs,
        )
        check_against_reference(
            out.cpu(), info, queries, memories, values, backend="cuda", **kwargs
        )


@pytest.mark.gpu
@requires_kernel
@pytest.mark.parametrize(
    "separation, alpha", [("sparsemax", 1.5), ("entmax", 1.5), ("entmax", 1.3)]
)
@pytest.mark.parametrize("capacity", [1, 3, None])
def test_sparse_overflow_falls_back_exactly(gen, separation, alpha, capacity):
    """Tiny buffers overflow; with the default buffer, a small beta puts every memory within 1 of
    the top score, so the window outgrows the 2048 entries a block sorts. Newton passes over the
    bank finish those rows."""
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, max_queries=20, max_memories=6000
    )
    memories = torch.cat([memories, torch.randn(3000, memories.shape[1], generator=gen)])
    values = torch.cat([values, torch.randn(3000, values.shape[1], generator=gen)])
    kwargs = dict(beta=0.01, similarity="dot", separation=separation, alpha=alpha)
    out, info = cuda_backend.retrieve(
        to_device(queries, "cuda", gen),
        to_device(memories, "cuda", gen),
        to_device(values, "cuda", gen),
        return_info=True,
        capacity=capacity,
        **kwargs,
    )
    if capacity is None:
        scores = (
            (hen_fast.numerics.separation_alpha(separation, alpha) - 1)
            * kwargs["beta"]
            * hen_fast.oracle.naive_scores(queries, memories, "dot")
        )
        assert memories.shape[0] > 2048
        assert bool((scores.max(1).values - scores.min(1).values < 1).all())
    else:
        assert int(info.support.max()) > capacity
    check_against_reference(out.cpu(), info, queries, memories, values, backend="cuda", **kwargs)


@pytest.mark.gpu
@requires_kernel
def test_many_queries_and_splits(gen):
    """Past 64 queries (many query blocks) and banks over many splits."""
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, max_queries=200, max_memories=40000
    )
    for separation in ("softmax", "entmax", "polynomial"):
        kwargs = dict(beta=0.5, separation=separation)
        out, info = cuda_backend.retrieve(
            to_device(queries, "cuda", gen),
            to_device(memories, "cuda", gen),
            to_device(values, "cuda", gen),
            return_info=True,
            capacity=randint(gen, 1, 300),
            **kwargs,
        )
        check_against_reference(
            out.cpu(), info, queries, memories, values, backend="cuda", **kwargs
        )


@pytest.mark.gpu
@requires_kernel
def test_dimension_limit_is_a_clear_error():
    queries, memories = torch.randn(2, 2049, device="cuda"), torch.randn(5, 2049, device="cuda")
    with pytest.raises(ValueError, match="d <= 2048"):
        hen_fast.retrieve(queries, memories, backend="cuda")


@pytest.mark.gpu
@requires_kernel
def test_threads_calling_concurrently(gen):
    from concurrent.futures import ThreadPoolExecutor

    queries, memories, values = (
        t.cuda() for t in random_problem(gen, dtype=torch.float32, max_memories=5000)
    )
    kwargs = dict(beta=0.5, separation="sparsemax", similarity="l2")
    expected = hen_fast.retrieve(queries, memories, values, backend="cuda", **kwargs)

    def call(_):
        out = hen_fast.retrieve(queries, memories, values, backend="cuda", **kwargs)
        torch.cuda.current_stream().synchronize()
        return out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(8)))
    # Deterministic: candidate windows are sorted with ties by index, reductions in fixed order.
    assert all(torch.equal(r, expected) for r in results)


@pytest.mark.gpu
@requires_kernel
def test_opcheck():
    """Schema, fake (meta) kernel and dispatcher registration agree with the CUDA kernel."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=generator).cuda()
    keys = torch.randn(700, 8, generator=generator).cuda()
    values = torch.randn(700, 3, generator=generator).cuda()
    norms = keys.pow(2).sum(1)
    op = torch.ops.hen_fast.retrieve_step.default
    for similarity, separation, alpha in [(0, 0, 2.0), (1, 2, 2.0), (2, 2, 1.5), (0, 1, 2.0)]:
        args = (x, keys, norms if similarity == 1 else None, values, 0.5, similarity, separation)
        torch.library.opcheck(op, (*args, alpha, 3.0, 64, True))


@pytest.mark.gpu
@requires_kernel
@pytest.mark.parametrize("beta_scale", [1.0, 1e30], ids=["beta", "beta1e30"])
@pytest.mark.parametrize("capacity", [2, 4096], ids=["overflow", "window"])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_every_output_equals_the_cpu_op(gen, combo, capacity, beta_scale):
    """One op contract: the CUDA kernel's five outputs mean what the CPU kernel's mean,
    the threshold (relative to the row maximum) included, also at beta = 1e30 and on the sparse
    Newton fallback."""
    from hen_fast import codes
    from hen_fast.backends import cpu

    queries, memories, values = random_problem(gen, dtype=torch.float32)
    kwargs = combo_kwargs(combo)
    similarity, separation = kwargs["similarity"], kwargs["separation"]
    alpha = kwargs["alpha"] if separation == "entmax" else 2.0

    def op(device):
        return torch.ops.hen_fast.retrieve_step(
            queries.contiguous().to(device), memories.to(device), None, values.to(device),
            kwargs["beta"] * beta_scale, codes.similarity_code(similarity),
            codes.separation_code(separation), alpha, 3.0, capacity, True,
        )  # fmt: skip

    assert cpu.load_extension()
    want, got = op("cpu"), [t.cpu() for t in op("cuda")]
    scale = float(values.abs().max())
    assert rel_err(got[0], want[0], scale=scale) < 1e-5  # out
    assert int((got[1] - want[1]).abs().max()) <= 2  # support: rounding at a threshold
    assert torch.equal(got[2], want[2])  # argmax (first index on ties)
    for name, index in (("lse", 3), ("threshold", 4)):
        finite = torch.isfinite(want[index])
        assert torch.equal(torch.isfinite(got[index]), finite), name
        assert torch.equal(got[index][~finite], want[index][~finite]), name
        assert rel_err(got[index][finite], want[index][finite], floor=1.0) < 1e-5, name
