"""retrieve's ``score_mask`` (hen_fast.masked): each query's similarity over its masked
coordinates only, on every backend (the ``backend`` fixture of test_conformance) and every
source (in parts, memory-mapped, indexed, sharded: test_distributed), against the float64
oracle's masked scores (each term kept or dropped, every query against every memory at once)."""

import pytest
import torch

import hen_fast
from hen_fast import MemoryBank, oracle

from helpers import (
    COMBINATIONS,
    combo_id,
    combo_kwargs,
    randint,
    random_problem,
    rel_err,
    run_backend,
    tolerance,
    value_scale,
)
from test_conformance import _problem_sizes, backend  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("poisoned_buffers")
# The backends that run here on CPU tensors for real (checks that need autograd or check_finite).
HOST_BACKENDS = [name for name in ("torch", "cpu") if name in hen_fast.available_backends()]


def per_query_masks(gen, count: int, dim: int) -> torch.Tensor:
    """Random masks with the cases the grouping must handle: rows that share a mask, a row that
    holds nothing, a row that holds everything."""
    mask = torch.rand(count, dim, generator=gen) < 0.5
    if count >= 2:
        mask[-1] = mask[0]
    if count >= 3:
        mask[1] = False
    if count >= 4:
        mask[2] = True
    return mask


def check_masked(out, info, queries, memories, values, backend, **kwargs):
    """Output within the float32 tolerance of the float64 oracle (relative to the values' scale);
    argmax and steps equal unless a float32 computation may decide a near-tie otherwise (then
    the torch backend's), support within 2."""
    expected, expected_info = oracle.naive_retrieve(
        queries, memories, values, return_info=True, **kwargs
    )
    scale = value_scale(memories if values is None else values)
    steps = kwargs.get("steps", 1)
    assert rel_err(out, expected, scale=scale) < tolerance(backend=backend, steps=steps)
    if info is None:
        return
    _, same_precision = hen_fast.retrieve(
        queries, memories, values, backend="torch", return_info=True, **kwargs
    )
    for field in ("steps", "argmax"):
        got, want, alternative = (getattr(i, field) for i in (info, expected_info, same_precision))
        assert bool(((got == want) | (got == alternative)).all()), field
    assert int((info.support - expected_info.support).abs().max()) <= 2
    finite = torch.isfinite(expected_info.lse)  # polynomial: -inf where every weight is 0
    assert torch.equal(torch.isfinite(info.lse), finite)
    assert rel_err(info.lse[finite], expected_info.lse[finite], floor=1.0) < 1e-5 * steps


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_matches_oracle(gen, backend, combo, steps):
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, same_dims=steps > 1, **_problem_sizes(backend, steps)
    )
    if steps > 1:
        values = None if randint(gen, 0, 1) else values
    mask = per_query_masks(gen, *queries.shape)
    kwargs = dict(combo_kwargs(combo), steps=steps, score_mask=mask)
    out, info = run_backend(backend, queries, memories, values, gen=gen, **kwargs)
    check_masked(out, info, queries, memories, values, backend, **kwargs)


@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
def test_shared_mask_tol_and_clamp(gen, backend, similarity):
    """One mask for the batch (broadcast from (d,)), with early stopping and a clamp: the clamp
    holds the query's values, the score mask only chooses what is compared."""
    queries, memories, _ = random_problem(gen, dtype=torch.float32, same_dims=True)
    dim = queries.shape[1]
    score_mask = torch.arange(dim) < (dim + 1) // 2
    clamp_mask = torch.rand(dim, generator=gen) < 0.3
    kwargs = dict(combo_kwargs((similarity, "entmax", 1.5)), steps=4, tol=1e-4,
                  score_mask=score_mask, clamp_mask=clamp_mask)  # fmt: skip
    out, info = run_backend(backend, queries, memories, gen=gen, **kwargs)
    check_masked(out, info, queries, memories, None, backend, **kwargs)
    assert torch.equal(out[:, clamp_mask], queries[:, clamp_mask])
    expanded = dict(kwargs, score_mask=score_mask.expand_as(queries))
    again, _ = run_backend(backend, queries, memories, gen=gen, **expanded)
    assert rel_err(again, out, scale=value_scale(memories)) < 1e-6


@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
def test_a_full_mask_is_no_mask_and_an_empty_one_is_uniform(gen, similarity):
    queries, memories, values = random_problem(gen, dtype=torch.float32)
    kwargs = dict(combo_kwargs((similarity, "softmax", 1.5)), return_info=True)
    full, _ = hen_fast.retrieve(queries, memories, values, score_mask=torch.tensor(True), **kwargs)
    plain, _ = hen_fast.retrieve(queries, memories, values, **kwargs)
    assert rel_err(full, plain, scale=value_scale(values)) < 1e-6
    empty = torch.zeros(queries.shape[1], dtype=torch.bool)
    out, info = hen_fast.retrieve(queries, memories, values, score_mask=empty, **kwargs)
    uniform = values.double().mean(0).expand_as(out)
    assert rel_err(out, uniform, scale=value_scale(values)) < 1e-6
    assert torch.equal(info.support, torch.full_like(info.support, memories.shape[0]))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
