"""The fused C++ CPU backend (csrc/cpu) against the float64 oracle, and its registration."""

import os
import warnings

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
    randint,
    random_problem,
    rel_err,
)

if not cpu.load_extension():
    if os.environ.get("HEN_FAST_REQUIRE_EXT") == "1":
        raise RuntimeError("HEN_FAST_REQUIRE_EXT=1 but hen_fast._C did not load")
    pytest.skip("the C++ extension is not built", allow_module_level=True)


def test_auto_picks_the_cpu_kernel():
    assert hen_fast.available_backends("cpu")[0] == "cpu"


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_matches_reference(gen, combo, steps):
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, same_dims=steps > 1, max_queries=150, max_memories=9000
    )
    values = None if steps > 1 else values
    out, info = hen_fast.retrieve(
        queries,
        memories,
        values,
        steps=steps,
        backend="cpu",
        return_info=True,
        **combo_kwargs(combo),
    )
    assert out.dtype == torch.float32
    check_against_reference(
        out, info, queries, memories, values, steps=steps, **combo_kwargs(combo)
    )


@pytest.mark.parametrize(
    "separation, alpha", [("sparsemax", 1.5), ("entmax", 1.5), ("entmax", 1.3)]
)
@pytest.mark.parametrize("capacity", [1, 3])
def test_sparse_overflow_falls_back_exactly(gen, separation, alpha, capacity):
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=6000)
    kwargs = dict(beta=0.05, similarity="dot", separation=separation, alpha=alpha)
    out, info = cpu.retrieve(
        queries, memories, values, return_info=True, capacity=capacity, **kwargs
    )
    assert int(info.support.max()) > capacity
    check_against_reference(out, info, queries, memories, values, **kwargs)


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if c[2] in (1.5, 1.25)], ids=combo_id)
def test_steps_tol_and_clamp(gen, combo):
    queries, memories, _ = random_problem(gen, dtype=torch.float32, same_dims=True)
    mask = torch.rand(queries.shape[1], generator=gen) < 0.3
    kwargs = dict(combo_kwargs(combo), steps=5, tol=1e-3, clamp_mask=mask)
    out, info = hen_fast.retrieve(queries, memories, backend="cpu", return_info=True, **kwargs)
    check_against_reference(out, info, queries, memories, None, **kwargs)
    assert torch.equal(out[:, mask], queries[:, mask])


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax"])
def test_half_precision_banks(gen, bank_dtype, separation):
    queries, memories, values = random_problem(gen, max_memories=3000)
    memories, values = memories.to(bank_dtype), values.to(bank_dtype)
    queries = queries.float()
    out = hen_fast.retrieve(
        queries, memories, values, beta=0.5, separation=separation, backend="cpu"
    )
    expected = oracle.naive_retrieve(queries, memories, values, beta=0.5, separation=separation)
    assert rel_err(out, expected) < 1e-5


def test_degenerate_shapes(gen):
    for num_queries, num_memories, dim, value_dim in [(1, 1, 1, 1), (3, 1, 5, 2), (1, 7, 1, 1)]:
        queries = torch.randn(num_queries, dim, generator=gen)
        memories = torch.randn(num_memories, dim, generator=gen)
        values = torch.randn(num_memories, value_dim, generator=gen)
        for separation in ("softmax", "sparsemax", "entmax", "polynomial"):
            out, info = cpu.retrieve(
                queries, memories, values, separation=separation, return_info=True
            )
            check_against_reference(out, info, queries, memories, values, separation=separation)


def test_threads_calling_concurrently(gen):
    from concurrent.futures import ThreadPoolExecutor

    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=5000)
    kwargs = dict(beta=0.5, separation="sparsemax", similarity="l2")
    expected = hen_fast.retrieve(queries, memories, values, backend="cpu", **kwargs)
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda _: hen_fast.retrieve(queries, memories, values, backend="cpu", **kwargs),
                range(8),
            )
        )
    assert all(torch.equal(r, expected) for r in results)


def test_opcheck():
    """Schema, fake (meta) kernel and dispatcher registration agree with the real kernel."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=generator)
    keys = torch.randn(700, 8, generator=generator)
    values = torch.randn(700, 3, generator=generator)
    norms = keys.pow(2).sum(1)
    op = torch.ops.hen_fast.retrieve_step.default
    for similarity, separation, alpha in [(0, 0, 2.0), (1, 2, 2.0), (2, 2, 1.5), (0, 1, 2.0)]:
        torch.library.opcheck(
            op,
            (
                x,
                keys,
                norms if similarity == 1 else None,
                values,
                0.5,
                similarity,
                separation,
                alpha,
                3.0,
                64,
                True,
            ),
        )


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    import importlib.util

    original = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "hen_fast._C" else original(name, *a),
    )
    cpu.load_extension.cache_clear()
    try:
        missing = r"compiled kernels \(hen_fast._C\) are not available"
        with pytest.warns(RuntimeWarning, match=missing):
            assert hen_fast.available_backends("cpu") == ("torch",)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: no second warning
            out = hen_fast.retrieve(torch.randn(2, 3), torch.randn(4, 3))
        assert out.shape == (2, 3)
        with pytest.raises(hen_fast.BackendUnavailableError, match="pip install"):
            hen_fast.retrieve(torch.randn(2, 3), torch.randn(4, 3), backend="cpu")
    finally:
        monkeypatch.undo()
        cpu.load_extension.cache_clear()
        assert cpu.load_extension()


def test_import_does_not_load_the_extension():
    import subprocess
    import sys

    code = (
        "import sys, hen_fast, torch; "
        "assert not hasattr(torch.ops.hen_fast, 'retrieve_step') or "
        "'hen_fast._C' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_chunking_of_work(gen):
    """Many query blocks and bank splits: rows past 64 and banks past several splits."""
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, max_queries=200, max_memories=20000
    )
    for separation in ("softmax", "entmax"):
        out, info = cpu.retrieve(
            queries,
            memories,
            values,
            beta=0.5,
            separation=separation,
            return_info=True,
            capacity=randint(gen, 1, 300),
        )
        check_against_reference(
            out, info, queries, memories, values, beta=0.5, separation=separation
        )
