"""The Triton backend against hen_fast.reference, on the CPU through TRITON_INTERPRET=1 (small
shapes) and on a GPU (tests marked gpu). Every output buffer the kernels write is poisoned first."""

import math

import pytest
import torch

pytest.importorskip("triton")

import hen_fast  # noqa: E402
from hen_fast import reference  # noqa: E402

from helpers import (  # noqa: E402
    COMBINATIONS,
    combo_id,
    combo_kwargs,
    randint,
    random_problem,
    rel_err,
)
from helpers import (
    check_against_reference as _check,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def _triton(*args, **kwargs):
    from hen_fast.backends.triton.retrieve import retrieve

    return retrieve(*args, **kwargs)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_matches_reference(gen, combo, steps):
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, same_dims=steps > 1, max_queries=20, max_memories=300
    )
    values = None if steps > 1 else values
    out, info = hen_fast.retrieve(
        queries.to(DEVICE),
        memories.to(DEVICE),
        None if values is None else values.to(DEVICE),
        steps=steps,
        backend="triton",
        return_info=True,
        **combo_kwargs(combo),
    )
    assert out.dtype == torch.float32 and out.device.type == DEVICE
    _check(out.cpu(), info, queries, memories, values, steps=steps, **combo_kwargs(combo))


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_forced_splits_and_row_blocks(gen, combo):
    """Many splits (some empty of work), several query blocks, a bank that is no tile multiple."""
    queries, memories, values = random_problem(
        gen, dtype=torch.float32, max_queries=40, max_memories=400
    )
    splits = randint(gen, 2, 7)
    out, info = _triton(
        queries,
        memories,
        values,
        return_info=True,
        num_splits_override=splits,
        **combo_kwargs(combo),
    )
    _check(out, info, queries, memories, values, **combo_kwargs(combo))


@pytest.mark.parametrize(
    "separation, alpha", [("sparsemax", 1.5), ("entmax", 1.5), ("entmax", 1.3)]
)
@pytest.mark.parametrize("capacity", [1, 3])
def test_sparse_buffer_overflow_falls_back_exactly(gen, separation, alpha, capacity):
    """Small beta gives wide supports: the candidate buffer overflows and Newton passes over the
    bank settle the threshold."""
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=200)
    kwargs = dict(beta=0.05, similarity="dot", separation=separation, alpha=alpha)
    out, info = _triton(
        queries,
        memories,
        values,
        return_info=True,
        capacity=capacity,
        num_splits_override=3,
        **kwargs,
    )
    assert int(info.support.max()) > capacity  # the fallback really ran
    _check(out, info, queries, memories, values, **kwargs)
    p, _ = _triton(queries, memories, torch.eye(memories.shape[0]), capacity=capacity, **kwargs)
    assert (p.sum(dim=1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if c[2] in (1.5, 1.25)], ids=combo_id)
def test_steps_tol_and_clamp_on_the_device(gen, combo):
    queries, memories, _ = random_problem(gen, dtype=torch.float32, same_dims=True)
    mask = torch.rand(queries.shape[1], generator=gen) < 0.3
    kwargs = dict(combo_kwargs(combo), steps=5, tol=1e-3, clamp_mask=mask)
    out, info = _triton(queries, memories, return_info=True, **kwargs)
    _check(out, info, queries, memories, None, **kwargs)
    assert torch.equal(out[:, mask], queries[:, mask])


def test_single_query_and_strided_inputs_through_the_api(gen):
    queries, memories, values = random_problem(gen, dtype=torch.float32)
    out = hen_fast.retrieve(
        queries[0], memories, values, backend="triton", beta=0.5, separation="entmax", alpha=1.7
    )
    expected = hen_fast.retrieve(
        queries[0], memories, values, backend="torch", beta=0.5, separation="entmax", alpha=1.7
    )
    assert out.shape == expected.shape and rel_err(out, expected) < 1e-5


@pytest.mark.parametrize(
    "query_dtype, bank_dtype",
    [
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
        (torch.float32, torch.float16),
    ],
)
def test_half_and_mixed_precision_inputs(gen, query_dtype, bank_dtype):
    """float16 runs in the interpreter (bfloat16 does not: it is checked on a GPU)."""
    queries, memories, values = random_problem(gen)
    queries, memories, values = (
        queries.to(query_dtype),
        memories.to(bank_dtype),
        values.to(bank_dtype),
    )
    for separation in ("softmax", "sparsemax"):
        out = _triton(queries, memories, values, beta=0.5, separation=separation)[0]
        expected = reference.naive_retrieve(
            queries, memories, values, beta=0.5, separation=separation
        )
        assert out.dtype == query_dtype
        assert rel_err(out, expected) < 2e-3


