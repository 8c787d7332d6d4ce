"""Hostile inputs and faults: property tests across every available backend, concurrent retrieval
from threads on one bank, a process killed during save, corrupted and truncated bank files."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hen_fast
from hen_fast import BankIntegrityError, MemoryBank, oracle

from helpers import COMBINATIONS, rel_err

CPU_BACKENDS = [name for name in ("torch", "cpu") if name in hen_fast.available_backends()]
TRITON = "triton" in hen_fast.available_backends()
HALF = (torch.float16, torch.bfloat16)
SETTINGS = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
# Huge scores are covered by test_sparse_thresholds_survive_huge_scores below and by
# tests/test_extremes.py; the property tests here stay at moderate scores.
SPARSE_SAFE_SCORE = 1e4


@st.composite
def problems(draw, backends, max_size=9, dtypes=(torch.float32, torch.float64) + HALF):
    backend = draw(st.sampled_from(backends))
    allowed = [t for t in dtypes if t != torch.float64 or backend == "torch"]
    return dict(
        backend=backend,
        combo=draw(st.sampled_from(COMBINATIONS)),
        dtype=draw(st.sampled_from(allowed)),
        sizes=[draw(st.integers(1, max_size)) for _ in range(4)],  # B, M, d, dv
        beta=10 ** draw(st.floats(-3, 4)),
        scale=10 ** draw(st.integers(-10, 15)),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensors(problem):
    gen = torch.Generator().manual_seed(problem["seed"])
    num_queries, num_memories, dim, value_dim = problem["sizes"]
    dtype, scale = problem["dtype"], problem["scale"]

    def make(rows, cols):
        data = (scale * torch.randn(rows, cols, generator=gen, dtype=torch.float64)).to(dtype)
        if problem["strided"]:
            return data.T.contiguous().T
        return data

    return make(num_queries, dim), make(num_memories, dim), make(num_memories, value_dim)


def _score_rounding(queries, keys, similarity, beta):
    """A bound on the float32 rounding of one scaled score, from the size of its terms."""
    x, k = queries.double().abs(), keys.double().abs()
    if similarity == "dot":
        size = (x @ k.T).max()
    elif similarity == "l2":
        size = ((x[:, None] + k[None]) ** 2).sum(-1).max()
    else:
        size = (x[:, None] + k[None]).sum(-1).max()
    return float(8 * queries.shape[1] * 2.0**-24 * beta * size)


def _check_property(problem):
    """The reference's answer or the promised error; never a crash, never a silent NaN."""
    similarity, separation, alpha = problem["combo"]
    queries, keys, values = _tensors(problem)
    kwargs = dict(beta=problem["beta"], similarity=similarity, separation=separation, alpha=alpha)
    finite = all(bool(torch.isfinite(t).all()) for t in (queries, keys, values))
    if not finite:  # the cast to half precision overflowed: the promised error
        with pytest.raises(ValueError, match="NaN or Inf"):
            hen_fast.retrieve(queries, keys, values, backend=problem["backend"], **kwargs)
        return
    true_scores = oracle.naive_scores(queries, keys, similarity)
    if separation in ("sparsemax", "entmax"):
        assume(problem["beta"] * float(true_scores.abs().max()) <= SPARSE_SAFE_SCORE)
    out = hen_fast.retrieve(queries, keys, values, backend=problem["backend"], **kwargs)
    assert out.shape == (queries.shape[0], values.shape[1]) and out.dtype == queries.dtype
    assert bool(torch.isfinite(out).all()), "a NaN or Inf output from finite inputs"
    out, values64 = out.double(), values.double()
    output_rounding = 2.0**-7 if queries.dtype in HALF else 2.0**-22
    info = torch.finfo(queries.dtype)
    span = float(values64.abs().max())
    slack = 4 * (output_rounding * span + info.tiny * info.eps)  # subnormal spacing too
    # Separation weights are a probability vector (or all zero for a polynomial row whose scores
    # are all <= 0), so every output lies in the box that the values (and 0) span.
    low, high = values64.min(0).values, values64.max(0).values
    if separation == "polynomial":
        low, high = low.clamp(max=0), high.clamp(min=0)
    assert bool((out >= low - slack).all()), "output below every value"
    assert bool((out <= high + slack).all()), "output above every value"
    expected = oracle.naive_retrieve(queries, keys, values, **kwargs)
    # Where the scores' rounding cannot move the weights (a well-conditioned draw), the answer
    # must be the float64 one; elsewhere only the properties above can be promised.
    rounding = _score_rounding(queries, keys, similarity, problem["beta"])
    if separation == "polynomial":
        top = (problem["beta"] * oracle.naive_scores(queries, keys, "dot")).max(1).values
        rounding *= 10 / max(float(top.clamp(min=0).min()), 1e-300)
    if rounding < 1e-7:
        error = float((out - expected).abs().max())
        assert error <= (1e-5 + 4 * output_rounding) * span + slack, (error, span, rounding)


