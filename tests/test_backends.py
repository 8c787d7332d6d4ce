"""The backend registry: auto selection, named selection, and the errors for missing backends."""

import pytest
import torch

import hen_fast
from hen_fast import Backend, BackendUnavailableError, reference, retrieve

Q = torch.randn(4, 6)
K = torch.randn(10, 6)


@pytest.fixture
def temporary_backend():
    """Registers test backends that count their calls; removes them afterwards."""
    added, calls = [], []

    def register(name, **options):
        def counting(*args, **kwargs):
            calls.append(name)
            return reference.retrieve(*args, **kwargs)

        hen_fast.register_backend(Backend(name=name, retrieve=counting, **options))
        added.append(name)
        return calls

    yield register
    for name in added:
        hen_fast.unregister_backend(name)
    assert hen_fast.registered_backends() == ("torch",)


def test_only_torch_is_built_in():
    assert hen_fast.registered_backends() == ("torch",)
    assert hen_fast.available_backends() == ("torch",)


def test_auto_takes_the_highest_priority_available_backend(temporary_backend):
    calls = temporary_backend("test-fast", priority=50)
    temporary_backend("test-slow", priority=-1)
    assert hen_fast.available_backends() == ("test-fast", "torch", "test-slow")
    retrieve(Q, K)
    assert calls == ["test-fast"]
    retrieve(Q, K, backend="test-slow")
    assert calls == ["test-fast", "test-slow"]


def test_unavailable_backend_says_how_to_get_it(temporary_backend):
    calls = temporary_backend(
        "test-missing", priority=100, is_available=lambda: False, hint="Build it with `make x`."
    )
    with pytest.raises(BackendUnavailableError, match="not available here. Build it with `make x`"):
        retrieve(Q, K, backend="test-missing")
    assert issubclass(BackendUnavailableError, ValueError)
    assert hen_fast.available_backends() == ("torch",)  # auto skips it despite its priority
    retrieve(Q, K)
    assert calls == []


def test_backend_for_another_device_is_refused_by_name_and_skipped_by_auto(temporary_backend):
    calls = temporary_backend(
        "test-gpu", priority=100, device_types=("cuda",), hint="Use CUDA tensors."
    )
    with pytest.raises(BackendUnavailableError, match=r"\('cuda',\) tensors.*on cpu. Use CUDA"):
        retrieve(Q, K, backend="test-gpu")
    retrieve(Q, K)
    assert calls == []
    assert hen_fast.available_backends("cuda")[0] == "test-gpu"
    assert "test-gpu" not in hen_fast.available_backends("cpu")


def test_availability_is_probed_lazily(temporary_backend):
    probes = []
    temporary_backend("test-lazy", is_available=lambda: probes.append(1) or True)
    assert probes == []  # registering probes nothing
    hen_fast.available_backends()
    assert probes == [1]


def test_import_needs_no_gpu_and_no_extension():
    import subprocess
    import sys

    code = (
        "import sys, torch, hen_fast; "
        "assert not torch.cuda.is_initialized(); "
        "assert not [m for m in sys.modules if m.startswith(('triton', 'hen_fast._C'))]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
