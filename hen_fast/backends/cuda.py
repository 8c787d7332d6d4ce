"""The ``cuda`` backend: hand-written CUDA kernels (csrc/cuda) for few queries over a large bank.

They implement the op ``hen_fast::retrieve_step`` for CUDA tensors in the same extension as the
``cpu`` backend (``hen_fast._C``, loaded lazily by :func:`hen_fast.backends.cpu.load_extension`),
so the steps loop around the op is that backend's: the op dispatches on the tensors' device.

Dispatch rule: ``backend="auto"`` never picks ``cuda``; it is used by name only until it is
measured against the Triton backend on a GPU (issue 7). No GPU was available when it was written,
so there is no measured rule yet, and none is guessed.

Limits: the dimension ``d`` is at most 2048 (the queries of a block live in shared memory); any
number of queries and value columns works, but the kernels are built for ``B <= 64`` (blocks of 8
queries, SIMT dot products). Keys and values of different dtypes are computed in float32.
"""

from __future__ import annotations

import torch

from . import Backend, BackendUnavailableError, Request

MAX_DIM = 2048  # csrc/cuda/retrieve_cuda.h kMaxDim
HINT = (
    "It needs a CUDA GPU and the extension built by a CUDA-enabled torch with nvcc: "
    "pip install --no-build-isolation -e . (HEN_FAST_BUILD_EXT must not be 0)."
)


def has_cuda_kernel() -> bool:
    """The extension loaded and registered a CUDA kernel for every forward op (a CPU-only build
    registers none). Asks the dispatcher, not the device."""
    from .cpu import FORWARD_OPS, load_extension

    if not load_extension():
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in FORWARD_OPS)
    except (AttributeError, RuntimeError):
        return False


def is_available() -> bool:
    return torch.cuda.is_available() and has_cuda_kernel()


def unavailable_reason() -> str | None:
    from .cpu import cuda_load_error

    error = cuda_load_error()
    if error is not None:
        return error
    if not has_cuda_kernel():
        return "hen_fast._C was built without CUDA kernels"
    return None if torch.cuda.is_available() else "no CUDA device is available"


def check(request: Request) -> str | None:
    if request.device.type != "cuda":
        return f"it computes on CUDA tensors, got {request.device}"
    if torch.float64 in request.dtypes:
        return "it computes float16, bfloat16 and float32 inputs, not float64"
    if request.needs_grad:
        return "it has no backward pass yet; the torch backend differentiates"
    return None


def _unit_column_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(1) == 1 else tensor.contiguous()


def retrieve(queries, memories, values=None, *, capacity=None, sq_norms=None, **kwargs):
    """Same contract as :func:`hen_fast.backends.torch_backend.retrieve`; ``capacity`` is the
    sparse candidate buffer per query (all bank splits together), ``sq_norms`` cached float32
    ``||k||^2``."""
    from . import cpu
    from .norms import cached_sq_norms

    if not is_available():
        raise BackendUnavailableError(
            f"backend 'cuda' is not available here: {unavailable_reason()}. {HINT}"
        )
    dim = memories.shape[1]
    if dim > MAX_DIM:
        raise ValueError(f"memories: the cuda backend takes d <= {MAX_DIM}, got d = {dim}")
    if kwargs.get("similarity") == "l2" and sq_norms is None:
        sq_norms = cached_sq_norms(memories)  # keyed by the caller's bank, before any copy
    same = values is None or values is memories
    values = memories if values is None else values
    if memories.dtype != values.dtype:  # the kernels read keys and values of one dtype
        memories, values = memories.float(), values.float()
        same = False
    # Once per call, not per step: the op reads rows with a unit column stride.
    memories = _unit_column_stride(memories)
    values = memories if same else _unit_column_stride(values)
    return cpu.retrieve(queries, memories, values, capacity=capacity, sq_norms=sq_norms, **kwargs)


# auto_device_types=(): "auto" picks it nowhere, by name only until the dispatch rule between it
# and Triton comes from GPU measurements.
BACKEND = Backend(name="cuda", retrieve=retrieve, priority=15, is_available=is_available,
                  unavailable_reason=unavailable_reason, check=check, auto_device_types=(),
                  hint=HINT)  # fmt: skip
