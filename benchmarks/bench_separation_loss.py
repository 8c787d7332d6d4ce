"""U-Hop's separation loss, forward + backward, at M=5000, D=784 float32 on the CPU: the fused
torch path of hen_fast.uhop.separation_loss beside the torch.pdist reference
(hen_fast.oracle.naive_separation_loss, in float32 here), for the average and the max loss.

    pip install --no-build-isolation -e ".[bench]"
    python -m pytest benchmarks/bench_separation_loss.py \
        --benchmark-json=benchmarks/results/separation-loss-cpu-$(date +%F).json

Each case records its time (pytest-benchmark) and its peak extra resident memory (a fresh process,
hen_fast.profiling; the features do not count) in ``extra_info``; the summary at the end gives
ratios to the pdist reference. On a CUDA machine a further case times the Triton kernel at
M=100k, D=784 (the goal there: under 1 s; pdist does not fit in memory).
"""

from __future__ import annotations

import pytest
import torch

from side_by_side import SideBySide

M, D = 5000, 784

SETUP = f"""
import torch
from hen_fast.oracle import naive_separation_loss
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
TABLE = SideBySide(SETUP, CASES)


@pytest.fixture(scope="module")
def inputs():
    return TABLE.prepare()


@pytest.mark.parametrize("name", list(CASES))
def test_separation_loss(benchmark, inputs, name):
    TABLE.time(benchmark, name, inputs, rounds=3, warmup=0, M=M, D=D, dtype="float32")


def teardown_module():
    title = f"M={M} D={D} float32, {torch.get_num_threads()} threads (median of 3)"
    TABLE.print_ratios(title)


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
