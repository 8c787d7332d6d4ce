"""Sparse separations against the entmax package and closed forms; limits in alpha."""

import entmax
import pytest
import torch

from hen_fast import numerics, oracle
from hen_fast.backends import torch_backend

from helpers import randint, random_problem, rel_err


def _weights(
    queries, memories, chunk_size=None, candidates=torch_backend.DEFAULT_CANDIDATES, **kwargs
):
    """The weight vectors themselves: with identity values the output is p."""
    eye = torch.eye(memories.shape[0], dtype=memories.dtype)
    out, _ = torch_backend.retrieve(
        queries, memories, eye, chunk_size=chunk_size, candidates=candidates, **kwargs
    )
    return out


def _scores(queries, memories, beta):
    return beta * oracle.naive_scores(queries, memories, "dot")


@pytest.mark.parametrize("beta", [0.05, 0.5, 5.0])
@pytest.mark.parametrize(
    "separation, alpha, package",
    [
        ("sparsemax", 2.0, lambda z, a: entmax.sparsemax(z, dim=-1)),
        ("entmax", 1.5, lambda z, a: entmax.entmax15(z, dim=-1)),
        ("entmax", 1.2, lambda z, a: entmax.entmax_bisect(z, alpha=a, dim=-1, n_iter=100)),
        ("entmax", 1.7, lambda z, a: entmax.entmax_bisect(z, alpha=a, dim=-1, n_iter=100)),
    ],
    ids=["sparsemax", "entmax15", "bisect1.2", "bisect1.7"],
)
def test_matches_entmax_package(gen, beta, separation, alpha, package):
    queries, memories, _ = random_problem(gen)
    expected = package(_scores(queries, memories, beta), alpha)
    chunk = randint(gen, 1, memories.shape[0])
    for kwargs in ({}, {"chunk_size": chunk, "candidates": randint(gen, 1, 5)}):
        p = _weights(queries, memories, beta=beta, separation=separation, alpha=alpha, **kwargs)
        assert rel_err(p, expected) < 1e-10, kwargs
    naive = oracle.naive_separation(_scores(queries, memories, beta), separation, alpha)
    assert rel_err(naive, expected) < 1e-10


def test_sparsemax_closed_form_on_two_memories(gen):
    """For two scores, sparsemax is p1 = clip((1 + z1 - z2) / 2, 0, 1)."""
    memories = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    queries = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    z = queries @ memories.T
    expected_first = ((1 + z[:, 0] - z[:, 1]) / 2).clamp(0, 1)
    p = _weights(queries, memories, separation="sparsemax")
    assert rel_err(p[:, 0], expected_first) < 1e-14


def test_entmax15_closed_form_on_two_memories(gen):
    """For two scores with d = (z1 - z2) / 2 (in (alpha-1) z units) and both in the support,
    (d - tau')^2 + tau'^2 = 1 gives p1 = ((d + sqrt(2 - d^2)) / 2)^2."""
    memories = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    queries = 0.3 * torch.randn(50, 3, generator=gen, dtype=torch.float64)
    z = queries @ memories.T
    d = ((z[:, 0] - z[:, 1]) / 2).abs()
    both = d < 1
    expected_top = torch.where(both, ((d + torch.sqrt(2 - d * d)) / 2) ** 2, torch.ones_like(d))
    p = _weights(queries, memories, separation="entmax", alpha=1.5)
    assert rel_err(p.max(dim=1).values, expected_top) < 1e-14


def test_softmax_is_softmax(gen):
    queries, memories, _ = random_problem(gen)
    expected = torch.softmax(_scores(queries, memories, 0.8), dim=-1)
    for chunk_size in (1, 3, None):
        p = _weights(queries, memories, beta=0.8, separation="softmax", chunk_size=chunk_size)
        assert rel_err(p, expected) < 1e-14


def test_alpha_to_one_tends_to_softmax(gen):
    queries, memories, _ = random_problem(gen)
    softmax = _weights(queries, memories, separation="softmax")
    gaps = [
        rel_err(_weights(queries, memories, separation="entmax", alpha=a), softmax)
        for a in (1.3, 1.1, 1.01, 1.001, 1.0001)
    ]
    assert gaps == sorted(gaps, reverse=True)
    # The gap shrinks linearly in alpha - 1 (a tenth per decade; at most 0.107 over 200 seeds).
    assert gaps[3] < 0.2 * gaps[2] and gaps[4] < 0.2 * gaps[3]
    assert gaps[4] < 2e-3


def test_alpha_two_is_sparsemax(gen):
    queries, memories, _ = random_problem(gen)
    sparsemax = _weights(queries, memories, separation="sparsemax")
    assert torch.equal(_weights(queries, memories, separation="entmax", alpha=2.0), sparsemax)
    # Approaching 2 through the general (Newton) threshold solver, streamed in chunks too.
    for kwargs in ({}, {"chunk_size": 2, "candidates": 1}):
        near = _weights(queries, memories, separation="entmax", alpha=2 - 1e-9, **kwargs)
        assert rel_err(near, sparsemax) < 1e-7


def test_newton_threshold_iterations_are_few(gen):
    """The monotone Newton solve settles the threshold in a handful of passes over the bank."""
    z = 3 * torch.randn(8, 500, generator=gen, dtype=torch.float64)
    calls = []
    for alpha in (1.05, 1.3, 1.5, 1.9, 2.0):
        x = (alpha - 1) * z
        sums = numerics.row_sums(x, 1 / (alpha - 1))
        counting = lambda tau, top, sums=sums: calls.append(1) or sums(tau, top)  # noqa: E731
        calls.clear()
        top = x.max(dim=1).values
        tau = numerics.newton_threshold(counting, top, top - 1, alpha)
        mass = (torch.relu(x - tau[:, None]) ** (1 / (alpha - 1))).sum(1)
        assert (mass - 1).abs().max() < 1e-12
        assert len(calls) <= 15, (alpha, len(calls))
