"""The cpu backend's few-query path (csrc/cpu/onepass*.{h,cpp}) on each instruction set this CPU
runs (HEN_FAST_CPU_ISA), forced with HEN_FAST_CPU_PATH=onepass: every packing of queries into the
vector lanes (1..16 per vector, several groups), banks read in place and converted (float32 with
whole vectors per row, odd d, bfloat16, float16), rows past the bank's ranges and blocks, the
float32 sums over large banks, the candidate windows and their overflow, extremes. The contract
for every path is in test_conformance.py (cpu-onepass*, cpu-tiled)."""

import math
import os

import pytest
import torch

import hen_fast
from hen_fast import oracle
from hen_fast.backends import cpu

from helpers import check_against_reference, randint, rel_err, value_scale

if not cpu.load_extension():
    if os.environ.get("HEN_FAST_REQUIRE_EXT") == "1":
        raise RuntimeError("HEN_FAST_REQUIRE_EXT=1 but hen_fast._C did not load")
    pytest.skip("the C++ extension is not built", allow_module_level=True)

ISAS = [
    pytest.param(
        isa, marks=pytest.mark.skipif(isa not in cpu.instruction_sets(), reason=f"no {isa} here")
    )
    for isa in ("avx512", "avx2", "generic")
]


@pytest.fixture(params=ISAS)
def onepass(request, monkeypatch):
    """The one-pass kernel on one instruction set, for every call of the test."""
    monkeypatch.setenv("HEN_FAST_CPU_PATH", "onepass")
    monkeypatch.setenv("HEN_FAST_CPU_ISA", request.param)
    return request.param


def _check(out, info, queries, memories, values, **kwargs):
    """The accuracy rule, against the bank's values as float32 (a half bank is converted exactly:
    the kernel computes in float32 on them, so the float32 rule holds)."""
    values = None if values is None else values.float()
    check_against_reference(out, info, queries, memories.float(), values, backend="cpu", **kwargs)