def test_auto_never_picks_the_interpreter_and_refuses_what_it_cannot_do():
    queries, memories = torch.randn(3, 5), torch.randn(9, 5)
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
    expected, _ = reference.retrieve(queries, memories, **kwargs)
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


def test_gpu_benchmark_script_smoke(tmp_path):
    """The benchmark's whole path (ceilings, baselines, records, JSON, PNG) on tiny shapes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bench_retrieve_gpu.py"
    out = tmp_path / "smoke.json"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--smoke",
            "--out",
            str(out),
            "--separations",
            "softmax",
            "sparsemax",
        ],
        check=True,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    assert {"device", "date", "versions", "ceilings", "records"} <= set(result)
    record = result["records"][0]
    for field in (
        "op",
        "similarity",
        "separation",
        "alpha",
        "B",
        "M",
        "d",
        "dv",
        "dtype",
        "steps",
        "backend",
        "ms",
        "gbps",
        "tflops",
        "roofline_fraction",
        "baselines",
    ):
        assert field in record
    assert set(record["baselines"]) == {"torch_eager", "torch_compile", "sdpa", "entmax"}
    assert len(result["records"]) == 2 * 3 * 2  # B values x similarities x separations
    assert out.with_suffix(".png").stat().st_size > 0


def test_every_kernel_compiles_for_hopper_and_ampere():
    """The kernels as a GPU would build them (sm_90 and sm_80 cubins), checked without one."""
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
        timeout=900,
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    assert len(results) >= 40 and not failed, failed or done.stderr[-2000:]
    assert done.returncode == 0


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if c[2] in (1.5, 1.25)], ids=combo_id)
def test_degenerate_shapes(gen, combo):
    """One memory, one feature, one value column, one query."""
    for num_queries, num_memories, dim, value_dim in [(1, 1, 1, 1), (3, 1, 5, 2), (1, 7, 1, 1)]:
        queries = torch.randn(num_queries, dim, generator=gen)
        memories = torch.randn(num_memories, dim, generator=gen)
        values = torch.randn(num_memories, value_dim, generator=gen)
        out, info = _triton(queries, memories, values, return_info=True, **combo_kwargs(combo))
        _check(out, info, queries, memories, values, **combo_kwargs(combo))


def test_polynomial_rows_with_no_positive_score_are_zero(gen):
    memories = torch.rand(40, 6, generator=gen) + 0.1
    queries = torch.stack([-torch.rand(6, generator=gen), memories[3]])
    out, info = _triton(
        queries,
        memories,
        separation="polynomial",
        degree=3,
        return_info=True,
        num_splits_override=3,
    )
    assert torch.equal(out[0], torch.zeros(6))
    assert info.support.tolist() == [0, 40] and info.lse[0] == -math.inf
    assert (
        rel_err(
            out[1],
            reference.naive_retrieve(queries, memories, separation="polynomial", degree=3)[1],
        )
        < 1e-5
    )


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_argmax_ties_take_the_first_memory_across_splits(separation):
    memories = torch.randn(700, 4, generator=torch.Generator().manual_seed(1))
    memories[2] *= 10
    memories[650] = memories[2]  # the same top score in another split
    _, info = _triton(
        memories[2:3], memories, separation=separation, return_info=True, num_splits_override=3
    )
    assert info.argmax.item() == 2


def test_large_beta_is_the_nearest_memory(gen):
    memories = torch.randn(300, 8, generator=gen)
    queries = memories[:5] + 0.01 * torch.randn(5, 8, generator=gen)
    for separation in ("softmax", "sparsemax", "entmax"):
        out, info = _triton(
            queries, memories, beta=1e4, similarity="l2", separation=separation, return_info=True
        )
        assert torch.equal(info.argmax, torch.arange(5))
        assert rel_err(out, memories[:5]) < 1e-6


def test_blocks_of_converged_queries_stream_nothing(gen):
    """The device-side tol loop skips work: a query block whose rows are all inactive reads no
    tile (a -inf threshold would otherwise count every memory), an active block reads all."""
    from hen_fast.backends.triton.retrieve import launch_config
    from hen_fast.backends.triton.stats import threshold_stats

    queries, memories = torch.randn(40, 6, generator=gen), torch.randn(300, 6, generator=gen)
    config = launch_config(6, 6, 40, "dot", queries, memories)
    active = torch.zeros(40, dtype=torch.int32)
    active[config["BLOCK_B"]] = 1  # one row of the second block only
    count, _, _ = threshold_stats(
        queries,
        memories,
        None,
        active,
        torch.zeros(40),
        torch.full((40,), -math.inf),
        scale=1.0,
        similarity_code=0,
        splits=3,
        config=config,
    )
    block = config["BLOCK_B"]
    assert count[:block].eq(0).all() and count[block : 2 * block].eq(300).all()
    assert count[2 * block :].eq(0).all()
