"""The Triton backend's own paths, on the CPU through TRITON_INTERPRET=1 (small shapes) and on a
GPU (tests marked gpu): forced bank splits, candidate buffer overflow, the device-side tol loop,
odd strides in the backward kernels, large banks, registration, compile checks. The contract
shared by every backend is in test_conformance.py. Every output buffer the kernels write is
poisoned first."""

import math

import pytest
import torch

pytest.importorskip("triton")

import hen_fast  # noqa: E402
from hen_fast.backends import torch_backend  # noqa: E402

from helpers import (  # noqa: E402
    COMBINATIONS,
    backend_device,
    check_against_reference,
    combo_id,
    combo_kwargs,
    odd_strides,
    randint,
    random_problem,
    rel_err,
    run_backend,
)

DEVICE = backend_device("triton")

pytestmark = pytest.mark.usefixtures("poisoned_buffers")


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_forced_splits_and_row_blocks(gen, combo):
    """Many splits (some empty of work), several query blocks, a bank that is no tile multiple."""
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, max_queries=40, max_memories=400
    )
    splits = randint(gen, 2, 7)
    kwargs = combo_kwargs(combo)
    out, info = run_backend("triton", queries, memories, values, gen=gen, splits=splits, **kwargs)
    check_against_reference(out, info, queries, memories, values, backend="triton", **kwargs)


@pytest.mark.parametrize(
    "separation, alpha", [("sparsemax", 1.5), ("entmax", 1.5), ("entmax", 1.3)]
)
@pytest.mark.parametrize("capacity", [1, 3])
def test_sparse_buffer_overflow_falls_back_exactly(gen, separation, alpha, capacity):
    """Small beta gives wide supports: the candidate buffer overflows and Newton passes over the
    bank settle the threshold."""
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=200)
    kwargs = dict(beta=0.05, similarity="dot", separation=separation, alpha=alpha)
    out, info = run_backend(
        "triton", queries, memories, values, gen=gen, capacity=capacity, splits=3, **kwargs
    )
    assert int(info.support.max()) > capacity  # the fallback really ran
    check_against_reference(out, info, queries, memories, values, backend="triton", **kwargs)
    eye = torch.eye(memories.shape[0])
    p, _ = run_backend("triton", queries, memories, eye, capacity=capacity, **kwargs)
    assert (p.sum(dim=1) - 1).abs().max() < 1e-5


def test_auto_never_picks_the_interpreter_and_refuses_what_it_cannot_do():
    queries, memories = torch.randn(3, 5, device=DEVICE), torch.randn(9, 5, device=DEVICE)
    assert "triton" not in hen_fast.available_backends("cpu")
    with pytest.raises(hen_fast.BackendUnavailableError, match="not float64"):
        hen_fast.retrieve(queries.double(), memories.double(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_large_banks_on_gpu(dtype, separation):
    generator = torch.Generator(device="cuda").manual_seed(0)
    memories = torch.randn(1_000_000, 128, device="cuda", generator=generator, dtype=dtype)
    queries = memories[:16].float() + 0.1 * torch.randn(
        16, 128, device="cuda", dtype=torch.float32, generator=generator
    )
    queries = queries.to(dtype)
    kwargs = dict(beta=0.2, similarity="dot", separation=separation, alpha=1.5)
    out = hen_fast.retrieve(queries, memories, backend="triton", **kwargs)
    expected, _ = torch_backend.retrieve(queries, memories, **kwargs)
    tolerance = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out, expected) < tolerance


def test_bank_norms_are_computed_once_and_refreshed_after_in_place_changes(monkeypatch):
    from hen_fast.backends import norms

    bank = torch.randn(50, 6)
    first = norms.cached_sq_norms(bank)
    assert norms.cached_sq_norms(bank) is first
    assert torch.allclose(first, (bank.double() ** 2).sum(1).float())
    bank[3] *= 2  # in place: the version counter moves
    refreshed = norms.cached_sq_norms(bank)
    assert refreshed is not first and torch.allclose(refreshed, (bank**2).sum(1))
    key = id(bank)
    del bank
    assert key not in norms._NORMS_CACHE


def test_every_kernel_compiles_for_hopper_and_ampere():
    """The kernels as a GPU would build them (sm_90 and sm_80 cubins), checked without one:
    every kernel of the backend, the backward and separation-loss kernels included."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "hen_fast.backends.triton.compile_check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    assert len(results) >= 50 and not failed, failed or done.stderr[-2000:]
    assert done.returncode == 0
    compiled = {r["kernel"] for r in results}
    kernels = {"dense._dense_pass_kernel", "dense._combine_kernel", "sparse._candidates_kernel",
               "sparse._gather_kernel", "stats._threshold_stats_kernel",
               "backward._slope_values_kernel", "backward._grad_queries_kernel",
               "backward._grad_bank_kernel", "separation_loss._pair_stats_kernel"}  # fmt: skip
    assert kernels <= compiled, kernels - compiled


def test_compile_check_covers_every_kernel_of_the_backend():
    """A kernel added to the backend without a compile_check variant fails here (fast: nothing
    is compiled)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "from hen_fast.backends.triton import compile_check as c\n"
        "kernels = c.all_kernels()\n"
        "assert len(kernels) >= 9, sorted(kernels)\n"
        "assert not c.missing_kernels(), c.missing_kernels()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_blocks_of_converged_queries_stream_nothing(gen):
    """The device-side tol loop skips work: a query block whose rows are all inactive reads no
    tile (a -inf threshold would otherwise count every memory), an active block reads all."""
    from hen_fast.backends.triton.retrieve import launch_config
    from hen_fast.backends.triton.stats import threshold_stats

    queries = torch.randn(40, 6, generator=gen).to(DEVICE)
    memories = torch.randn(300, 6, generator=gen).to(DEVICE)
    config = launch_config(6, 6, 40, "dot", queries, memories)
    active = torch.zeros(40, dtype=torch.int32, device=DEVICE)
    active[config["BLOCK_B"]] = 1  # one row of the second block only
    count, _, _ = threshold_stats(
        queries,
        memories,
        None,
        active,
        torch.zeros(40, device=DEVICE),
        torch.full((40,), -math.inf, device=DEVICE),
        scale=1.0,
        similarity_code=0,
        splits=3,
        config=config,
    )
    block, count = config["BLOCK_B"], count.cpu()
    assert count[:block].eq(0).all() and count[block : 2 * block].eq(300).all()
    assert count[2 * block :].eq(0).all()


@pytest.mark.parametrize("separation", ["softmax", "entmax"])
def test_unspecialised_odd_strides_backward(gen, separation):
    from test_backward import check_gradients

    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=100)
    odd = [odd_strides(t.contiguous(), gen) for t in (queries, memories, values)]
    check_gradients("triton", *odd, gen=gen, device=DEVICE.type, beta=0.5, similarity="l2",
                    separation=separation, alpha=1.5)  # fmt: skip
