"""The streamed path's extra memory is O(B * (d + chunk)): flat when the bank grows 10x."""

import pytest

from hen_fast.profiling import peak_extra_bytes

from helpers import COMBINATIONS, combo_id

MiB = 1 << 20


def _cpu_built():
    from hen_fast.backends.cpu import load_extension

    return load_extension()


SETUP = """
import torch
import hen_fast
from hen_fast.backends import torch_backend
generator = torch.Generator().manual_seed(0)
queries = torch.randn(32, 16, generator=generator)
memories = torch.randn({num_memories}, 16, generator=generator)
"""
CASES = [c for c in COMBINATIONS if c[2] in (1.5, 1.25)]
# The C++ kernel (when built); l2 keeps the bank's norms beside it, O(M) by design.
CPU_CASES = [c for c in CASES if c[0] != "l2" and _cpu_built()]


def _call(combo, chunk_size):
    similarity, separation, alpha = combo
    if chunk_size == "cpu":
        return (
            f"hen_fast.retrieve(queries, memories, similarity={similarity!r}, "
            f"separation={separation!r}, alpha={alpha}, backend='cpu', return_info=True)"
        )
    return (
        f"torch_backend.retrieve(queries, memories, similarity={similarity!r}, "
        f"separation={separation!r}, alpha={alpha}, chunk_size={chunk_size}, candidates=64, "
        "return_info=True)"
    )


@pytest.fixture(scope="module")
def peaks():
    """Peak extra bytes per (combination, M, streamed?), measured in one process per M."""
    measured = {}
    for num_memories in (20_000, 200_000):
        calls = [(combo, True) for combo in CASES] + [(combo, "cpu") for combo in CPU_CASES]
        if num_memories == 200_000:
            calls.append((CASES[0], False))  # one dense run, to show the measurement can fail
        statements = [
            _call(c, streamed if streamed == "cpu" else 1024 if streamed else num_memories)
            for c, streamed in calls
        ]
        results = peak_extra_bytes(SETUP.format(num_memories=num_memories), statements)
        measured.update({(c, num_memories, s): r for (c, s), r in zip(calls, results)})
    return measured


def test_measurement_sees_the_dense_score_matrix(peaks):
    """The check below can fail: the dense path's 32 x 200k float32 scores (24 MiB) show up."""
    assert peaks[(CASES[0], 200_000, False)] > 24 * MiB


@pytest.mark.parametrize("combo", CASES, ids=combo_id)
def test_streamed_peak_is_flat_in_bank_size(peaks, combo):
    small, large = peaks[(combo, 20_000, True)], peaks[(combo, 200_000, True)]
    assert large < small + 1 * MiB, (small, large)
    assert large < 4 * MiB


@pytest.mark.parametrize("combo", CPU_CASES, ids=combo_id)
def test_cpu_kernel_peak_is_flat_in_bank_size(peaks, combo):
    """Softmax and polynomial keep tiles only. The sparse separations also keep each query's
    candidate window, which grows with M at a fixed beta until it reaches the capacity (then the
    query is finished by Newton passes): bounded by B x splits x capacity x 16 bytes, not by M."""
    from hen_fast.backends.cpu import default_capacity

    small, large = peaks[(combo, 20_000, "cpu")], peaks[(combo, 200_000, "cpu")]
    if combo[1] in ("softmax", "polynomial"):
        assert large < small + 1 * MiB, (small, large)
        assert large < 4 * MiB
    else:
        splits = 2  # two threads here: kernel tasks = query blocks x splits
        assert large < 32 * splits * default_capacity(32) * 16 + 1 * MiB, large
