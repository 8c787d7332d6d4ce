"""The Triton backend against the float64 oracle, on the CPU through TRITON_INTERPRET=1 (small
shapes) and on a GPU (tests marked gpu). Every output buffer the kernels write is poisoned first."""

import math

import pytest
import torch

pytest.importorskip("triton")

import hen_fast  # noqa: E402
from hen_fast import RetrieveInfo, oracle  # noqa: E402
from hen_fast.backends import torch_backend  # noqa: E402

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


def _on_device(value):
    return value.to(DEVICE) if isinstance(value, torch.Tensor) else value


def _triton(*args, **kwargs):
    """The Triton backend on DEVICE (inputs moved there), its results back on the CPU."""
    from hen_fast.backends.triton.retrieve import retrieve

    args = [_on_device(a) for a in args]
    out, info = retrieve(*args, **{key: _on_device(v) for key, v in kwargs.items()})
    if info is not None:
        info = RetrieveInfo(*(t.cpu() for t in info.as_tuple()))
    return out.cpu(), info


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
        *(t.to(DEVICE) for t in (queries[0], memories, values)),
        backend="triton", beta=0.5, separation="entmax", alpha=1.7,
    ).cpu()  # fmt: skip
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
        expected = oracle.naive_retrieve(queries, memories, values, beta=0.5, separation=separation)
        assert out.dtype == query_dtype
        assert rel_err(out, expected) < 2e-3


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
            oracle.naive_retrieve(queries, memories, separation="polynomial", degree=3)[1],
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


# ------------------------------------------------------------------------------------ extremes
EXTREME_BETAS = (1e3, 1e8, 1e30)


def _exact_problem(gen, num_queries, num_memories, dim, value_dim, scale=1.0):
    """Inputs on a grid of 1/64 (times a power of two ``scale``): every similarity is exact in
    float32, so a float32 kernel and the float64 oracle see the same scores, the same ties, and
    gaps of at least 2^-12 * scale^2 between different scores."""

    def grid(*shape):
        return torch.randint(-64, 65, shape, generator=gen).float() / 64

    memories, values = grid(num_memories, dim) * scale, grid(num_memories, value_dim)
    if num_memories > 4:  # duplicated memories: exact ties, wherever they fall in the ranking
        memories[num_memories - 1] = memories[1]
        memories[num_memories // 2] = memories[1]
    queries = grid(num_queries, dim) * scale
    queries[0] = memories[min(1, num_memories - 1)]
    return queries, memories, values


def _float64_expectation(queries, memories, values, *, beta, similarity, separation, alpha):
    """(the float64 output, its argmax limit). The oracle's weights are computed on scores
    shifted to a row maximum of 0 (the same weights, exactly: softmax and entmax are shift
    invariant, polynomial is beta invariant), so they stay finite at any beta; the limit puts
    all weight on the best-scoring memories, split evenly among exact ties."""
    scores = oracle.naive_scores(queries, memories, similarity)
    top = scores.max(dim=1, keepdim=True).values
    if separation == "polynomial":
        weights = oracle.naive_separation(scores, "polynomial")
    else:
        weights = oracle.naive_separation(beta * (scores - top), separation, alpha)
    best = (scores == top).double()
    limit = (best / best.sum(dim=1, keepdim=True)) @ values.double()
    return weights @ values.double(), limit, scores.argmax(dim=1)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_extreme_beta_and_scores_are_finite_and_exact(combo):
    """beta 1e3, 1e8 and 1e30 (beta * score far past float32's range) on exact scores, with ties
    and duplicated memories, one-memory banks, d = 1, and scores near float32's maximum: the
    float64 oracle's output, the argmax limit once beta is large, never NaN. The sparse
    separations also take the Newton fallback (a candidate buffer of 2)."""
    similarity, separation, alpha = combo
    gen = torch.Generator().manual_seed(12)
    huge = 2.0**60 if similarity != "manhattan" else 2.0**120  # scores ~1e37
    cases = [
        ("ties", _exact_problem(gen, 5, 37, 6, 3)),
        ("one memory", _exact_problem(gen, 3, 1, 4, 2)),
        ("d = 1", _exact_problem(gen, 4, 9, 1, 2)),
        ("scores near float32 max", _exact_problem(gen, 3, 11, 6, 2, scale=huge)),
    ]
    sparse = separation in ("sparsemax", "entmax")
    for name, (queries, memories, values) in cases:
        for beta in EXTREME_BETAS:
            kwargs = dict(beta=beta, similarity=similarity, separation=separation, alpha=alpha)
            expected, limit, first_best = _float64_expectation(queries, memories, values, **kwargs)
            for capacity in (256, 2) if sparse else (256,):
                out, info = _triton(
                    queries, memories, values, return_info=True, capacity=capacity, **kwargs
                )
                where = (name, beta, capacity)
                assert bool(torch.isfinite(out).all()), where
                assert rel_err(out, expected) < 1e-5, (where, rel_err(out, expected))
                if beta == 1e30 and separation != "polynomial":
                    assert rel_err(out, limit) < 1e-6, where
                assert torch.equal(info.argmax, first_best), where


@pytest.mark.parametrize("separation", ["softmax", "sparsemax", "entmax", "polynomial"])
def test_scores_that_overflow_float32_give_the_limit(separation):
    """beta * score = 1e30 * ~1e9 is +inf in float32 for every memory: the best one still takes
    all the weight (not a NaN from inf - inf, nor an even split over every overflowed score)."""
    memories = torch.tensor([[3.0e4], [3.2e4], [-3.0e4], [3.1e4]])
    queries = torch.tensor([[3.0e4], [-3.0e4]])
    values = torch.eye(4)
    for splits in (1, 3):
        out = _triton(queries, memories, values, beta=1e30, separation=separation,
                      num_splits_override=splits)[0]  # fmt: skip
        if separation == "polynomial":  # relu(z)^10 normalised: beta cancels; row 2 is zero
            expected = oracle.naive_retrieve(queries, memories, values, separation=separation)
            assert rel_err(out, expected) < 1e-5
        else:
            assert torch.equal(out, torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0]]))


