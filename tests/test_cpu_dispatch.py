"""The C++ kernel's few-query pass (csrc/cpu/few_queries.cpp) on every instruction set this CPU
can run (AVX-512, AVX2, the x86-64 baseline; HEN_FAST_CPU_ISA forces a lower one), against the
float64 oracle: every similarity, float32/bfloat16/float16 banks, 1..16 queries, odd d, values
apart from and equal to the keys, padded rows; and what falls back to the tiled path."""

import os

import pytest
import torch

import hen_fast
from hen_fast import oracle
from hen_fast.backends import cpu

from helpers import rel_err, tolerance, value_scale

HAS_CPU_KERNEL = cpu.load_extension()
pytestmark = [
    pytest.mark.usefixtures("poisoned_buffers"),
    pytest.mark.skipif(
        not HAS_CPU_KERNEL and os.environ.get("HEN_FAST_REQUIRE_EXT") != "1",
        reason="the C++ extension is not built",
    ),
]
ORDER = ("generic", "avx2", "avx512")
BETA = {"dot": 0.7, "l2": 0.25, "manhattan": 0.3}


def _supported() -> list[str]:
    best = cpu.instruction_set() if HAS_CPU_KERNEL else "generic"
    return list(ORDER[: ORDER.index(best) + 1])


@pytest.fixture(params=_supported())
def isa(request, monkeypatch):
    monkeypatch.setenv("HEN_FAST_CPU_ISA", request.param)
    assert cpu.instruction_set() == request.param
    return request.param


def test_an_instruction_set_above_the_cpus_is_never_used(monkeypatch):
    best = cpu.instruction_set()
    monkeypatch.setenv("HEN_FAST_CPU_ISA", "avx512")
    assert ORDER.index(cpu.instruction_set()) <= ORDER.index(best)
    monkeypatch.setenv("HEN_FAST_CPU_ISA", "no-such-set")
    assert cpu.instruction_set() == best


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("similarity", ["dot", "l2", "manhattan"])
def test_few_queries_match_the_oracle(isa, bank_dtype, similarity, gen):
    for num_queries, dim, value_dim, same in ((1, 13, 13, True), (5, 33, 7, False),
                                              (16, 64, 64, False)):  # fmt: skip
        memories = torch.randn(3001, dim, generator=gen).to(bank_dtype)
        values = None if same else torch.randn(3001, value_dim, generator=gen).to(bank_dtype)
        queries = memories[:num_queries].float() + 0.3 * torch.randn(
            num_queries, dim, generator=gen
        )
        kwargs = dict(beta=BETA[similarity], similarity=similarity)
        out, info = hen_fast.retrieve(queries, memories, values, backend="cpu", return_info=True,
                                      **kwargs)  # fmt: skip
        bank_values = memories if same else values
        expected, expected_info = oracle.naive_retrieve(
            queries, memories.double(), bank_values.double(), return_info=True, **kwargs
        )
        assert rel_err(out, expected, scale=value_scale(bank_values)) < tolerance()
        assert torch.equal(info.argmax, expected_info.argmax)
        torch.testing.assert_close(info.lse.double(), expected_info.lse, rtol=1e-5, atol=1e-5)


def test_every_instruction_set_gives_the_same_weights_to_rounding(gen, monkeypatch):
    memories = torch.randn(20000, 48, generator=gen)
    queries = memories[:9] + 0.2 * torch.randn(9, 48, generator=gen)
    outputs = []
    for name in _supported():
        monkeypatch.setenv("HEN_FAST_CPU_ISA", name)
        outputs.append(hen_fast.retrieve(queries, memories, backend="cpu", beta=0.4))
    for out in outputs[1:]:
        assert rel_err(out, outputs[0], scale=value_scale(memories)) < 1e-6


def test_padded_rows_and_paths_that_fall_back(isa, gen):
    """Rows with padding (a row stride above d) take the pass; column strides, mixed key/value
    dtypes, 17 queries and a NaN query fall back to the tiled path: all equal the oracle."""
    padded = torch.randn(2000, 24, generator=gen)[:, :17]
    column_strided = torch.randn(17, 2000, generator=gen).T
    queries = torch.randn(17, 17, generator=gen)
    for memories, values, count in ((padded, None, 4), (column_strided, None, 4),
                                    (padded, padded.contiguous().half(), 4),
                                    (padded, None, 17)):  # fmt: skip
        out = hen_fast.retrieve(queries[:count], memories, values, backend="cpu", beta=0.5)
        bank_values = memories if values is None else values
        expected = oracle.naive_retrieve(queries[:count], memories, bank_values.double(), beta=0.5)
        assert rel_err(out, expected, scale=value_scale(bank_values)) < tolerance()
    with_nan = queries[:3].clone()
    with_nan[1, 4] = float("nan")
    out = hen_fast.retrieve(with_nan, padded, backend="cpu", beta=0.5, check_finite=False)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


@pytest.mark.parametrize("beta", [1e30, 1e39, 1e300])
def test_huge_beta_gives_the_argmax(isa, beta, gen):
    memories = torch.randn(5000, 8, generator=gen)
    queries = memories[[3, 4000]] + 0.01
    out = hen_fast.retrieve(queries, memories, backend="cpu", beta=beta, similarity="l2")
    assert torch.equal(out, memories[[3, 4000]])  # the nearest memory alone
