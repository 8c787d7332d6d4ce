"""Extremes on every backend: beta up to 1e30 and past float32's range, scores beyond float32's
range, ties, duplicated memories, one-memory banks, d = 1, non-finite inputs. Expected: the
float64 oracle (hen_fast.oracle.naive_retrieve) on the same inputs, or its limit, never a silent
NaN.

Inputs of the fuzz test lie on an integer grid times a power of two, so that float32 similarities
are exact: the backends and the oracle then see the same scores, and any difference is the
backends' own error (not float32's conditioning at huge beta).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hen_fast
from hen_fast.oracle import naive_retrieve, naive_scores

BACKENDS = [name for name in ("torch", "cpu", "triton") if name in hen_fast.available_backends()]
# (backend, memory_cap): in memory, and streamed in chunks of two memories where it applies.
PATHS = [(name, None) for name in BACKENDS] + [
    (name, "chunks") for name in ("torch", "cpu") if name in BACKENDS
]
CASES = [
    (similarity, separation)
    for similarity in ("dot", "l2", "manhattan")
    for separation in ("softmax", "sparsemax", "entmax", "polynomial")
    if separation != "polynomial" or similarity == "dot"
]
FLOAT32_MAX = torch.finfo(torch.float32).max


def _call(path, queries, keys, values, **kwargs):
    backend, cap = path
    if cap == "chunks":
        row = keys.shape[1] * keys.element_size() + values.shape[1] * values.element_size()
        kwargs["memory_cap"] = 2 * row
    return hen_fast.retrieve(queries, keys, values, backend=backend, **kwargs)


def _limit(queries, keys, values, similarity):
    """All weight on the best-scoring memory, split evenly among exact ties (float64)."""
    scores = naive_scores(queries, keys, similarity)
    best = scores == scores.max(dim=1, keepdim=True).values
    weights = best.double() / best.sum(dim=1, keepdim=True)
    return weights @ values.double()


@pytest.mark.parametrize("beta", [1e30, 1e39, 1e300])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p[0]}-{p[1] or 'memory'}")
@pytest.mark.parametrize("similarity,separation", CASES)
def test_huge_beta_gives_the_limit(path, similarity, separation, beta, gen):
    """Every sparse call at beta = 1e30 was NaN on torch and cpu; past float32's range (1e39,
    1e300) beta itself became inf in float32 arithmetic and inf * 0 NaN at the maximum."""
    queries = torch.randn(5, 6, generator=gen)
    keys = torch.randn(9, 6, generator=gen)
    keys[4] = keys[1]  # a duplicated memory: an exact tie when it is the best
    queries[0] = keys[1]
    values = torch.randn(9, 3, generator=gen)
    alpha = 1.3 if separation == "entmax" else 1.5
    out, info = _call(path, queries, keys, values, beta=beta, similarity=similarity,
                      separation=separation, alpha=alpha, return_info=True)  # fmt: skip
    assert torch.isfinite(out).all()
    if separation == "polynomial":  # beta cancels: the oracle at beta 1
        expected = naive_retrieve(queries, keys, values, beta=1.0, separation="polynomial")
    else:
        expected = _limit(queries, keys, values, similarity)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if separation in ("sparsemax", "entmax"):
        assert (info.support >= 1).all()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p[0]}-{p[1] or 'memory'}")
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax"])
def test_similarities_beyond_float32_tie_at_the_top(path, separation):
    """Similarities that overflow float32 (3e40 and 6e40) cannot be told apart: they share the
    weight evenly, the memory of similarity 1 gets none; finite output, no NaN."""
    queries = torch.tensor([[2e20]])
    keys = torch.tensor([[1.5e20], [3e20], [5e-21]])
    values = torch.tensor([[1.0], [3.0], [100.0]])
    out = _call(path, queries, keys, values, beta=1.0, separation=separation)
    assert out.item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p[0]}-{p[1] or 'memory'}")
@pytest.mark.parametrize("similarity,separation", CASES)
def test_one_memory_and_d_1(path, similarity, separation):
    queries = torch.tensor([[3.0], [-2.0]])
    keys, values = torch.tensor([[1e19]]), torch.tensor([[7.0, -1.0]])
    out = _call(path, queries, keys, values, beta=1e30, similarity=similarity,
                separation=separation)  # fmt: skip
    if separation == "polynomial":  # the second query scores < 0: zero weights, zero output
        expected = torch.tensor([[7.0, -1.0], [0.0, 0.0]])
    else:
        expected = values.expand(2, -1)
    torch.testing.assert_close(out, expected)


@st.composite
def problems(draw):
    similarity, separation = draw(st.sampled_from(CASES))
    num_memories = draw(st.integers(1, 7))
    dim = draw(st.integers(1, 4))
    exponent = draw(st.integers(-8, 58))  # entries up to 4 * 2^58 ~ 1e18: similarities < 3e38
    grid = st.integers(-4, 4)
    queries = [[draw(grid) for _ in range(dim)] for _ in range(draw(st.integers(1, 3)))]
    keys = [[draw(grid) for _ in range(dim)] for _ in range(num_memories)]
    if num_memories > 1 and draw(st.booleans()):
        keys[-1] = list(keys[0])  # duplicated memory
    if draw(st.booleans()):
        queries[0] = list(keys[-1])  # a query on a memory
    return dict(
        similarity=similarity,
        separation=separation,
        alpha=draw(st.sampled_from([1.25, 1.5, 1.75])),
        beta=10 ** draw(st.floats(-3, 30)),
        scale=2.0**exponent,
        queries=queries,
        keys=keys,
        values=[[draw(st.integers(-3, 3)) for _ in range(2)] for _ in range(num_memories)],
        steps=draw(st.sampled_from([1, 3])),
        path=draw(st.sampled_from(PATHS)),
    )


@settings(max_examples=60, derandomize=True, deadline=None)
@given(problems())
def test_fuzz_against_the_float64_oracle(problem):
    scale = problem["scale"]
    queries = torch.tensor(problem["queries"], dtype=torch.float32) * scale
    keys = torch.tensor(problem["keys"], dtype=torch.float32) * scale
    steps = problem["steps"]
    values = keys if steps > 1 else torch.tensor(problem["values"], dtype=torch.float32)
    kwargs = {name: problem[name] for name in ("beta", "similarity", "separation", "alpha")}
    kwargs["steps"] = steps
    out, info = _call(problem["path"], queries, keys, values, return_info=True, **kwargs)
    assert torch.isfinite(out).all()
    if problem["separation"] in ("sparsemax", "entmax"):
        assert (info.support >= 1).all()
    expected = naive_retrieve(queries, keys, values, **kwargs)
    value_scale = values.abs().max().item() or 1.0
    # Several steps feed float32 outputs back: comparable when every step is well determined
    # (scores exact on the grid); else only finiteness and the convex hull are checked.
    if steps == 1 or _every_step_on_the_grid(expected, values):
        error = (out.double() - expected).abs().max().item() / value_scale
        assert error <= 1e-4, (error, out, expected)
    else:
        assert (out.abs() <= value_scale * (1 + 1e-5)).all()


def _every_step_on_the_grid(expected, values):
    """Whether the result is one of the memories (the limit regime), so each step was exact."""
    rows = (expected[:, None, :] == values.double()[None]).all(dim=2).any(dim=1)
    return bool(rows.all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["queries", "memories", "values"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs(backend, where, bad, gen):
    """check_finite=True raises naming the argument; False never crashes, and rows untouched by
    the bad value are the clean result."""
    queries = torch.randn(3, 4, generator=gen)
    keys, values = torch.randn(6, 4, generator=gen), torch.randn(6, 2, generator=gen)
    clean = hen_fast.retrieve(queries, keys, values, backend=backend, separation="sparsemax")
    target = {"queries": queries, "memories": keys, "values": values}[where]
    target[0, 0] = bad
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        hen_fast.retrieve(queries, keys, values, backend=backend, separation="sparsemax")
    out = hen_fast.retrieve(queries, keys, values, backend=backend, separation="sparsemax",
                            check_finite=False)  # fmt: skip
    assert out.shape == (3, 2)
    if where == "queries":
        if bad != bad:  # NaN: the query's row is NaN, never a silent number
            assert torch.isnan(out[0]).all()
        torch.testing.assert_close(out[1:], clean[1:])


@pytest.mark.parametrize("backend", [name for name in ("torch", "cpu") if name in BACKENDS])
@pytest.mark.parametrize("similarity,separation", CASES)
def test_gradient_at_beta_1e30_has_no_nan(backend, similarity, separation, gen):
    """At the limit the weights are constant: the gradient is finite (0 for the scores; the
    values' gradient puts dout on the best memory)."""
    queries = torch.randn(3, 5, generator=gen, requires_grad=True)
    keys = torch.randn(7, 5, generator=gen, requires_grad=True)
    values = torch.randn(7, 2, generator=gen, requires_grad=True)
    out = hen_fast.retrieve(queries, keys, values, beta=1e30, similarity=similarity,
                            separation=separation, backend=backend)  # fmt: skip
    out.sum().backward()
    for tensor in (queries, keys, values):
        assert torch.isfinite(tensor.grad).all()
    if separation != "polynomial":
        expected = torch.zeros_like(values)
        best = naive_scores(queries.detach(), keys.detach(), similarity).argmax(dim=1)
        expected.index_add_(0, best, torch.ones(3, 2))
        torch.testing.assert_close(values.grad, expected)
