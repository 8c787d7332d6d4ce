"""hen_fast.metrics against values worked out by hand."""

import math
import warnings

import pytest
import torch

from hen_fast import metrics


def test_mse_per_image():
    truth = torch.zeros(2, 1, 2, 2)
    recalled = truth.clone()
    recalled[0, 0, 0, 1] = 1.0  # one of four pixels off by 1
    recalled[1] = 0.5  # every pixel off by 0.5
    assert metrics.mse(recalled, truth).tolist() == [0.25, 0.25]


@pytest.mark.parametrize("size", [28, 8, 5])
def test_one_minus_ssim_of_constant_images(size):
    # Constant images have no variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = 0.01^2.
    a, b = 0.2, 0.6
    recalled = torch.full((1, 3, size, size), a)
    truth = torch.full((1, 3, size, size), b)
    c1 = 0.01**2
    expected = 1 - (2 * a * b + c1) / (a * a + b * b + c1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a window larger than the image would warn
        got = metrics.one_minus_ssim(recalled, truth)
    assert got.shape == (1,)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    assert metrics.one_minus_ssim(truth, truth).abs().max() < 1e-6


def test_ssim_window_fits_the_image():
    assert metrics.ssim_window(28, 28) == 11
    assert metrics.ssim_window(8, 8) == 7
    assert metrics.ssim_window(4, 9) == 3
    assert metrics.ssim_window(1, 1) == 1
    with pytest.raises(ValueError, match="too small"):
        metrics.ssim_window(0, 4)


def test_identity_and_exact_recall():
    stored = torch.eye(4).reshape(4, 1, 2, 2)
    recalled = stored[[2, 0, 3]] + 0.1  # near memories 2, 0, 3
    found = metrics.nearest_identity(recalled, stored, chunk=2)
    assert found.tolist() == [2, 0, 3]
    assert metrics.exact_recall(found, torch.tensor([2, 1, 3])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predicted and expected"):
        metrics.exact_recall(found, torch.tensor([1, 2]))


def test_relative_rank_counts_collapsed_states():
    memories = torch.eye(3)
    states = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])  # two queries share a state
    assert metrics.relative_rank(states, memories) == pytest.approx(2 / 3)
    assert metrics.relative_rank(memories, memories) == 1.0
    with pytest.raises(ValueError, match="rank 0"):
        metrics.relative_rank(states, torch.zeros(3, 3))


def test_relative_rank_over_steps_collapses_at_low_beta(gen):
    # Orthogonal memories of equal norm: with dot similarity each is its own attractor (random
    # ones are not always: a longer memory can outscore a query's own).
    basis, _ = torch.linalg.qr(torch.randn(10, 6, generator=gen, dtype=torch.float64))
    memories = 3.0 * basis.T
    queries = memories + 0.01 * torch.randn(6, 10, generator=gen, dtype=torch.float64)
    sharp = metrics.relative_rank_over_steps(queries, memories, 3, beta=50.0)
    assert sharp == [1.0] * 4  # each query stays at its own memory
    # beta -> 0: uniform weights, every query becomes the bank mean (rank 1 of 6)
    flat = metrics.relative_rank_over_steps(queries, memories, 2, beta=1e-9)
    assert flat[0] == 1.0 and flat[1:] == [pytest.approx(1 / 6)] * 2


def test_cosine_similarities_self_and_cross():
    memories = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    queries = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    own, cross = metrics.cosine_similarities(queries, memories)
    assert own.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    # query 0 vs memories 1, 2; query 1 vs memories 0, 2 (row-major)
    assert cross.tolist() == pytest.approx([0.0, 1 / math.sqrt(2), 1 / math.sqrt(2), 1.0])
    hist = metrics.similarity_histograms(queries, memories, bins=4)
    assert hist["self"].sum().item() == pytest.approx(1.0)
    assert hist["self_mean"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    # bins of width 0.5 over [-1, 1]: self in the last bin twice; cross 0 -> bin 2, others bin 3
    assert hist["cross"].tolist() == pytest.approx([0, 0, 0.25, 0.75])
    assert hist["overlap"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no more queries"):
        metrics.cosine_similarities(memories, queries)


def test_support_size():
    weights = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    assert metrics.support_size(weights).tolist() == [2, 1, 3]
    assert metrics.support_size(weights, threshold=0.25).tolist() == [2, 1, 2]


def test_bad_pairs_raise():
    with pytest.raises(ValueError, match="one shape"):
        metrics.mse(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(TypeError, match="recalled"):
        metrics.mse([0.0], torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        metrics.one_minus_ssim(torch.zeros(2, 16), torch.zeros(2, 16))