def test_components_outside_the_mask_are_not_read(gen, backend, similarity):
    queries, memories, values = random_problem(gen, dtype=torch.float32)
    mask = per_query_masks(gen, *queries.shape)
    poisoned = queries.clone()
    poisoned[~mask] = float("nan")
    poisoned[~mask & (torch.rand(mask.shape, generator=gen) < 0.5)] = float("inf")
    kwargs = dict(combo_kwargs((similarity, "sparsemax", 1.5)), score_mask=mask, backend=backend)
    out = hen_fast.retrieve(poisoned, memories, values, check_finite=False, **kwargs)
    expected = oracle.naive_retrieve(queries, memories, values, **{
        k: v for k, v in kwargs.items() if k != "backend"})  # fmt: skip
    assert rel_err(out, expected, scale=value_scale(values)) < tolerance(backend=backend)
    with pytest.raises(ValueError, match="NaN or Inf"):
        hen_fast.retrieve(poisoned, memories, values, **kwargs)


@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
@pytest.mark.parametrize("where", ["memory_cap", "mapped"])
def test_banks_in_parts(gen, tmp_path, similarity, where):
    """Chunks of a streamed or memory-mapped bank are gathered by columns one at a time and
    their partial states merged: the result is the oracle's."""
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=300)
    mask = per_query_masks(gen, *queries.shape)
    kwargs = dict(combo_kwargs((similarity, "entmax", 1.5)), score_mask=mask)
    if where == "memory_cap":
        bank = MemoryBank(memories, values)
    else:
        MemoryBank(memories, values).save(tmp_path / "bank")
        bank = MemoryBank.load(tmp_path / "bank", mmap=True)
    # chunks of a few dozen memories
    out, info = hen_fast.retrieve(queries, bank, memory_cap=40 * 4 * 40, return_info=True,
                                  **kwargs)  # fmt: skip
    check_masked(out, info, queries, memories, values, "torch", **kwargs)


def test_an_index_prunes_dot_and_scans_distances(gen, monkeypatch):
    """dot masks the query and keeps the index (its bounds hold for any query); l2 compares
    gathered columns, which the index does not bound, so it scans."""
    from hen_fast import indexed

    monkeypatch.setattr(indexed, "CALL_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(indexed, "QUERY_OVERHEAD_BYTES", 0)
    monkeypatch.setattr(indexed, "FALLBACK_FRACTION", 0.25)
    groups, dim = 12, 16
    centres = 4.0 * torch.linalg.qr(torch.randn(dim, groups, generator=gen))[0].T
    labels = torch.arange(groups).repeat_interleave(40)
    keys = centres[labels] + 0.1 * torch.randn(labels.numel(), dim, generator=gen)
    bank = MemoryBank(keys)
    bank.build_index(groups, labels=labels)
    queries = keys[torch.tensor([3, 200])] + 0.01 * torch.randn(2, dim, generator=gen)
    mask = torch.arange(dim) < 12
    for similarity, beta, pruned in (("dot", 4.0, True), ("l2", 1.0, False)):
        kwargs = dict(beta=beta, similarity=similarity, separation="sparsemax", score_mask=mask)
        out, info = hen_fast.retrieve(queries, bank, return_info=True, **kwargs)
        check_masked(out, info, queries, keys, None, "torch", **kwargs)
        assert bool((info.fraction_read < 1).all()) == pruned, (similarity, info.fraction_read)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
def test_gradients_match_the_oracle(gen, backend, similarity):
    queries, memories, values = random_problem(gen, max_queries=5, max_memories=30)
    mask = per_query_masks(gen, *queries.shape)
    kwargs = dict(combo_kwargs((similarity, "softmax", 1.5)), score_mask=mask)
    grads = []
    for run in (
        lambda q, k, v: hen_fast.retrieve(q.float(), k.float(), v.float(), backend=backend,
                                          **kwargs).double(),  # fmt: skip
        lambda q, k, v: oracle.naive_retrieve(q, k, v, **kwargs),
    ):
        inputs = [t.detach().clone().requires_grad_() for t in (queries, memories, values)]
        weights = torch.randn(queries.shape[0], values.shape[1], generator=gen.manual_seed(1))
        (run(*inputs) * weights.double()).sum().backward()
        grads.append([t.grad for t in inputs])
    for ours, expected in zip(*grads):
        assert rel_err(ours, expected, floor=1e-3) < 1e-4


def test_bad_masks_raise_naming_the_argument():
    queries, memories = torch.randn(3, 5), torch.randn(8, 5)
    with pytest.raises(TypeError, match="score_mask must be a torch.Tensor"):
        hen_fast.retrieve(queries, memories, score_mask=[True] * 5)
    with pytest.raises(TypeError, match="score_mask must be a bool tensor"):
        hen_fast.retrieve(queries, memories, score_mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"score_mask of shape \(4,\) does not broadcast"):
        hen_fast.retrieve(queries, memories, score_mask=torch.ones(4, dtype=torch.bool))
    # values of another width are fine: only clamp_mask needs dv == d
    out = hen_fast.retrieve(queries, memories, torch.randn(8, 2),
                            score_mask=torch.ones(5, dtype=torch.bool))  # fmt: skip
    assert out.shape == (3, 2)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
def test_half_precision_banks(gen, backend, similarity):
    """float32 queries over a bfloat16 / float16 bank: the gathered columns keep the bank's dtype
    and the computation is float32 on the rounded bank (the oracle sees the same values)."""
    for bank_dtype in (torch.bfloat16, torch.float16):
        queries, memories, values = random_problem(gen, max_memories=300)
        memories, values = memories.to(bank_dtype), values.to(bank_dtype)
        mask = per_query_masks(gen, *queries.shape)
        kwargs = dict(combo_kwargs((similarity, "entmax", 1.5)), score_mask=mask)
        out = hen_fast.retrieve(queries.float(), memories, values, backend=backend, **kwargs)
        expected = oracle.naive_retrieve(queries.float(), memories, values, **kwargs)
        assert out.dtype == torch.float32
        assert rel_err(out, expected, scale=value_scale(values)) < tolerance(backend=backend)
