"""U-Hop's separation loss, forward + backward, at M=5000, D=784 float32 on the CPU: the fused
torch path of hen_fast.uhop.separation_loss beside the torch.pdist reference
(hen_fast.reference.naive_separation_loss, in float32 here), for the average and the max loss.

    pip install --no-build-isolation -e ".[bench]"
    python -m pytest benchmarks/bench_separation_loss.py \
        --benchmark-json=benchmarks/results/separation-loss-cpu-$(date +%F).json

Each case records its time (pytest-benchmark) and its peak extra resident memory (a fresh process,
hen_fast.profiling; the features do not count) in ``extra_info``; the summary at the end gives
ratios to the pdist reference. On a CUDA machine a further case times the Triton kernel at
M=100k, D=784 (the goal there: under 1 s; pdist does not fit in memory).
"""

from __future__ import annotations

import platform

import pytest
import torch

import hen_fast
from hen_fast.profiling import peak_extra_bytes

M, D = 5000, 784

SETUP = f"""
import torch
from hen_fast.reference import naive_separation_loss
from hen_fast.uhop import separation_loss
generator = torch.Generator().manual_seed(0)
# unit-norm rows: the features Stage I computes the loss on
z = torch.nn.functional.normalize(torch.randn({M}, {D}, generator=generator), dim=1)
z.requires_grad_()
"""
PDIST = "naive_separation_loss(z, dtype=torch.float32{})"
# name -> (group, expression timed)
CASES = {
    "average fwd+bwd/pdist reference": ("average fwd+bwd", PDIST.format("") + ".backward()"),
    "average fwd+bwd/fused": ("average fwd+bwd", "separation_loss(z).backward()"),
    "max fwd+bwd/pdist reference": (
        "max fwd+bwd",
        PDIST.format(", reduction='max'") + ".backward()",
    ),
    "max fwd+bwd/fused": ("max fwd+bwd", "separation_loss(z, reduction='max').backward()"),
    "average forward/pdist reference": (
        "average forward",
        "naive_separation_loss(z.detach(), dtype=torch.float32)",
    ),
    "average forward/fused": ("average forward", "separation_loss(z.detach())"),
}
_times: dict[str, float] = {}
_peaks: dict[str, int] = {}


@pytest.fixture(scope="module")
def peaks():
    _peaks.update(zip(CASES, peak_extra_bytes(SETUP, [expr for _, expr in CASES.values()])))
    return _peaks


@pytest.fixture(scope="module")
def inputs():
    namespace: dict = {}
    exec(SETUP, namespace)
    return namespace


@pytest.mark.parametrize("name", list(CASES))
def test_separation_loss(benchmark, inputs, peaks, name):
    group, expression = CASES[name]
    compiled = compile(expression, name, "eval")
    benchmark.group = group
    benchmark.extra_info.update(
        M=M,
        D=D,
        dtype="float32",
        peak_extra_mib=peaks[name] / 2**20,
        torch=torch.__version__,
        hen_fast=hen_fast.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
    )
    benchmark.pedantic(eval, args=(compiled, inputs), rounds=3, warmup_rounds=0)
    _times[name] = benchmark.stats.stats.median
    benchmark.extra_info["median_s"] = _times[name]


def teardown_module():
    if not _times:
        return
    print(f"\nM={M} D={D} float32, {torch.get_num_threads()} threads (median of 3)")
    print(f"  {'case':34s} {'s':>7s} {'time':>6s} {'peak MiB':>9s} {'memory':>7s}")
    for name, (group, _) in CASES.items():
        base = next(n for n, (g, _) in CASES.items() if g == group)
        if name in _times:
            print(
                f"  {name:34s} {_times[name]:7.2f} {_times[name] / _times[base]:6.2f} "
                f"{_peaks[name] / 2**20:9.1f} {_peaks[name] / max(1, _peaks[base]):7.3f}"
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_separation_loss_100k(benchmark):
    from hen_fast.uhop import separation_loss

    generator = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(100_000, D, device="cuda", generator=generator)
    z = torch.nn.functional.normalize(z, dim=1).requires_grad_()

    def run():
        separation_loss(z, backend="triton").backward()
        torch.cuda.synchronize()

    benchmark.group = "triton M=100k"
    benchmark.extra_info.update(M=100_000, D=D, device=torch.cuda.get_device_name())
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
