"""MemoryBank (ids, append/remove, norms reuse, save/load) and out-of-core streaming."""

from __future__ import annotations

import pytest
import torch

import hen_fast
from hen_fast import BankIntegrityError, MemoryBank, oracle
from hen_fast.backends.norms import cached_sq_norms

from helpers import (
    COMBINATIONS,
    check_against_reference,
    combo_id,
    combo_kwargs,
    rel_err,
    strided,
    tolerance,
    value_scale,
)

BACKENDS = [name for name in ("torch", "cpu") if name in hen_fast.available_backends()]


def _bank_bytes(keys, values=None) -> int:
    size = keys.numel() * keys.element_size()
    return size + (0 if values is None else values.numel() * values.element_size())


# ------------------------------------------------------------------------------------ the bank
def test_bank_holds_keys_values_norms_and_ids(gen):
    keys, values = torch.randn(9, 5, generator=gen), torch.randn(9, 3, generator=gen)
    bank = MemoryBank(keys, values)
    assert len(bank) == 9 and bank.ids.tolist() == list(range(9))
    assert bank.norms.dtype == torch.float32
    torch.testing.assert_close(bank.norms, keys.pow(2).sum(1))
    new_ids = bank.append(torch.randn(2, 5, generator=gen), torch.randn(2, 3, generator=gen))
    assert new_ids.tolist() == [9, 10] and len(bank) == 11
    assert bank.remove([0, 10]) == 2
    assert bank.ids.tolist() == list(range(1, 10))
    torch.testing.assert_close(bank.keys[:8], keys[1:])
    torch.testing.assert_close(bank.norms, bank.keys.pow(2).sum(1))
    # ids stay stable and are never reused after a removal
    assert bank.append(torch.randn(1, 5), torch.randn(1, 3)).tolist() == [11]
    auto = MemoryBank(keys, ids=[7, 3, 5, 1, 2, 4, 6, 8, 100])
    assert auto.auto_associative and auto.values is auto.keys
    assert auto.append(torch.randn(1, 5)).tolist() == [101]


def test_bank_rejects_bad_changes_and_changes_nothing(gen):
    bank = MemoryBank(torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen))
    before = (bank.keys, bank.values, bank.ids)
    with pytest.raises(ValueError, match="ids not in the bank"):
        bank.remove([1, 99])
    with pytest.raises(ValueError, match="ids already in the bank"):
        bank.append(torch.randn(1, 3), torch.randn(1, 2), ids=[2])
    with pytest.raises(ValueError, match="keys must have the bank's 3 columns"):
        bank.append(torch.randn(1, 4), torch.randn(1, 2))
    with pytest.raises(ValueError, match="keys must match the bank's torch.float32"):
        bank.append(torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2))
    with pytest.raises(ValueError, match="values: this bank stores values"):
        bank.append(torch.randn(1, 3))
    with pytest.raises(ValueError, match="values must have one row per key"):
        bank.append(torch.randn(2, 3), torch.randn(1, 2))
    with pytest.raises(ValueError, match="ids must be distinct"):
        MemoryBank(torch.randn(2, 3), ids=[1, 1])
    with pytest.raises(TypeError, match="keys must be a floating-point"):
        MemoryBank(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="values must be None when memories is a MemoryBank"):
        hen_fast.retrieve(torch.randn(3), bank, torch.randn(4, 2))
    assert (bank.keys, bank.values, bank.ids) == before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combo", COMBINATIONS[::3], ids=combo_id)
def test_retrieve_from_a_bank_equals_retrieve_from_its_tensors(backend, combo, gen):
    keys, values = torch.randn(37, 7, generator=gen), torch.randn(37, 5, generator=gen)
    queries = torch.randn(4, 7, generator=gen)
    bank = MemoryBank(keys, values)
    kwargs = combo_kwargs(combo)
    got = hen_fast.retrieve(queries, bank, backend=backend, **kwargs)
    want = hen_fast.retrieve(queries, keys, values, backend=backend, **kwargs)
    assert rel_err(got, want) < 1e-6


def test_bank_norms_are_the_backends_cached_norms(gen):
    bank = MemoryBank(torch.randn(20, 4, generator=gen))
    assert cached_sq_norms(bank.keys) is bank.norms
    bank.append(torch.randn(3, 4, generator=gen))
    assert cached_sq_norms(bank.keys) is bank.norms and bank.norms.shape == (23,)
    bank.keys.mul_(2)  # an in-place change: the cache notices, the bank's finiteness check too
    torch.testing.assert_close(cached_sq_norms(bank.keys), bank.keys.pow(2).sum(1))


def test_bank_finiteness_is_checked_and_rechecked_after_in_place_changes(gen):
    bank = MemoryBank(torch.randn(6, 3, generator=gen))
    query = torch.randn(3, generator=gen)
    hen_fast.retrieve(query, bank)
    bank.keys[2, 1] = float("inf")
    with pytest.raises(ValueError, match="MemoryBank.*NaN or Inf"):
        hen_fast.retrieve(query, bank)
    with pytest.raises(ValueError, match="queries contains NaN"):
        hen_fast.retrieve(torch.full((3,), float("nan")), MemoryBank(torch.randn(4, 3)))


