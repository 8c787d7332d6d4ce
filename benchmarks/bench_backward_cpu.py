"""Forward + backward of one retrieve update on the fused C++ kernels (cpu backend) beside torch
autograd through the reference (torch backend), float32 on the CPU.

    python -m pytest benchmarks/bench_backward_cpu.py --benchmark-group-by=param:case
"""

import pytest
import torch

import hen_fast
from hen_fast.backends import cpu

if not cpu.load_extension():
    pytest.skip("the C++ extension is not built", allow_module_level=True)

# (queries, memories, dim, value dim): a few queries on a large bank, a layer-sized batch.
SHAPES = {"B64-M20k-d128": (64, 20_000, 128, 128), "B256-M4k-d64": (256, 4_096, 64, 64)}
CASES = [
    ("dot", "softmax", 0.1),
    ("dot", "sparsemax", 0.5),
    ("l2", "entmax", 0.05),
]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(benchmark, shape, case, backend):
    num_queries, num_memories, dim, value_dim = SHAPES[shape]
    similarity, separation, beta = case
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(num_queries, dim, generator=generator).requires_grad_()
    memories = torch.randn(num_memories, dim, generator=generator).requires_grad_()
    values = torch.randn(num_memories, value_dim, generator=generator).requires_grad_()
    upstream = torch.randn(num_queries, value_dim, generator=generator)

    def step():
        out = hen_fast.retrieve(
            queries, memories, values, beta=beta, similarity=similarity, separation=separation,
            backend=backend,
        )  # fmt: skip
        return torch.autograd.grad((out * upstream).sum(), (queries, memories, values))

    benchmark.extra_info.update(shape=shape, similarity=similarity, separation=separation)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