@settings(max_examples=60, **SETTINGS)
@given(problems(CPU_BACKENDS))
def test_cpu_backends_on_random_hostile_inputs(problem):
    _check_property(problem)


@pytest.mark.skipif(not TRITON, reason="triton is not available")
@settings(max_examples=6, **SETTINGS)
@given(problems(["triton"], max_size=5, dtypes=(torch.float32,)))
def test_triton_on_random_hostile_inputs(problem):
    _check_property(problem)


@settings(max_examples=25, **SETTINGS)
@given(
    problems(CPU_BACKENDS),
    st.sampled_from(["queries", "memories", "values"]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_non_finite_inputs_raise_unless_unchecked(problem, where, bad):
    queries, keys, values = _tensors(problem)
    assume(all(bool(torch.isfinite(t).all()) for t in (queries, keys, values)))
    target = {"queries": queries, "memories": keys, "values": values}[where]
    position = problem["seed"] % target.numel()
    target[position // target.shape[1], position % target.shape[1]] = bad
    similarity, separation, alpha = problem["combo"]
    kwargs = dict(beta=problem["beta"], similarity=similarity, separation=separation,
                  alpha=alpha, backend=problem["backend"])  # fmt: skip
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        hen_fast.retrieve(queries, keys, values, **kwargs)
    # Unchecked, garbage in may give garbage out, but never a crash.
    out = hen_fast.retrieve(queries, keys, values, check_finite=False, **kwargs)
    assert out.shape == (queries.shape[0], values.shape[1])


@pytest.mark.parametrize("separation", ["sparsemax", "entmax"])
@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if TRITON else []) + ["streamed"])
def test_sparse_thresholds_survive_huge_scores(backend, separation):
    """One memory scoring 1e8 and one scoring 0: the weights are exactly (1, 0), in float32,
    in one pass (thresholds are relative to the row maximum, so nothing cancels)."""
    queries, keys = torch.tensor([[1e4]]), torch.tensor([[1e4], [0.0]])
    values = torch.tensor([[1.0], [2.0]])
    kwargs = dict(separation=separation)
    if backend == "streamed":
        kwargs["memory_cap"] = 8
    else:
        kwargs["backend"] = backend
    out, info = hen_fast.retrieve(queries, keys, values, return_info=True, **kwargs)
    assert out.item() == 1.0
    assert info.support.item() == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_inputs_raise_naming_the_argument(backend):
    def call(queries, keys, values=None):
        return hen_fast.retrieve(queries, keys, values, backend=backend)

    with pytest.raises(ValueError, match="queries must hold at least one query"):
        call(torch.empty(0, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="memories is empty"):
        call(torch.randn(2, 3), torch.empty(0, 3))
    with pytest.raises(ValueError, match="memories is empty"):
        call(torch.randn(2, 3), MemoryBank(torch.empty(0, 3)))
    with pytest.raises(ValueError, match="queries must have at least one feature"):
        call(torch.empty(2, 0), torch.empty(4, 0))
    with pytest.raises(ValueError, match="values must have at least one column"):
        call(torch.randn(2, 3), torch.randn(4, 3), torch.empty(4, 0))


# ------------------------------------------------------------------------------------ threads
def test_concurrent_retrieve_from_threads_on_one_bank(gen):
    """Readers on several threads while a writer appends: every answer is the answer for one
    whole version of the bank (never keys of one version with values or norms of another)."""
    keys, values = torch.randn(300, 16, generator=gen), torch.randn(300, 8, generator=gen)
    batches = [(torch.randn(40, 16, generator=gen), torch.randn(40, 8, generator=gen))
               for _ in range(3)]  # fmt: skip
    queries = torch.randn(6, 16, generator=gen)
    kwargs = dict(beta=0.3, similarity="l2", separation="entmax", alpha=1.5)
    versions = [(keys, values)]
    for new_keys, new_values in batches:
        versions.append((torch.cat([versions[-1][0], new_keys]),
                         torch.cat([versions[-1][1], new_values])))  # fmt: skip
    answers = [hen_fast.retrieve(queries, k, v, **kwargs) for k, v in versions]
    bank = MemoryBank(keys, values)
    results, errors = [], []

    def reader():
        try:
            for _ in range(8):
                results.append(hen_fast.retrieve(queries, bank, **kwargs))
        except Exception as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)

    def writer():
        for new_keys, new_values in batches:
            bank.append(new_keys, new_values)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 32 and len(bank) == 420
    for result in results:
        assert min(rel_err(result, answer) for answer in answers) < 1e-6


# ------------------------------------------------------------------------------- file faults
_KILLED_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    from hen_fast import bank as bank_module
    path, stage = sys.argv[1], sys.argv[2]
    real_write, real_replace = bank_module._write_blob, bank_module.os.replace

    def stall():
        print("stalled", flush=True)
        time.sleep(600)

    def write_half(file, blob):
        if len(blob) > 1000:  # the tensor data: write half of it, then wait to be killed
            real_write(file, blob[: len(blob) // 2])
            file.flush()
            stall()
        real_write(file, blob)

    if stage == "writing":
        bank_module._write_blob = write_half
    else:  # the new file is complete and synced; the kill lands just before the rename
        bank_module.os.replace = lambda *args: stall()
    bank_module.MemoryBank(torch.ones(500, 8)).save(path)
    """
)


@pytest.mark.parametrize("stage", ["writing", "before-rename"])
def test_killing_a_save_leaves_the_previous_bank_intact(tmp_path, gen, stage):
    path = tmp_path / "bank.safetensors"
    old = MemoryBank(torch.randn(7, 8, generator=gen), torch.randn(7, 2, generator=gen))
    old.save(path)
    before = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path), stage],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "stalled"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    loaded = MemoryBank.load(path)
    assert torch.equal(loaded.keys, old.keys) and torch.equal(loaded.values, old.values)
    # The killed save left its temporary file beside the bank: half written, it is refused;
    # complete (killed before the rename), it holds the new bank.
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".partial")
    if stage == "writing":
        with pytest.raises(BankIntegrityError):
            MemoryBank.load(leftovers[0])
    else:
        assert torch.equal(MemoryBank.load(leftovers[0]).keys, torch.ones(500, 8))


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_every_flipped_byte_and_every_truncation_is_refused(tmp_path, gen, mmap):
    path = tmp_path / "bank"
    bank = MemoryBank(torch.randn(3, 2, generator=gen), torch.randn(3, 1, generator=gen))
    intact = bank.save(path).read_bytes()
    corrupted = tmp_path / "corrupted"
    stride = 3 if mmap else 1  # mapping a file costs more than reading a small one
    for position in range(0, len(intact), stride):
        flipped = bytearray(intact)
        flipped[position] ^= 0xFF
        corrupted.write_bytes(bytes(flipped))
        with pytest.raises(BankIntegrityError, match="corrupted"):
            MemoryBank.load(corrupted, mmap=mmap)
    for length in range(0, len(intact), stride):
        corrupted.write_bytes(intact[:length])
        with pytest.raises(BankIntegrityError, match="corrupted"):
            MemoryBank.load(corrupted, mmap=mmap)
    assert torch.equal(MemoryBank.load(path, mmap=mmap).keys, bank.keys)