def test_a_split_whose_scores_are_all_minus_inf_adds_nothing():
    """l2 scores of -1e30 * 1e9: -inf in float32 for a whole bank split and tile. The online
    softmax and the split merge shift such rows by 0 instead of computing exp(-inf - -inf)."""
    memories = torch.cat([torch.full((300, 2), 3.0e4), torch.zeros(5, 2)])
    values = torch.arange(305.0)[:, None]
    queries = torch.zeros(1, 2)
    for separation in ("softmax", "sparsemax", "entmax"):
        out = _triton(queries, memories, values, beta=1e30, similarity="l2",
                      separation=separation, num_splits_override=2)[0]  # fmt: skip
        assert torch.equal(out, torch.tensor([[302.0]])), separation  # the mean of 300..304


def _odd_strides(tensor: torch.Tensor, gen) -> torch.Tensor:
    """The same values in a view whose strides are odd, neither 1 nor a multiple of 16: Triton
    specialises integer arguments equal to 1 or divisible by 16, so this runs the generic path
    (row stride an odd number above 3 x cols, column stride 3). The gaps hold NaN."""
    rows, cols = tensor.shape
    row_stride = 3 * cols + 2 * randint(gen, 0, 4) + 1 + (3 * cols % 2)
    if row_stride % 16 == 0:
        row_stride += 2
    buffer = torch.full(((rows - 1) * row_stride + 3 * (cols - 1) + 1,), float("nan"))
    view = buffer.to(tensor.dtype).as_strided((rows, cols), (row_stride, 3))
    view.copy_(tensor)
    assert all(s != 1 and s % 16 for s in view.stride()), view.stride()
    return view


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_unspecialised_odd_strides(gen, combo):
    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=150)
    odd = [_odd_strides(t.contiguous(), gen) for t in (queries, memories, values)]
    out, info = _triton(*odd, return_info=True, num_splits_override=2, **combo_kwargs(combo))
    _check(out, info, queries, memories, values, **combo_kwargs(combo))


@pytest.mark.parametrize("separation", ["softmax", "entmax"])
def test_unspecialised_odd_strides_backward(gen, separation):
    from test_backward import check_gradients

    queries, memories, values = random_problem(gen, dtype=torch.float32, max_memories=100)
    odd = [_odd_strides(t.contiguous(), gen) for t in (queries, memories, values)]
    check_gradients("triton", *odd, gen=gen, device=DEVICE, beta=0.5, similarity="l2",
                    separation=separation, alpha=1.5)  # fmt: skip
