"""The kernel memory network baseline: fixed points, the update by hand, bad input."""

import math

import pytest
import torch

from hen_fast.kmn import KernelMemoryNetwork

from helpers import randint, rel_err


def test_stored_patterns_are_fixed_points(gen):
    count, dim = randint(gen, 3, 40), randint(gen, 5, 30)
    memories = torch.rand(count, dim, generator=gen)
    kmn = KernelMemoryNetwork(memories, beta=1.0)
    assert rel_err(kmn.recall(memories, steps=3), memories) < 1e-6
    assert torch.equal(kmn.recall_indices(memories), torch.arange(count))


def test_update_by_hand():
    # Two memories at distance 2 on a line; scale 2, beta 1, power 1: k = exp(-|x - y| / 2).
    memories = torch.tensor([[0.0], [2.0]])
    kmn = KernelMemoryNetwork(memories, beta=1.0, scale=2.0, power=1.0)
    e = math.exp(-1.0)
    gram_inverse = torch.tensor([[1.0, -e], [-e, 1.0]], dtype=torch.float64) / (1 - e * e)
    x = 0.5  # k(Xi, x) = [exp(-0.25), exp(-0.75)]
    row = torch.tensor([[math.exp(-0.25), math.exp(-0.75)]], dtype=torch.float64)
    expected = row @ gram_inverse @ memories.double()
    assert kmn.recall(torch.tensor([[x]])).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kmn.scale == 2.0


def test_default_scale_is_the_median_distance():
    memories = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # distances 5, 5, 10
    assert KernelMemoryNetwork(memories).scale == pytest.approx(5.0)


def test_noisy_cues_return_to_their_memories(gen):
    memories = torch.randn(20, 50, generator=gen)
    cues = memories + 0.1 * torch.randn(20, 50, generator=gen)
    kmn = KernelMemoryNetwork(memories, beta=4.0)
    assert torch.equal(kmn.recall_indices(cues, steps=2), torch.arange(20))


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        KernelMemoryNetwork(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="floating-point"):
        KernelMemoryNetwork(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        KernelMemoryNetwork(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="beta"):
        KernelMemoryNetwork(torch.eye(3), beta=0.0)
    with pytest.raises(ValueError, match="power"):
        KernelMemoryNetwork(torch.eye(3), power=3.0)
    kmn = KernelMemoryNetwork(torch.eye(3))
    with pytest.raises(ValueError, match="d=3"):
        kmn.recall(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="steps"):
        kmn.recall(torch.zeros(2, 3), steps=0)
