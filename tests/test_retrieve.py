"""The torch backend's own paths against the independent float64 computation, for every
combination: float64 (the one backend that computes in it), chunked streaming and its candidate
buffer, tol skipping the work of converged queries. The contract shared by every backend is in
test_conformance.py."""

import pytest
import torch

import hen_fast
from hen_fast import oracle
from hen_fast.backends import torch_backend

from helpers import (
    COMBINATIONS,
    combo_id,
    combo_kwargs,
    randint,
    random_problem,
    rel_err,
)


def _assert_info_equal(info, expected, lse_tol):
    assert torch.equal(info.steps, expected.steps)
    assert torch.equal(info.argmax, expected.argmax)
    assert torch.equal(info.support, expected.support)
    finite = torch.isfinite(expected.lse)
    assert torch.equal(torch.isfinite(info.lse), finite)
    assert torch.equal(info.lse[~finite], expected.lse[~finite].to(info.lse.dtype))
    assert rel_err(info.lse[finite], expected.lse[finite], floor=1.0) < lse_tol


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_float64_matches_independent_computation(gen, combo, steps):
    queries, memories, values = random_problem(gen, same_dims=steps > 1)
    if steps > 1:
        values = None if randint(gen, 0, 1) else values
    kwargs = combo_kwargs(combo)
    out, info = hen_fast.retrieve(
        queries, memories, values, steps=steps, return_info=True, backend="torch", **kwargs
    )
    expected, expected_info = oracle.naive_retrieve(
        queries, memories, values, steps=steps, return_info=True, **kwargs
    )
    assert out.dtype == torch.float64
    assert rel_err(out, expected) < 1e-9
    _assert_info_equal(info, expected_info, 1e-9)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_chunked_equals_dense(gen, combo):
    queries, memories, values = random_problem(gen, max_queries=6)
    num_memories = memories.shape[0]
    kwargs = combo_kwargs(combo)
    dense, dense_info = torch_backend.retrieve(
        queries, memories, values, chunk_size=num_memories, return_info=True, **kwargs
    )
    # 1, a size that does not divide M, and random ones; few candidates force the Newton passes.
    sizes = {1, randint(gen, 2, num_memories - 1), randint(gen, 2, num_memories)}
    sizes.add(next(c for c in range(num_memories - 1, 1, -1) if num_memories % c))
    for chunk_size in sorted(sizes):
        for candidates in (1, randint(gen, 2, 8), 256):
            out, info = torch_backend.retrieve(
                queries,
                memories,
                values,
                chunk_size=chunk_size,
                candidates=candidates,
                return_info=True,
                **kwargs,
            )
            assert rel_err(out, dense) < 1e-12, (chunk_size, candidates)
            _assert_info_equal(info, dense_info, 1e-12)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_multistep_with_tol_clamp_and_chunks(gen, combo):
    queries, memories, _ = random_problem(gen, same_dims=True)
    mask = torch.rand(queries.shape[1], generator=gen) < 0.3
    kwargs = dict(combo_kwargs(combo), steps=6, tol=1e-3, clamp_mask=mask)
    out, info = torch_backend.retrieve(
        queries,
        memories,
        chunk_size=randint(gen, 1, 20),
        candidates=randint(gen, 1, 4),
        return_info=True,
        **kwargs,
    )
    expected, expected_info = oracle.naive_retrieve(queries, memories, return_info=True, **kwargs)
    assert rel_err(out, expected) < 1e-9
    _assert_info_equal(info, expected_info, 1e-9)
    assert torch.equal(out[:, mask], queries[:, mask])


def test_tol_stops_converged_queries_and_skips_their_work(gen, monkeypatch):
    memories = torch.randn(40, 32, generator=gen, dtype=torch.float64)
    # Half the queries start on a memory (a fixed point at this beta), half far from all.
    queries = torch.cat(
        [memories[:4], 0.05 * torch.randn(4, 32, generator=gen, dtype=torch.float64)]
    )
    rows_computed = []
    original = torch_backend._one_step

    def counting(x, *args, **kwargs):
        rows_computed.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "_one_step", counting)
    out, info = hen_fast.retrieve(
        queries, memories, beta=8.0, similarity="l2", steps=50, tol=1e-9, return_info=True
    )
    assert info.steps[:4].max() <= 2
    assert rows_computed[0] == 8 and rows_computed[-1] < 8
    assert sum(rows_computed) == int(info.steps.sum())
    assert rel_err(out[:4], memories[:4]) < 1e-5  # softmax leaves e^(-beta d^2) of the rest
