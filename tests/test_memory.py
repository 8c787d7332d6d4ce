"""The streamed path's extra memory is O(B * (d + chunk)): flat when the bank grows 10x."""

import pytest

from hen_fast.profiling import peak_extra_bytes

from helpers import COMBINATIONS, combo_id

MiB = 1 << 20
SETUP = """
import torch
from hen_fast import reference
generator = torch.Generator().manual_seed(0)
queries = torch.randn(32, 16, generator=generator)
memories = torch.randn({num_memories}, 16, generator=generator)
"""
CASES = [c for c in COMBINATIONS if c[2] in (1.5, 1.25)]


def _call(combo, chunk_size):
    similarity, separation, alpha = combo
    return (
        f"reference.retrieve(queries, memories, similarity={similarity!r}, "
        f"separation={separation!r}, alpha={alpha}, chunk_size={chunk_size}, candidates=64, "
        "return_info=True)"
    )


@pytest.fixture(scope="module")
def peaks():
    """Peak extra bytes per (combination, M, streamed?), measured in one process per M."""
    measured = {}
    for num_memories in (20_000, 200_000):
        calls = [(combo, True) for combo in CASES]
        if num_memories == 200_000:
            calls.append((CASES[0], False))  # one dense run, to show the measurement can fail
        statements = [_call(c, 1024 if streamed else num_memories) for c, streamed in calls]
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
