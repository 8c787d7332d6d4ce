"""The backend registry: auto selection, named selection, and the errors for missing backends."""

import pytest
import torch

import hen_fast
from hen_fast import Backend, BackendUnavailableError, retrieve
from hen_fast.backends import torch_backend

Q = torch.randn(4, 6)
K = torch.randn(10, 6)


@pytest.fixture
def temporary_backend():
    """Registers test backends that count their calls; removes them afterwards."""
    added, calls = [], []

    def register(name, **options):
        def counting(*args, **kwargs):
            calls.append(name)
            return torch_backend.retrieve(*args, **kwargs)

        hen_fast.register_backend(Backend(name=name, retrieve=counting, **options))
        added.append(name)
        return calls

    yield register
    for name in added:
        hen_fast.unregister_backend(name)
    assert hen_fast.registered_backends() == BUILT_IN


BUILT_IN = ("torch", "cpu", "triton", "cuda")


def _auto_on_cpu():
    """What auto may pick for CPU tensors: the C++ kernel when it is built, then torch (triton
    runs on a CPU only interpreted, by name)."""
    return ("cpu", "torch") if hen_fast.backends.cpu.load_extension() else ("torch",)


def test_built_in_backends():
    assert hen_fast.registered_backends() == BUILT_IN
    assert hen_fast.available_backends("cpu") == _auto_on_cpu()


def test_auto_takes_the_highest_priority_available_backend(temporary_backend):
    calls = temporary_backend("test-fast", priority=50)
    temporary_backend("test-slow", priority=-1)
    assert hen_fast.available_backends("cpu") == ("test-fast", *_auto_on_cpu(), "test-slow")
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
    assert hen_fast.available_backends("cpu") == _auto_on_cpu()  # skipped despite its priority
    retrieve(Q, K)
    assert calls == []


def test_backend_for_another_device_is_refused_by_name_and_skipped_by_auto(temporary_backend):
    def cuda_only(request):
        return None if request.device.type == "cuda" else f"needs CUDA, got {request.device}"

    calls = temporary_backend("test-gpu", priority=100, check=cuda_only, hint="Use CUDA tensors.")
    with pytest.raises(BackendUnavailableError, match="cannot compute .*needs CUDA, got cpu. Use"):
        retrieve(Q, K, backend="test-gpu")
    retrieve(Q, K)
    assert calls == []
    assert hen_fast.available_backends("cuda")[0] == "test-gpu"
    assert "test-gpu" not in hen_fast.available_backends("cpu")


def test_auto_skips_a_backend_that_declines_dtype_or_autograd(temporary_backend):
    def float32_without_grad(request):
        if request.needs_grad:
            return "no backward pass"
        if any(dtype != torch.float32 for dtype in request.dtypes):
            return f"float32 only, got {request.dtypes}"
        return None

    calls = temporary_backend("test-f32", priority=100, check=float32_without_grad)
    retrieve(Q, K)
    assert calls == ["test-f32"]
    retrieve(Q.double(), K.double())
    retrieve(Q.clone().requires_grad_(), K)
    with torch.no_grad():
        retrieve(Q.clone().requires_grad_(), K)
    assert calls == ["test-f32", "test-f32"]
    with pytest.raises(BackendUnavailableError, match="no backward pass"):
        retrieve(Q.clone().requires_grad_(), K, backend="test-f32")


def test_auto_device_types_limit_auto_but_not_named_use(temporary_backend):
    calls = temporary_backend("test-named-only", priority=100, auto_device_types=("cuda",))
    retrieve(Q, K)
    assert calls == []
    retrieve(Q, K, backend="test-named-only")
    assert calls == ["test-named-only"]


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


def test_auto_leaves_dense_many_query_calls_to_torch_on_cpu(temporary_backend, monkeypatch):
    """The measured rule in backends/cpu.py: the kernel's one-pass path (softmax, sparsemax,
    entmax with AVX2 or AVX-512) keeps every number of queries; dense dot/l2 calls that its tiled
    path serves go to torch from DENSE_TORCH_FROM_QUERIES queries on; sparse separations and
    manhattan stay on the kernel. Named, the kernel still computes them."""
    from hen_fast.backends import Request, cpu, select_backend

    if not cpu.load_extension():
        pytest.skip("the C++ kernel is not built")
    many = cpu.DENSE_TORCH_FROM_QUERIES

    def chosen(num_queries, similarity, separation, name="auto"):
        request = Request(
            torch.device("cpu"),
            (torch.float32,),
            False,
            num_queries=num_queries,
            num_memories=1000,
            similarity=similarity,
            separation=separation,
        )
        return select_backend(name, request).name

    one_pass_here = cpu.instruction_set() != "generic"
    assert chosen(10 * many, "dot", "softmax") == ("cpu" if one_pass_here else "torch")
    assert chosen(many - 1, "l2", "polynomial") == "cpu"
    assert chosen(many, "l2", "polynomial") == "torch"
    assert chosen(many, "dot", "polynomial", name="cpu") == "cpu"
    for similarity, separation in (
        ("dot", "sparsemax"),
        ("l2", "entmax"),
        ("manhattan", "softmax"),
    ):
        assert chosen(10 * many, similarity, separation) == "cpu"
    # Without the one-pass path (a CPU without AVX2, or the tiled path forced), dense softmax too.
    for variable, value in (("HEN_FAST_CPU_ISA", "generic"), ("HEN_FAST_CPU_PATH", "tiled")):
        with monkeypatch.context() as patch:
            patch.setenv(variable, value)
            assert chosen(many - 1, "dot", "softmax") == "cpu"
            assert chosen(many, "dot", "softmax") == "torch"
            assert chosen(many, "manhattan", "softmax") == "cpu"