# -------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("auto", [False, True], ids=["hetero", "auto"])
def test_save_load_round_trip(tmp_path, gen, dtype, auto):
    keys = torch.randn(13, 6, generator=gen).to(dtype)
    values = None if auto else torch.randn(13, 3, generator=gen).to(dtype)
    bank = MemoryBank(keys, values, ids=torch.arange(13) * 3 + 5)
    path = bank.save(tmp_path / "bank.safetensors")
    for mmap in (False, True):
        loaded = MemoryBank.load(path, mmap=mmap)
        assert loaded.mapped == mmap and loaded.auto_associative == auto
        assert torch.equal(loaded.keys, keys) and torch.equal(loaded.values, bank.values)
        assert torch.equal(loaded.norms, bank.norms) and torch.equal(loaded.ids, bank.ids)
        assert loaded.append(keys[:1], None if auto else values[:1]).tolist() == [42]
    # Any safetensors reader reads it (no private format, no pickle).
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        assert torch.equal(file.get_tensor("keys"), keys)
        assert '"version": 1' in file.metadata()["hen_fast"]


def test_save_replaces_a_bank_and_leaves_no_temporary_files(tmp_path, gen):
    path = tmp_path / "bank"
    MemoryBank(torch.randn(5, 2, generator=gen)).save(path)
    newer = MemoryBank(torch.randn(8, 2, generator=gen))
    newer.save(path)
    assert torch.equal(MemoryBank.load(path).keys, newer.keys)
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]
    with pytest.raises(FileNotFoundError):
        MemoryBank.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        newer.save(tmp_path / "no" / "such" / "dir" / "bank")


def test_load_refuses_another_format_version(tmp_path, gen):
    path = MemoryBank(torch.randn(3, 2, generator=gen)).save(tmp_path / "bank")
    raw = path.read_bytes()
    # Same length, so only the version differs ("version": 1 -> 7).
    changed = raw.replace(b'\\"version\\": 1', b'\\"version\\": 7')
    assert changed != raw
    path.write_bytes(changed)
    with pytest.raises(BankIntegrityError, match=r"bank.*format version 7"):
        MemoryBank.load(path)
    assert issubclass(BankIntegrityError, ValueError)


def _forged(bank: MemoryBank, **changes) -> MemoryBank:
    """The bank with some of its state replaced behind its back: saving it writes a file whose
    checksums are all right but whose derived state lies."""
    from dataclasses import replace

    next_id = changes.pop("next_id", None)
    bank._state = replace(bank._state, **changes)
    if next_id is not None:
        bank._next_id = next_id
    return bank


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mapped"])
def test_load_recomputes_derived_state_instead_of_trusting_it(tmp_path, gen, mmap):
    keys = torch.randn(300, 7, generator=gen)
    good = MemoryBank(keys).save(tmp_path / "good")
    assert torch.equal(MemoryBank.load(good, mmap=mmap).norms, (keys**2).sum(1))
    forgeries = {
        "zeroed norms": (dict(norms=torch.zeros(300)), r"norms do not match the keys \(row 0"),
        "one norm off": (
            dict(norms=(keys**2).sum(1).index_fill(0, torch.tensor([211]), 1.0)),
            "row 211",
        ),
        "repeated ids": (dict(ids=torch.zeros(300, dtype=torch.long)), "ids are not distinct"),
        "next id in use": (dict(next_id=299), "id 299 is not below the next free id 299"),
    }
    for name, (changes, message) in forgeries.items():
        path = _forged(MemoryBank(keys), **changes).save(tmp_path / name.replace(" ", "_"))
        with pytest.raises(BankIntegrityError, match=message):
            MemoryBank.load(path, mmap=mmap)


def test_load_accepts_non_finite_keys_and_their_norms(tmp_path):
    keys = torch.tensor([[1.0, float("nan")], [float("inf"), 0.0], [3.0, 4.0]])
    loaded = MemoryBank.load(MemoryBank(keys).save(tmp_path / "bank"))
    assert torch.equal(loaded.norms[2:], torch.tensor([25.0])) and loaded.norms[0].isnan()
    assert loaded.norms[1] == float("inf")


# ----------------------------------------------------------------------------------- streaming
# Every combination through the fastest CPU backend, every other one through the torch backend.
STREAM_CASES = [(BACKENDS[-1], combo) for combo in COMBINATIONS] + (
    [("torch", combo) for combo in COMBINATIONS[::2]] if len(BACKENDS) > 1 else []
)


