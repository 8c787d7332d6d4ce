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

import platform

import pytest
import torch

import hen_fast
from hen_fast import reference
from hen_fast.profiling import peak_extra_bytes

B, M, D = 64, 100_000, 256
BETA = D**-0.5
STREAM_CHUNK = reference.CHUNK_SCORES // B  # what the torch backend streams in by default

SETUP = f"""
import torch, entmax, hen_fast
from hen_fast import reference
generator = torch.Generator().manual_seed(0)
queries = torch.randn({B}, {D}, generator=generator)
memories = torch.randn({M}, {D}, generator=generator)
"""


def _ours(chunk_size: int, **options) -> str:
    keywords = "".join(f", {key}={value!r}" for key, value in options.items())
    return (
        f"reference.retrieve(queries, memories, beta={BETA}{keywords}, chunk_size={chunk_size})[0]"
    )


def _materialised(separation: str) -> str:
    return f"{separation}({BETA} * queries @ memories.T, -1) @ memories"


def _cpu(similarity="dot", **options) -> str:
    keywords = "".join(f", {key}={value!r}" for key, value in options.items())
    return (
        f"hen_fast.retrieve(queries, memories, beta={BETA}, similarity={similarity!r}"
        f"{keywords}, backend='cpu')"
    )


# name -> (group, expression timed; it sees queries, memories, torch, entmax, reference, hen_fast)
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
_times: dict[str, float] = {}
_peaks: dict[str, int] = {}


@pytest.fixture(scope="module")
def peaks():
    _peaks.update(zip(CASES, peak_extra_bytes(SETUP, [expr for _, expr in CASES.values()])))
    return _peaks


@pytest.fixture(scope="module")
def inputs():
    namespace = {"torch": torch, "reference": reference, "hen_fast": hen_fast}
    namespace["entmax"] = pytest.importorskip("entmax")
    exec(SETUP.replace("import torch, entmax, hen_fast", ""), namespace)
    return namespace


@pytest.mark.parametrize("name", list(CASES))
def test_retrieve(benchmark, inputs, peaks, name):
    separation, expression = CASES[name]
    compiled = compile(expression, name, "eval")
    benchmark.group = separation
    benchmark.extra_info.update(
        B=B,
        M=M,
        d=D,
        dtype="float32",
        beta=BETA,
        peak_extra_mib=peaks[name] / 2**20,
        torch=torch.__version__,
        hen_fast=hen_fast.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
    )
    benchmark.pedantic(eval, args=(compiled, inputs), rounds=5, warmup_rounds=1)
    _times[name] = benchmark.stats.stats.median
    benchmark.extra_info["median_ms"] = 1e3 * _times[name]


def teardown_module():
    if not _times:
        return
    print(
        f"\nB={B} M={M} d={D} float32, {torch.get_num_threads()} threads (median of 5); "
        "ratios to the first case of each separation"
    )
    print(f"  {'case':26s} {'ms':>8s} {'time':>6s} {'peak MiB':>9s} {'memory':>7s}")
    for name, (separation, _) in CASES.items():
        base = next(n for n, (s, _) in CASES.items() if s == separation)
        if name in _times:
            print(
                f"  {name:26s} {1e3 * _times[name]:8.1f} {_times[name] / _times[base]:6.2f} "
                f"{_peaks[name] / 2**20:9.1f} {_peaks[name] / _peaks[base]:7.2f}"
            )


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
