"""retrieve (torch backend) against the independent float64 computation, for every combination."""

import math

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
    tolerance,
    value_scale,
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


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_float32_error_far_under_1e4(gen, combo, steps):
    queries, memories, values = random_problem(gen, dtype=torch.float32, same_dims=steps > 1)
    kwargs = combo_kwargs(combo)
    out = hen_fast.retrieve(queries, memories, values, steps=steps, **kwargs)
    expected = oracle.naive_retrieve(queries, memories, values, steps=steps, **kwargs)
    assert out.dtype == torch.float32
    # One update stays within a few float32 roundings; iterating the map can amplify them (up to
    # ~5e-5 after 3 sparsemax steps over 300 seeds x every combination), hence the looser bound.
    assert rel_err(out, expected, scale=value_scale(values)) < tolerance(steps=steps)


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


def test_without_tol_every_step_runs(gen):
    queries, memories, _ = random_problem(gen, same_dims=True)
    _, info = hen_fast.retrieve(queries, memories, steps=7, return_info=True)
    assert bool((info.steps == 7).all())


def test_single_query_returns_vector_and_scalar_info(gen):
    queries, memories, values = random_problem(gen)
    out, info = hen_fast.retrieve(queries[0], memories, values, return_info=True)
    batch, batch_info = hen_fast.retrieve(queries[:1], memories, values, return_info=True)
    assert out.shape == (values.shape[1],)
    assert torch.equal(out, batch[0])
    for field, batch_field in zip(info.as_tuple(), batch_info.as_tuple()):
        assert field.shape == () and field == batch_field[0]


@pytest.mark.parametrize(
    "query_dtype, bank_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
    ],
)
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax"])
def test_half_precision_inputs_accumulate_in_float32(gen, query_dtype, bank_dtype, separation):
    queries, memories, values = random_problem(gen)
    queries, memories, values = (
        queries.to(query_dtype),
        memories.to(bank_dtype),
        values.to(bank_dtype),
    )
    out = hen_fast.retrieve(queries, memories, values, beta=0.7, separation=separation)
    expected = oracle.naive_retrieve(queries, memories, values, beta=0.7, separation=separation)
    assert out.dtype == query_dtype
    # Only the output's rounding to the query dtype remains: the computation is float32.
    error = rel_err(out, expected, scale=value_scale(values))
    assert error < max(torch.finfo(query_dtype).eps, tolerance())


def test_polynomial_all_nonpositive_scores_give_zero(gen):
    memories = torch.rand(12, 5, generator=gen, dtype=torch.float64) + 0.1
    queries = torch.stack([-torch.rand(5, generator=gen, dtype=torch.float64), memories[3]])
    out, info = hen_fast.retrieve(
        queries, memories, separation="polynomial", degree=3, return_info=True
    )
    assert torch.equal(out[0], torch.zeros(5, dtype=torch.float64))
    assert info.support.tolist() == [0, 12] and info.lse[0] == -math.inf
    expected = oracle.naive_retrieve(queries, memories, separation="polynomial", degree=3)
    assert rel_err(out, expected) < 1e-12


def test_polynomial_huge_scores_do_not_overflow(gen):
    memories = 1e3 * torch.randn(20, 6, generator=gen)
    out = hen_fast.retrieve(memories[:4], memories, beta=1e4, separation="polynomial", degree=10)
    expected = oracle.naive_retrieve(
        memories[:4], memories, beta=1e4, separation="polynomial", degree=10
    )
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_argmax_ties_take_the_first_memory_across_chunks(gen, separation):
    memories = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    memories[2] *= 10  # the longest memory: it has the top dot product with itself
    memories[6] = memories[2]
    query = memories[2:3]
    for chunk_size in (1, 2, 4, 9):
        _, info = torch_backend.retrieve(
            query, memories, separation=separation, chunk_size=chunk_size, return_info=True
        )
        assert info.argmax.item() == 2


def test_weights_are_on_the_simplex(gen):
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
            p, info = hen_fast.retrieve(
                queries,
                memories,
                eye,
                beta=beta,
                separation=separation,
                alpha=alpha,
                return_info=True,
            )
            assert bool((p >= 0).all())
            total = p.sum(1)
            if separation == "polynomial":
                total = total[info.support > 0]
            assert (total - 1).abs().max() < 1e-6
