"""Offsets past 2^31 elements: banks, values and queries whose rows lie 2^30 elements apart.

Triton hands an integer argument below 2^31 to a kernel as int32, so a row stride of 2^30 arrives
as int32 and row x stride wraps past 2^31 unless the kernel widens it first (a bank of 1e7 x 256
is past 2^31 elements). Each tensor here is a strided view into one reservation of its whole span
(``torch.empty``: pages never written cost no memory, and nothing here reads or writes outside the
view), with only its few rows written: megabytes of memory for about 40 GiB of address space.
Every backend must give the float64 oracle's answer on compact copies of the same values, forward
and backward, and so must the separation-loss kernel.
"""

import os

import pytest
import torch

import hen_fast
from hen_fast import oracle
from hen_fast.backends import cpu

from helpers import (
    COMBINATIONS,
    check_against_reference,
    combo_id,
    combo_kwargs,
    kernel_retrieve,
    rel_err,
)

ROW_STRIDE = 2**30
# The real allocator: the poisoned-buffer fixture's torch.empty would write every page of a span.
_EMPTY = torch.empty
HAS_CPU_KERNEL = cpu.load_extension()
# CI sets HEN_FAST_REQUIRE_EXT=1: there a missing extension fails the cpu cases, never skips them.
needs_cpu_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL and os.environ.get("HEN_FAST_REQUIRE_EXT") != "1",
    reason="the C++ extension is not built",
)
BACKENDS = ["triton", "torch", pytest.param("cpu", marks=needs_cpu_kernel)]
SPARSE = [c for c in COMBINATIONS if c[1] in ("sparsemax", "entmax")]

pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def spread(tensor: torch.Tensor, row_stride: int = ROW_STRIDE, col_stride: int = 1):
    """The values of ``tensor`` (rows x cols) in a view whose rows (or columns) lie ``row_stride``
    (``col_stride``) elements apart, in a reservation of exactly the span the view reaches."""
    rows, cols = tensor.shape
    span = _EMPTY((rows - 1) * row_stride + (cols - 1) * col_stride + 1, dtype=tensor.dtype)
    view = span.as_strided((rows, cols), (row_stride, col_stride))
    view.copy_(tensor)
    assert view.stride() == (row_stride, col_stride)
    return view


@pytest.fixture(scope="module")
def problem():
    """(compact, spread) versions of queries (3 x 5, float32), keys (4 x 5) and values (4 x 3)
    in float16: the last key and value rows start 3 * 2^30 elements (6 GiB) in, the last query
    row 2^31 elements (8 GiB) in."""
    gen = torch.Generator().manual_seed(2026)
    keys = torch.randn(4, 5, generator=gen).half()
    values = torch.randn(4, 3, generator=gen).half()
    queries = keys[:3].float() + 0.5 * torch.randn(3, 5, generator=gen)
    compact = (queries, keys, values)
    return compact, tuple(spread(t) for t in compact)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_two_to_the_30_apart(problem, backend, combo):
    (queries, keys, values), (far_queries, far_keys, far_values) = problem
    kwargs = combo_kwargs(combo)
    out, info = kernel_retrieve(
        backend, far_queries, far_keys, far_values, return_info=True, **kwargs
    )
    check_against_reference(out, info, queries, keys, values, **kwargs)


