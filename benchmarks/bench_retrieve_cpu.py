"""CPU retrieval at B=64, M=100k, d=256 float32: the fused C++ kernel (backend "cpu") and the torch
backend (dense and streamed) beside the plain-PyTorch and entmax-package baselines, in one run.

    pip install --no-build-isolation -e ".[bench]"
    python -m pytest benchmarks/bench_retrieve_cpu.py \
        --benchmark-json=benchmarks/results/cpu-$(date +%F).json

Each case records its time (pytest-benchmark) and its peak extra resident memory (measured in a
fresh process by hen_fast.profiling, inputs excluded) in ``extra_info``; the summary printed at
the end gives both as ratios to the first case of each group (the baseline). A second benchmark
sweeps B x M for dot/softmax, the C++ kernel beside plain PyTorch.
"""

from __future__ import annotations

import pytest
import torch

import hen_fast
from hen_fast.backends import torch_backend

from side_by_side import SideBySide

B, M, D = 64, 100_000, 256
BETA = D**-0.5
STREAM_CHUNK = torch_backend.CHUNK_SCORES // B  # what the torch backend streams in by default

SETUP = f"""
import torch, entmax, hen_fast
from hen_fast.backends import torch_backend
generator = torch.Generator().manual_seed(0)
queries = torch.randn({B}, {D}, generator=generator)
memories = torch.randn({M}, {D}, generator=generator)
"""


def _ours(chunk_size: int, **options) -> str:
    keywords = "".join(f", {key}={value!r}" for key, value in options.items())
    call = f"queries, memories, beta={BETA}{keywords}, chunk_size={chunk_size}"
    return f"torch_backend.retrieve({call})[0]"


def _materialised(separation: str) -> str:
    return f"{separation}({BETA} * queries @ memories.T, -1) @ memories"


def _cpu(similarity="dot", **options) -> str:
    keywords = "".join(f", {key}={value!r}" for key, value in options.items())
    return (
        f"hen_fast.retrieve(queries, memories, beta={BETA}, similarity={similarity!r}"
        f"{keywords}, backend='cpu')"
    )


# name -> (group, expression timed; it sees queries, memories, torch, entmax, torch_backend,
# hen_fast)
CASES = {
    "softmax/plain torch": ("softmax", _materialised("torch.softmax")),
    "softmax/cpu kernel": ("softmax", _cpu()),
    "softmax/torch dense": ("softmax", _ours(M)),
    "softmax/torch streamed": ("softmax", _ours(STREAM_CHUNK)),
    "l2/plain torch cdist": (
        "l2",
        f"torch.softmax(-{BETA} * torch.cdist(queries, memories) ** 2, -1) @ memories",
    ),
    "l2/cpu kernel": ("l2", _cpu("l2")),
    "manhattan/plain torch cdist": (
        "manhattan",
        f"torch.softmax(-{BETA} * torch.cdist(queries, memories, p=1), -1) @ memories",
    ),
    "manhattan/cpu kernel": ("manhattan", _cpu("manhattan")),
    "sparsemax/entmax package": ("sparsemax", _materialised("entmax.sparsemax")),
    "sparsemax/cpu kernel": ("sparsemax", _cpu(separation="sparsemax")),
    "sparsemax/torch streamed": ("sparsemax", _ours(STREAM_CHUNK, separation="sparsemax")),
    "entmax15/entmax package": ("entmax15", _materialised("entmax.entmax15")),
    "entmax15/cpu kernel": ("entmax15", _cpu(separation="entmax", alpha=1.5)),
    "entmax15/torch streamed": ("entmax15", _ours(STREAM_CHUNK, separation="entmax", alpha=1.5)),
}
TABLE = SideBySide(SETUP, CASES)


@pytest.fixture(scope="module")
def inputs():
    pytest.importorskip("entmax")
    return TABLE.prepare()


@pytest.mark.parametrize("name", list(CASES))
def test_retrieve(benchmark, inputs, name):
    TABLE.time(
        benchmark, name, inputs, rounds=5, warmup=1, B=B, M=M, d=D, dtype="float32", beta=BETA
    )


def teardown_module():
    title = f"B={B} M={M} d={D} float32, {torch.get_num_threads()} threads (median of 5)"
    TABLE.print_ratios(title)


@pytest.mark.parametrize("num_memories", [10_000, 100_000])
@pytest.mark.parametrize("num_queries", [1, 16, 64, 128, 256, 1024])
@pytest.mark.parametrize("who", ["plain torch", "cpu kernel", "torch backend"])
def test_sweep_dot_softmax(benchmark, who, num_queries, num_memories):
    """Where the kernel wins for dense dot/softmax; backends/cpu.py's auto rule follows it."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(num_queries, D, generator=generator)
    memories = torch.randn(num_memories, D, generator=generator)
    if who == "plain torch":

        def run():
            return torch.softmax(BETA * queries @ memories.T, -1) @ memories
    else:
        backend = "cpu" if who == "cpu kernel" else "torch"

        def run():
            return hen_fast.retrieve(queries, memories, beta=BETA, backend=backend)

    benchmark.group = f"sweep B={num_queries} M={num_memories}"
    benchmark.extra_info.update(B=num_queries, M=num_memories, d=D, who=who)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
