"""The partial states and their merges (hen_fast.partial), alone: a bank's parts merged in any
grouping give the whole bank's answer; empty parts are identities; ties keep the first index."""

import math

import pytest
import torch

from hen_fast.partial import ArgmaxState, CandidateState, DenseState, fold


def _dense_part(s, values, start, beta, scale):
    """A part's DenseState computed directly in float64 from its columns ``s`` of the whole
    bank's scores (softmax when scale == beta, else polynomial of degree 3 with the whole lse in
    rel). The scores come from one product: a BLAS may round a product of fewer columns
    differently, and the maxima are compared exactly."""
    if s.shape[1] == 0:
        return DenseState.empty(s.shape[0], values.shape[1], s)
    best, index = s.max(dim=1)
    if scale:
        logits = beta * (s - best[:, None])
    else:
        logits = 3 * torch.log(torch.relu(beta * s))
    rel = torch.logsumexp(logits, dim=1)
    weights = torch.where(torch.isneginf(rel)[:, None], 0.0, torch.exp(logits - rel[:, None]))
    support = (s > 0).sum(dim=1) if not scale else torch.zeros_like(index)
    return DenseState(rel, weights @ values, best, index + start, support)


def _split(count, gen, parts):
    """Random cut points, some parts empty."""
    cuts = sorted(torch.randint(0, count + 1, (parts - 1,), generator=gen).tolist())
    return list(zip([0, *cuts], [*cuts, count]))


@pytest.mark.parametrize("separation", ["softmax", "polynomial"])
def test_dense_merge_in_any_grouping_equals_the_whole(gen, separation):
    queries = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    keys = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    values = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    beta = 0.8
    scale = beta if separation == "softmax" else 0.0
    scores = queries @ keys.T
    whole = _dense_part(scores, values, 0, beta, scale)
    bounds = _split(40, gen, 6)
    parts = [_dense_part(scores[:, a:b], values[a:b], a, beta, scale) for a, b in bounds]

    def merge(a, b):
        return a.merge(b, scale)

    left = fold(parts, merge)
    right = parts[-1]
    for part in reversed(parts[:-1]):  # right-associated: a . (b . (c . ...))
        right = part.merge(right, scale)
    for merged in (left, right):
        torch.testing.assert_close(merged.out, whole.out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.lse(scale), whole.lse(scale), rtol=1e-12, atol=1e-12)
        assert torch.equal(merged.index, whole.index)
        assert torch.equal(merged.best, whole.best)
    empty = DenseState.empty(5, 3, queries)
    for merged in (empty.merge(whole, scale), whole.merge(empty, scale)):
        assert torch.equal(merged.out, whole.out) and torch.equal(merged.rel, whole.rel)


def test_dense_merge_of_parts_without_mass_is_zero_not_nan():
    """Polynomial parts whose scores are all <= 0 have rel = -inf: merged they stay -inf with a
    zero output, and merged with a part that has mass they weigh nothing."""
    none = DenseState(torch.full((2,), -math.inf, dtype=torch.float64), torch.zeros(2, 3),
                      torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([0, 1]),
                      torch.zeros(2, dtype=torch.long))  # fmt: skip
    merged = none.merge(none, 0.0)
    assert torch.isneginf(merged.rel).all() and torch.equal(merged.out, torch.zeros(2, 3))
    some = DenseState(torch.zeros(2, dtype=torch.float64), torch.ones(2, 3),
                      torch.tensor([5.0, 5.0], dtype=torch.float64), torch.tensor([7, 8]),
                      torch.ones(2, dtype=torch.long))  # fmt: skip
    for merged in (none.merge(some, 0.0), some.merge(none, 0.0)):
        assert torch.equal(merged.out, torch.ones(2, 3)) and torch.equal(merged.rel, some.rel)
        assert torch.equal(merged.index, torch.tensor([7, 8]))


def test_argmax_ties_keep_the_first_index_in_any_grouping():
    best = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    whole = ArgmaxState.of_scores(0, best)
    assert int(whole.index) == 1
    parts = [ArgmaxState.of_scores(a, best[:, a:b]) for a, b in ((0, 2), (2, 5), (5, 6))]
    assert int(fold(parts, ArgmaxState.merge).index) == 1
    later = parts[1].merge(parts[2])
    assert int(parts[0].merge(later).index) == 1
    empty = ArgmaxState.empty(1, best)
    assert int(empty.merge(whole).index) == 1 and int(whole.merge(empty).index) == 1


def test_candidates_merge_keeps_the_top_of_the_union_in_any_order(gen):
    scores = torch.randn(4, 50, generator=gen)
    scores[:, 10] = scores[:, 30] = scores.max() + 1  # a tie at the top
    capacity = 8
    whole = scores.topk(capacity, dim=1).values
    bounds = _split(50, gen, 5)
    parts = [CandidateState.of_scores(a, scores[:, a:b]) for a, b in bounds]
    forward = fold([CandidateState.empty(4, scores), *parts], lambda a, b: a.merge(b, capacity))
    backward = fold(list(reversed(parts)), lambda a, b: a.merge(b, capacity))
    for merged in (forward, backward):
        assert torch.equal(merged.scores, whole)
        # Each kept index points at a memory with exactly the kept score.
        assert torch.equal(scores.gather(1, merged.index), merged.scores)
    first = CandidateState.empty(4, scores).merge(parts[0], capacity)  # sorted, <= capacity
    padded = first.padded(capacity)
    assert padded.scores.shape == (4, capacity)
    merged = padded.merge(fold(parts[1:], lambda a, b: a.merge(b, capacity)), capacity)
    assert torch.equal(merged.scores, whole) and bool((merged.index >= 0).all())


def test_candidates_without_indices_keep_the_same_scores(gen):
    scores = torch.randn(3, 20, generator=gen)
    with_index = CandidateState.of_scores(0, scores[:, :9]).merge(
        CandidateState.of_scores(9, scores[:, 9:]), 5
    )
    bare = CandidateState.of_scores(0, scores[:, :9], False).merge(
        CandidateState.of_scores(9, scores[:, 9:], False), 5
    )
    assert bare.index is None and torch.equal(bare.scores, with_index.scores)
