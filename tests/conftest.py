import math
import os
import secrets

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. Set before anything
# imports triton; no device is queried at import of hen_fast itself.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A fresh random generator per test. The seed is printed, so a failure shows it; set
    HEN_FAST_TEST_SEED to replay one."""
    seed = int(os.environ.get("HEN_FAST_TEST_SEED") or secrets.randbits(31))
    print(f"HEN_FAST_TEST_SEED={seed}")
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)


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
