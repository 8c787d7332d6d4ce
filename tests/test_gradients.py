"""float64 gradcheck through every separation and similarity, dense and streamed."""

import pytest
import torch

from hen_fast import retrieve
from hen_fast.backends import torch_backend

from helpers import BETA, COMBINATIONS, combo_id, randint


def _problem(gen):
    """Small float64 leaves: queries (B, d), memories (M, d), values (M, dv)."""
    dim, value_dim = randint(gen, 2, 5), randint(gen, 1, 4)
    num_memories = randint(gen, 3, 8)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return make(randint(gen, 1, 3), dim), make(num_memories, dim), make(num_memories, value_dim)


@pytest.mark.parametrize("streamed", [False, True], ids=["dense", "streamed"])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_gradcheck(gen, combo, streamed):
    similarity, separation, alpha = combo
    queries, memories, values = _problem(gen)
    options = dict(chunk_size=2, candidates=1) if streamed else {}

    def fn(q, k, v):
        out, _ = torch_backend.retrieve(
            q,
            k,
            v,
            beta=BETA[similarity],
            similarity=similarity,
            separation=separation,
            alpha=alpha,
            degree=3,
            **options,
        )
        return out

    assert torch.autograd.gradcheck(fn, (queries, memories, values), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_gradcheck_through_steps_and_clamp(gen, separation):
    queries, memories, _ = _problem(gen)
    mask = torch.zeros(queries.shape[1], dtype=torch.bool)
    mask[0] = True

    def fn(q, k):
        return retrieve(
            q, k, beta=0.5, separation=separation, alpha=1.3, degree=3, steps=3, clamp_mask=mask
        )

    assert torch.autograd.gradcheck(fn, (queries, memories), eps=1e-6, atol=1e-7)


def test_sparse_gradient_is_the_entmax_jacobian(gen):
    """Against autograd through the entmax package's own sparsemax/entmax15 backward."""
    import entmax

    queries, memories, values = _problem(gen)
    upstream = torch.randn(queries.shape[0], values.shape[1], generator=gen, dtype=torch.float64)
    for separation, package in (("sparsemax", entmax.sparsemax), ("entmax", entmax.entmax15)):
        ours = torch.autograd.grad(
            (retrieve(queries, memories, values, separation=separation) * upstream).sum(),
            (queries, memories, values),
        )
        theirs = torch.autograd.grad(
            ((package(queries @ memories.T, dim=-1) @ values) * upstream).sum(),
            (queries, memories, values),
        )
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
