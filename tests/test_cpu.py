"""The fused C++ CPU backend (csrc/cpu): its registration and loading, and its kernel's own paths
against the float64 oracle (candidate buffer overflow, query blocks and bank splits, threads,
opcheck). The contract shared by every backend is in test_conformance.py."""

import os
import warnings

import pytest
import torch

import hen_fast
from hen_fast.backends import cpu

from helpers import (
    check_against_reference,
    randint,
    random_problem,
)

if not cpu.load_extension():
    if os.environ.get("HEN_FAST_REQUIRE_EXT") == "1":
        raise RuntimeError("HEN_FAST_REQUIRE_EXT=1 but hen_fast._C did not load")
    pytest.skip("the C++ extension is not built", allow_module_level=True)


def test_auto_picks_the_cpu_kernel():
    assert hen_fast.available_backends("cpu")[0] == "cpu"


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
    check_against_reference(out, info, queries, memories, values, backend="cpu", **kwargs)


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
            out, info, queries, memories, values, backend="cpu", beta=0.5, separation=separation
        )