@pytest.mark.parametrize("combo", SPARSE, ids=combo_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_overflow_path_with_rows_two_to_the_30_apart(problem, backend, combo):
    """A candidate buffer of one slot and wide supports: the Newton passes over the bank and the
    full output pass read the far rows too."""
    (queries, keys, values), (far_queries, far_keys, far_values) = problem
    kwargs = dict(combo_kwargs(combo), beta=0.02)
    out, info = kernel_retrieve(
        backend, far_queries, far_keys, far_values, capacity=1, return_info=True, **kwargs
    )
    assert int(info.support.max()) > 1  # the buffer overflowed: the fallback ran
    check_against_reference(out, info, queries, keys, values, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
def test_columns_two_to_the_30_apart(problem, backend, similarity):
    """A column-major bank whose columns lie 2^30 elements apart: column x stride passes 2^31."""
    (queries, keys, values), _ = problem
    queries, keys = queries[:, :3], keys[:, :3]
    far_keys = spread(keys, row_stride=1, col_stride=ROW_STRIDE)
    kwargs = dict(beta=0.5, similarity=similarity, separation="softmax")
    out, info = kernel_retrieve(backend, queries, far_keys, values, return_info=True, **kwargs)
    check_against_reference(out, info, queries, keys, values, **kwargs)


@pytest.fixture(scope="module")
def float32_bank():
    """(compact, spread) keys (3 x 5) and values (3 x 4) in float32 (their gradients come back in
    float32): the last rows 2^31 elements (8 GiB) in."""
    gen = torch.Generator().manual_seed(7)
    compact = (torch.randn(3, 5, generator=gen), torch.randn(3, 4, generator=gen))
    return compact, tuple(spread(t) for t in compact)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_triton_gradients_with_rows_two_to_the_30_apart(float32_bank, combo):
    """The backward kernels (dx, dK, dV, entmax's slope pass) read and write the far rows: the
    gradients match autograd through the reference on compact copies (test_backward's rule)."""
    pytest.importorskip("triton")
    from test_backward import check_gradients

    _, (far_keys, far_values) = float32_bank
    gen = torch.Generator().manual_seed(11)
    queries = far_keys[:2].clone() + 0.5 * torch.randn(2, 5, generator=gen)
    # A small beta: supports of several memories, so no gradient is exactly 0 (float32 noise
    # on an exact 0 says nothing about the offsets).
    kwargs = dict(combo_kwargs(combo), beta=combo_kwargs(combo)["beta"] / 4, degree=3)
    check_gradients("triton", queries, far_keys, far_values, gen=gen, **kwargs)


@pytest.mark.parametrize("reduction", ["average", "max"])
def test_triton_separation_loss_with_rows_two_to_the_30_apart(reduction):
    pytest.importorskip("triton")
    from hen_fast.backends.triton.separation_loss import triton_row_stats
    from hen_fast.uhop import separation_loss
    from hen_fast.uhop.loss import torch_row_stats

    features = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    far = spread(features).requires_grad_()
    got = triton_row_stats(far.detach(), 1.5, want_sum=True, want_acc=True)
    want = torch_row_stats(features.double(), 1.5, want_sum=True, want_acc=True, block=2)
    assert bool((got[1] == want[1]).all())
    for ours, theirs in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):
        assert rel_err(ours, theirs) < 1e-5
    loss = separation_loss(far, 2.0, reduction, backend="triton")
    (grad,) = torch.autograd.grad(loss, far)
    exact = features.double().requires_grad_()
    want_loss = oracle.naive_separation_loss(exact, 2.0, reduction)
    (want_grad,) = torch.autograd.grad(want_loss, exact)
    assert rel_err(loss, want_loss, floor=1.0) < 1e-5
    assert rel_err(grad, want_grad) < 1e-5


def test_the_spans_are_reserved_not_touched(problem, float32_bank):
    """The reservations stay virtual: this process holds far less memory than they span."""
    spans = sum(t.untyped_storage().nbytes() for t in (*problem[1], *float32_bank[1]))
    assert spans > 30 * 2**30
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert resident < 4 * 2**30, resident


def test_hen_fast_retrieve_passes_the_far_rows_to_triton(problem):
    """Through the public API too (validation, finite checks), nothing copies the far rows."""
    (queries, keys, values), (far_queries, far_keys, far_values) = problem
    kwargs = dict(beta=0.5, similarity="l2", separation="entmax", alpha=1.5)
    out = hen_fast.retrieve(far_queries, far_keys, far_values, backend="triton", **kwargs)
    expected = oracle.naive_retrieve(queries, keys, values, **kwargs)
    assert rel_err(out, expected) < 1e-5
