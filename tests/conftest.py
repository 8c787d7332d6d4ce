import math
import os
import random
import secrets
import zlib

import numpy as np
import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. Set before anything
# imports triton; no device is queried at import of hen_fast itself.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Seeds. Every test's random inputs are fixed by default, so the test command passes or fails the
# same way every run. A sweep is on request:
#   HEN_FAST_TEST_SEED=<n>       base seed n (0, the default, is what CI runs); replays a failure
#   HEN_FAST_TEST_SEED=random    a fresh base seed, printed in the header and by each test
#   HEN_FAST_TEST_SEEDS=<count>  every test that draws random inputs runs with bases 0..count-1
# A test's seed mixes the base with its node id, so tests draw different inputs from each other.
def _base_seed() -> int:
    value = os.environ.get("HEN_FAST_TEST_SEED", "").strip().lower()
    if value == "random":
        return secrets.randbits(31)
    try:
        return int(value or 0)
    except ValueError:
        raise pytest.UsageError(
            f"HEN_FAST_TEST_SEED must be an integer or 'random', got {value!r}"
        ) from None


BASE_SEED = _base_seed()
SWEEP = int(os.environ.get("HEN_FAST_TEST_SEEDS", "0") or 0)


def pytest_report_header(config):
    sweep = f", sweep over bases 0..{SWEEP - 1} (HEN_FAST_TEST_SEEDS)" if SWEEP > 1 else ""
    return f"hen_fast test seeds: base HEN_FAST_TEST_SEED={BASE_SEED}{sweep}"


def pytest_generate_tests(metafunc):
    if SWEEP > 1 and "sweep_base" in metafunc.fixturenames:
        metafunc.parametrize("sweep_base", range(SWEEP), ids=[f"base{b}" for b in range(SWEEP)])


@pytest.fixture
def sweep_base():
    return BASE_SEED


def _replay_id(nodeid: str, base: int) -> str:
    """The node id without the sweep's parameter: the id a replay with HEN_FAST_TEST_SEED=base
    runs."""
    if SWEEP <= 1:
        return nodeid
    return nodeid.replace(f"[base{base}]", "").replace(f"-base{base}]", "]")


@pytest.fixture
def test_seed(request, sweep_base) -> int:
    """This test's seed: fixed for a (test, base) pair."""
    replay = _replay_id(request.node.nodeid, sweep_base)
    seed = (zlib.crc32(replay.encode()) + 1_000_003 * sweep_base) % 2**31
    print(f"seed {seed}; replay: HEN_FAST_TEST_SEED={sweep_base} python -m pytest '{replay}'")
    request.node.user_properties.append(("seed", seed))
    return seed


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    """Tests that draw from torch's, numpy's or Python's global generators get fixed draws too."""
    seed = zlib.crc32(request.node.nodeid.encode()) + BASE_SEED
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@pytest.fixture
def gen(test_seed):
    """A random generator for the test's inputs, seeded with its fixed seed (see above)."""
    return torch.Generator().manual_seed(test_seed)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """torch.empty returns NaN (floats) or a huge negative (ints): an element a kernel forgot to
    write shows up as NaN or a wrong index. Kernel test modules use it for every test with
    ``pytestmark = pytest.mark.usefixtures("poisoned_buffers")``."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(math.nan if tensor.is_floating_point() else -(2**30))

    monkeypatch.setattr(torch, "empty", poisoned)