@pytest.mark.parametrize("num_queries", [1, 2, 3, 5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize(
    "similarity, separation",
    [("dot", "softmax"), ("l2", "sparsemax"), ("manhattan", "entmax"), ("l2", "softmax")],
)
def test_query_packings_and_ranges(gen, onepass, num_queries, similarity, separation):
    """Queries 1..33 (one to three groups, every lanes-per-query width), a bank past two ranges of
    16384 with a tail block, d a multiple of 16 (rows read in place) or not (converted)."""
    dim = 16 * randint(gen, 1, 3) if randint(gen, 0, 1) else randint(gen, 3, 40)
    num_memories = 2 * 16384 + randint(gen, 1, 40)
    memories = torch.randn(num_memories, dim, generator=gen)
    queries = memories[:num_queries] + 0.5 * torch.randn(num_queries, dim, generator=gen)
    value_dim = randint(gen, 1, 20)
    values = None if randint(gen, 0, 1) else torch.randn(num_memories, value_dim, generator=gen)
    beta = {"dot": 1.0 / math.sqrt(dim), "l2": 0.1, "manhattan": 0.1}[similarity]
    kwargs = dict(beta=beta, similarity=similarity, separation=separation)
    out, info = hen_fast.retrieve(queries, memories, values, backend="cpu", return_info=True,
                                  **kwargs)
    _check(out, info, queries, memories, values, **kwargs)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax"])
def test_many_queries_in_slices(gen, separation):
    """More queries than one call of the kernel takes (1024, retrieve_cpu.cpp): the slices'
    results join in order, each row as if retrieved alone, the support counted in every slice.
    Not forced: the backend's own choice of path takes them all."""
    memories = torch.randn(3000, 20, generator=gen)
    stored = torch.randint(0, 3000, (1024 + 37,), generator=gen)
    queries = memories[stored] + 0.5 * torch.randn(1024 + 37, 20, generator=gen)
    kwargs = dict(beta=0.3, similarity="l2", separation=separation)
    out, info = hen_fast.retrieve(queries, memories, backend="cpu", return_info=True, **kwargs)
    _check(out, info, queries, memories, None, **kwargs)
    tail, tail_info = hen_fast.retrieve(queries[-37:], memories, backend="cpu", return_info=True,
                                        **kwargs)
    torch.testing.assert_close(out[-37:], tail, rtol=0, atol=0)
    assert torch.equal(info.support[-37:], tail_info.support)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("separation", ["softmax", "entmax"])
def test_half_banks(gen, onepass, dtype, separation):
    num_queries, dim = randint(gen, 1, 20), randint(gen, 5, 70)
    memories = torch.randn(5000, dim, generator=gen).to(dtype)
    values = None if randint(gen, 0, 1) else torch.randn(5000, 7, generator=gen).to(dtype)
    queries = memories[:num_queries].float() + 0.3 * torch.randn(num_queries, dim, generator=gen)
    kwargs = dict(beta=2.0 / math.sqrt(dim), similarity="l2", separation=separation)
    out, info = hen_fast.retrieve(queries, memories, values, backend="cpu", return_info=True,
                                  **kwargs)
    _check(out, info, queries, memories, values, **kwargs)


def test_sums_over_a_large_bank_stay_float32_accurate(gen, onepass):
    """Dense weights over 200k memories: the running sums are added in compensated chunks, so the
    error stays within the accuracy rule (twice the torch backend's), not ~1e-4."""
    memories = torch.randn(200_000, 8, generator=gen)
    queries = torch.randn(3, 8, generator=gen)
    # (Summed in one running float32 sum instead, these came out 2.5e-5 off, 300x torch's error.)
    kwargs = dict(beta=1.0, similarity="dot", separation="softmax")
    out, info = hen_fast.retrieve(queries, memories, backend="cpu", return_info=True, **kwargs)
    _check(out, info, queries, memories, None, **kwargs)


def test_rows_with_gaps_read_in_place(gen, onepass):
    """Rows further apart than their length (a column slice of a wider bank): read in place, and
    too far apart to be prefetched as one range; the gaps hold NaN."""
    wide = torch.full((20000, 96), float("nan"))
    memories = wide[:, 16:48]
    memories.copy_(torch.randn(20000, 32, generator=gen))
    queries = memories[:4] + 0.3 * torch.randn(4, 32, generator=gen)
    kwargs = dict(beta=0.2, similarity="dot", separation="softmax")
    out, info = hen_fast.retrieve(queries, memories, backend="cpu", return_info=True, **kwargs)
    _check(out, info, queries, memories, None, **kwargs)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax"])
def test_window_overflow(gen, onepass, separation):
    """Windows larger than the buffer: softmax's support count and the sparse thresholds are
    finished by the tiled passes (with their own maxima) and stay exact."""
    memories = torch.randn(6000, 12, generator=gen)
    queries = torch.randn(5, 12, generator=gen)
    kwargs = dict(beta=0.05, similarity="dot", separation=separation)
    out, info = cpu.retrieve(queries, memories, return_info=True, capacity=4, **kwargs)
    assert int(info.support.min()) > 4
    _check(out, info, queries, memories, None, **kwargs)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax"])
def test_window_compacts_when_the_best_rows_come_last(gen, onepass, separation):
    """A bank in ascending order of similarity to the query: every row raises the running maximum,
    so a full window holds mostly rows the maximum has left behind; compacting it (and
    overflowing when it stays full) keeps the result exact."""
    memories = torch.randn(5000, 24, generator=gen)
    queries = torch.randn(1, 24, generator=gen)
    memories = memories[(memories @ queries[0]).argsort()].contiguous()
    kwargs = dict(beta=2.0, similarity="dot", separation=separation)
    out, info = cpu.retrieve(queries, memories, return_info=True, capacity=16, **kwargs)
    _check(out, info, queries, memories, None, **kwargs)
    assert int(info.argmax) == 4999


def _wide_window_case(gen, alpha, beta, order):
    """800 rows, each repeated 7 times (ties at every score, the threshold's among them), where
    the rows within 1 / ((alpha - 1) beta) of the maximum are hundreds to thousands and the support
    is 7 to 70 rows."""
    memories = torch.randn(800, 24, generator=gen).repeat_interleave(7, 0)
    queries = torch.randn(3, 24, generator=gen)
    if order != "shuffled":
        memories = memories[(memories @ queries[0]).argsort(descending=order == "descending")]
    separation = "sparsemax" if alpha == 2.0 else "entmax"
    return queries, memories.contiguous(), dict(beta=beta, separation=separation, alpha=alpha)


WIDE_WINDOWS = pytest.mark.parametrize("alpha, beta", [(2.0, 0.05), (1.5, 0.2), (1.25, 0.5)])


@WIDE_WINDOWS
@pytest.mark.parametrize("order", ["shuffled", "ascending", "descending"])
def test_window_floor_prunes_a_wide_window(gen, onepass, alpha, beta, order):
    """A full window's own threshold raises the floor (onepass::sparse_floor) and drops the rows at
    or below it, which a larger threshold over the whole bank can only confirm: the support and
    output stay exact however the rows come (ascending: the floor rises at every compaction)."""
    queries, memories, kwargs = _wide_window_case(gen, alpha, beta, order)
    out, info = cpu.retrieve(queries, memories, return_info=True, capacity=128, **kwargs)
    _check(out, info, queries, memories, None, **kwargs)


@WIDE_WINDOWS
def test_window_floor_in_the_tiled_candidate_pass(gen, monkeypatch, alpha, beta):
    monkeypatch.setenv("HEN_FAST_CPU_PATH", "tiled")
    queries, memories, kwargs = _wide_window_case(gen, alpha, beta, "ascending")
    out, info = cpu.retrieve(queries, memories, return_info=True, capacity=128, **kwargs)
    _check(out, info, queries, memories, None, **kwargs)


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax"])
def test_many_exact_ties_at_huge_beta(gen, onepass, separation):
    """300 copies of the best memory at beta 1e30 overflow a 64-entry window: the weight is split
    evenly among the copies (the tiled passes recompute the maximum: an ulp of a score is
    everything at this beta)."""
    memories = torch.randn(4000, 16, generator=gen)
    best = torch.randn(16, generator=gen)
    where = torch.randperm(4000, generator=gen)[:300]
    memories[where] = best
    values = torch.randn(4000, 5, generator=gen)
    queries = best.unsqueeze(0) + 0.01 * torch.randn(2, 16, generator=gen)
    kwargs = dict(beta=1e30, similarity="l2", separation=separation)
    out, info = cpu.retrieve(queries, memories, values, return_info=True, capacity=64, **kwargs)
    expected = values[where].double().mean(0).expand(2, -1)
    assert rel_err(out, expected, scale=value_scale(values)) < 1e-5
    assert torch.equal(info.support, torch.full((2,), 300))
    assert torch.equal(info.argmax, torch.full((2,), int(where.min())))


@pytest.mark.parametrize("separation", ["softmax", "entmax"])
def test_a_nan_query_spoils_only_its_row(gen, onepass, separation):
    memories = torch.randn(3000, 16, generator=gen)
    queries = torch.randn(3, 16, generator=gen)
    queries[1, 5] = float("nan")
    out = hen_fast.retrieve(queries, memories, backend="cpu", separation=separation,
                            check_finite=False)
    assert bool(out[1].isnan().all())
    expected = oracle.naive_retrieve(queries[[0, 2]].double(), memories.double(),
                                     separation=separation)
    assert rel_err(out[[0, 2]], expected, scale=value_scale(memories)) < 1e-5


def test_bad_settings_are_refused(monkeypatch):
    queries, memories = torch.randn(2, 8), torch.randn(100, 8)
    monkeypatch.setenv("HEN_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="HEN_FAST_CPU_ISA must be"):
        hen_fast.retrieve(queries, memories, backend="cpu")
    monkeypatch.delenv("HEN_FAST_CPU_ISA")
    monkeypatch.setenv("HEN_FAST_CPU_PATH", "fastest")
    with pytest.raises(RuntimeError, match="HEN_FAST_CPU_PATH must be"):
        hen_fast.retrieve(queries, memories, backend="cpu")


def test_paths_agree(gen):
    """The two paths of the kernel give the same answer (each within the accuracy rule)."""
    memories = torch.randn(30000, 64, generator=gen)
    queries = memories[:6] + 0.2 * torch.randn(6, 64, generator=gen)
    results = {}
    for path in ("onepass", "tiled"):
        os.environ["HEN_FAST_CPU_PATH"] = path
        try:
            results[path] = hen_fast.retrieve(queries, memories, backend="cpu", beta=0.125)
        finally:
            del os.environ["HEN_FAST_CPU_PATH"]
    assert rel_err(results["onepass"], results["tiled"], scale=value_scale(memories)) < 2e-6
