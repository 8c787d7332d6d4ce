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