@pytest.mark.parametrize(
    "backend, combo", STREAM_CASES, ids=[f"{b}-{combo_id(c)}" for b, c in STREAM_CASES]
)
def test_bank_four_times_the_memory_cap_retrieves_exactly(backend, combo, gen):
    num_memories, dim = 151, 9
    queries = strided(torch.randn(5, dim, generator=gen), gen)
    keys = strided(torch.randn(num_memories, dim, generator=gen), gen)
    values = torch.randn(num_memories, 4, generator=gen)
    kwargs = combo_kwargs(combo)
    for steps, vals in ((1, values), (3, None)):
        cap = _bank_bytes(keys, vals) // 4
        kwargs["steps"] = steps
        streamed, info = hen_fast.retrieve(queries, keys, vals, memory_cap=cap, backend=backend,
                                           return_info=True, **kwargs)  # fmt: skip
        in_memory = hen_fast.retrieve(queries, keys, vals, backend=backend, **kwargs)
        if steps == 1:
            assert rel_err(streamed, in_memory, scale=value_scale(values)) < tolerance()
        check_against_reference(streamed, info, queries, keys, vals, **kwargs)


@pytest.mark.parametrize("separation", ["sparsemax", "entmax"])
def test_streaming_sparse_rows_beyond_the_candidate_buffer(separation, gen):
    """Small beta spreads the support over most of the bank: with 4 candidates every row needs
    the Newton passes over the chunks. (At beta 0.05 a seed in twenty drew a row whose support
    was only 4: the premise must hold for every draw, so beta is 0.01.)"""
    from hen_fast import driver
    from hen_fast.options import check_arguments
    from hen_fast.sources import ChunkSource

    queries, keys = torch.randn(6, 8, generator=gen), torch.randn(90, 8, generator=gen)
    kwargs = dict(beta=0.01, similarity="dot", separation=separation, alpha=1.3, degree=10,
                  steps=2, tol=None, clamp_mask=None)  # fmt: skip
    args = check_arguments(queries, keys, None, return_info=True, check_finite=True, **kwargs)
    source = ChunkSource(keys, None, None, chunk_rows=17, device="cpu")
    out, info = driver.run(args, source, backend="torch", candidates=4)
    assert int(info.support.min()) > 4
    check_against_reference(out, info, queries, keys, None, **kwargs)


def test_memory_mapped_bank_streams_by_default(tmp_path, gen, monkeypatch):
    from hen_fast import sources

    keys = torch.randn(64, 6, generator=gen)
    values = torch.randn(64, 3, generator=gen)
    path = MemoryBank(keys, values).save(tmp_path / "bank")
    mapped = MemoryBank.load(path, mmap=True)
    queries = torch.randn(3, 6, generator=gen)
    chunks = []
    real_chunks = sources.ChunkSource.chunks

    def counting_chunks(self):
        for chunk in real_chunks(self):
            chunks.append(chunk[1].shape[0])
            yield chunk

    monkeypatch.setattr(sources, "DEFAULT_MAPPED_CAP", 10 * 6 * 4 + 10 * 3 * 4)
    monkeypatch.setattr(sources.ChunkSource, "chunks", counting_chunks)
    for similarity in ("dot", "l2"):
        got = hen_fast.retrieve(queries, mapped, similarity=similarity, separation="entmax")
        want = oracle.naive_retrieve(queries, keys, values, similarity=similarity,
                                        separation="entmax")  # fmt: skip
        assert rel_err(got, want) < 1e-5
    assert chunks and max(chunks) <= 10 and sum(chunks) % 64 == 0


def test_memory_cap_arguments_are_checked(gen):
    queries, keys = torch.randn(2, 4, generator=gen), torch.randn(10, 4, generator=gen)
    with pytest.raises(TypeError, match="memory_cap must be an int"):
        hen_fast.retrieve(queries, keys, memory_cap=1.5)
    with pytest.raises(ValueError, match="memory_cap must be > 0"):
        hen_fast.retrieve(queries, keys, memory_cap=0)
    with pytest.raises(ValueError, match="memory_cap must hold at least 1 memory row"):
        hen_fast.retrieve(queries, keys, memory_cap=8)
    keys.requires_grad_(True)
    with pytest.raises(ValueError, match="computes without autograd"):
        hen_fast.retrieve(queries, keys, memory_cap=40)
    # A cap the bank fits in changes nothing (and keeps autograd).
    hen_fast.retrieve(queries, keys, memory_cap=1 << 20).sum().backward()
    assert keys.grad is not None


@pytest.mark.gpu
def test_host_bank_streams_to_the_gpu_double_buffered(gen):
    keys, values = torch.randn(5000, 32, generator=gen), torch.randn(5000, 16, generator=gen)
    queries = torch.randn(8, 32, generator=gen)
    bank = MemoryBank(keys, values)
    for separation in ("softmax", "sparsemax"):
        got = hen_fast.retrieve(queries.cuda(), bank, separation=separation, beta=0.5,
                                memory_cap=_bank_bytes(keys, values) // 8)  # fmt: skip
        want = oracle.naive_retrieve(queries, keys, values, separation=separation, beta=0.5)
        assert got.is_cuda and rel_err(got.cpu(), want) < 1e-5
