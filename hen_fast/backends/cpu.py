"""The ``cpu`` backend: the fused C++ kernel (csrc/cpu, the op hen_fast::retrieve_step).

The op is differentiable: its backward is the fused op hen_fast::retrieve_step_backward
(csrc/cpu/retrieve_backward_cpu.cpp), which recomputes the weights tile by tile from the
per-query threshold the forward returns, registered with ``torch.library.register_autograd``.

This module also loads the extension for the ``cuda`` backend (one ``hen_fast._C`` holds both):
on first use, never at import. The op schemas are declared once, in csrc/common/ops.h; loading
the library registers nothing by itself: :func:`load_extension` calls its registration
functions (csrc/common/register.cpp), which report a failure instead of aborting the process.
The fake kernels below follow those schemas. When the extension is missing or its registration
fails, a warning says why once, and ``auto`` falls back to the torch backend.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import warnings

import torch

from .. import codes
from . import Backend, BackendUnavailableError, Request, constant_under_compile

HINT = (
    "Build it by installing from source with a C++ compiler: "
    "pip install --no-build-isolation -e . (HEN_FAST_BUILD_EXT must not be 0)."
)
# The forward ops of the extension: each has a CPU kernel, and a CUDA one in a CUDA build.
FORWARD_OPS = ("hen_fast::retrieve_step",)


# Candidate scores kept per query and bank split for the sparse thresholds: a few thousand, so
# that supports of hundreds of memories (small beta) still settle in one pass, with the whole
# buffer bounded to 2^21 entries (24 MB).
def default_capacity(num_queries: int) -> int:
    return max(256, min(8192, (1 << 21) // max(1, num_queries)))


class _Loaded:
    """What loading the extension found (one per process, see :func:`load_extension`)."""

    error: str | None = None  # why the extension is unusable, or None
    cuda_error: str | None = None  # why its CUDA kernels are not registered (CUDA builds only)


def _register(library: ctypes.CDLL, function: str) -> str | None:
    """Calls one of the library's registration functions: None, or the C++ error message."""
    register = getattr(library, function)
    register.restype = ctypes.c_char_p
    register.argtypes = []
    failed = register()
    return None if failed is None else failed.decode(errors="replace").strip()


@functools.cache
def load_extension() -> bool:
    """Loads hen_fast._C and registers its ops; False, with one warning saying why, if it cannot.

    The schemas and the CPU kernels register together or not at all. In a CUDA build the CUDA
    kernels register afterwards; if that alone fails, the CPU kernels stay (the cpu backend
    works, the cuda backend reports the error) and one warning says so."""
    _Loaded.error = _Loaded.cuda_error = None
    try:
        spec = importlib.util.find_spec("hen_fast._C")
        if spec is None or spec.origin is None:
            raise ImportError("hen_fast._C was not built")
        library = ctypes.CDLL(spec.origin)
        failed = _register(library, "hen_fast_register_ops")
        if failed is not None:
            raise RuntimeError(f"registering its ops failed: {failed}")
        _register_fake()
        _register_autograd()
    except (ImportError, OSError, RuntimeError, AttributeError) as error:
        _Loaded.error = f"hen_fast's compiled kernels (hen_fast._C) are not available ({error})"
        warnings.warn(
            f"{_Loaded.error}; the torch backend computes instead. {HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    if hasattr(library, "hen_fast_register_cuda_ops"):
        failed = _register(library, "hen_fast_register_cuda_ops")
        if failed is not None:
            _Loaded.cuda_error = f"registering hen_fast's CUDA kernels failed: {failed}"
            warnings.warn(
                f"{_Loaded.cuda_error}; the cuda backend is unavailable (the CPU kernels work).",
                RuntimeWarning,
                stacklevel=3,
            )
    return True


@constant_under_compile
def extension_loaded() -> bool:
    """:func:`load_extension` for code that ``torch.compile`` traces: dynamo calls it once while
    tracing and keeps the answer as a constant (it cannot trace the loading itself, a ctypes call,
    and the answer never changes within a process)."""
    return load_extension()


def load_error() -> str | None:
    """Why the extension is unusable (after :func:`load_extension` said so), else None."""
    return None if load_extension() else _Loaded.error


def cuda_load_error() -> str | None:
    """Why the extension's CUDA kernels are not registered, when it tried and failed."""
    return load_error() or _Loaded.cuda_error


@functools.cache
def instruction_set() -> str:
    """The widest x86 vector extension this CPU offers ("amx", "avx512", "avx2" or "generic"),
    from /proc/cpuinfo (read once): what the machine could give the kernels (recorded by
    ``hen-fast bench``)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info
                          if line.startswith("flags")), [])  # fmt: skip
    except OSError:
        return "generic"
    for name, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return name
    return "generic"


_INSTRUCTION_SETS = ("generic", "avx2", "avx512", "amx")  # each one a superset of the last


def instruction_sets() -> tuple:
    """Every instruction set this CPU runs, narrowest first: the values HEN_FAST_CPU_ISA may take
    here (besides "auto")."""
    return _INSTRUCTION_SETS[: _INSTRUCTION_SETS.index(instruction_set()) + 1]


# Fake (meta) kernels: shapes without computing, for torch.compile and meta tensors. One per op
# of csrc/common/ops.h, with its schema's argument names (tests/test_extension.py checks both).
def _fake_retrieve_step(
    x, keys, sq_norms, values, beta, similarity, separation, alpha, degree, capacity, want_info
):
    rows = x.shape[0]
    return (
        x.new_empty(rows, values.shape[1]),  # out
        x.new_empty(rows, dtype=torch.long),  # support
        x.new_empty(rows, dtype=torch.long),  # argmax
        x.new_empty(rows),  # lse
        x.new_empty(rows),  # threshold
    )


def _fake_retrieve_step_backward(
    grad_out, x, keys, sq_norms, values, out, threshold, beta, similarity, separation, alpha, degree
):
    return (x.new_empty(x.shape), x.new_empty(keys.shape), x.new_empty(values.shape))


def _fake_sketch_filter(x, keys, sq_norms, coords, rest, sketch, residual, cut, gap, limit):
    passed = torch.library.get_ctx().new_dynamic_size()  # as many as pass the cut
    return (x.new_empty(passed, dtype=torch.long), x.new_empty(x.shape[0], dtype=torch.long),
            x.new_empty(x.shape[0]))  # fmt: skip


FAKE_KERNELS = {
    "hen_fast::retrieve_step": _fake_retrieve_step,
    "hen_fast::retrieve_step_backward": _fake_retrieve_step_backward,
    "hen_fast::sketch_filter": _fake_sketch_filter,
}


@functools.cache  # once per process, even when the extension is loaded again
def _register_fake():
    for op, kernel in FAKE_KERNELS.items():
        torch.library.register_fake(op, kernel)


@functools.cache  # once per process, even when the extension is loaded again
def _register_autograd():
    """Gradients of retrieve_step's output for x, keys and values (its other outputs are
    statistics, not differentiated)."""

    def setup_context(ctx, inputs, output):
        x, keys, sq_norms, values, beta, similarity, separation, alpha, degree, _, _ = inputs
        out, support, argmax, lse, threshold = output
        ctx.save_for_backward(x, keys, sq_norms, values, out, threshold)
        ctx.options = (beta, similarity, separation, alpha, degree)
        ctx.mark_non_differentiable(support, argmax, lse, threshold)

    def backward(ctx, grad_out, *_):
        x, keys, sq_norms, values, out, threshold = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 11
        grad_x, grad_keys, grad_values = torch.ops.hen_fast.retrieve_step_backward(
            grad_out, x, keys, sq_norms, values, out, threshold, *ctx.options
        )
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_keys.to(keys.dtype) if needs[1] else None,
            None,
            grad_values.to(values.dtype) if needs[3] else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        "hen_fast::retrieve_step", backward, setup_context=setup_context
    )


def check(request: Request) -> str | None:
    if request.device.type != "cpu":
        return f"it computes on CPU tensors, got {request.device}"
    if torch.float64 in request.dtypes:
        return "it computes float16, bfloat16 and float32 inputs, not float64"
    return None


# The measured rule (benchmarks/crossover_cpu.py, results/cpu-crossover-*.json, 2 cores): with AVX2
# or AVX-512 the kernel's one-pass path takes softmax, sparsemax and entmax at every number of
# queries (onepass / torch backend time 0.2-0.6 from B = 1 to 4096) and auto keeps them. Calls it
# leaves to the tiled path (polynomial; every separation on a CPU without AVX2 or with
# HEN_FAST_CPU_PATH=tiled) run BLAS products much like the torch backend's: faster up to a few
# hundred queries (tiled / torch 0.3-0.75 at B <= 128, 0.93 at 512 for dot/polynomial), even
# beyond, where the torch backend's whole-chunk products catch up, so dense dot/l2 ones go there
# from DENSE_TORCH_FROM_QUERIES on. Sparse separations and manhattan stay on the kernel at every B.
DENSE_TORCH_FROM_QUERIES = 512


def _one_pass_takes(separation: str) -> bool:
    isa = os.environ.get("HEN_FAST_CPU_ISA", "auto")
    isa = instruction_set() if isa == "auto" else isa
    return (separation in ("softmax", "sparsemax", "entmax")
            and isa != "generic" and os.environ.get("HEN_FAST_CPU_PATH") != "tiled")  # fmt: skip


def auto_check(request: Request) -> str | None:
    dense = request.separation in ("softmax", "polynomial") and request.similarity in ("dot", "l2")
    many = (request.num_queries or 0) >= DENSE_TORCH_FROM_QUERIES
    if dense and many and not _one_pass_takes(request.separation):
        return (
            f"dense {request.similarity}/{request.separation} with >= "
            f"{DENSE_TORCH_FROM_QUERIES} queries is faster in the torch backend than in the "
            "kernel's tiled path"
        )
    return None


def retrieve(queries, memories, values=None, *, beta=1.0, similarity="dot", separation="softmax",
             alpha=1.5, degree=10, steps=1, tol=None, clamp_mask=None, return_info=False,
             capacity=None, sq_norms=None):  # fmt: skip
    """Same contract as :func:`hen_fast.backends.torch_backend.retrieve`; ``capacity`` is the
    sparse candidate buffer per query and split."""
    from ..loop import iterate
    from ..numerics import separation_alpha
    from .norms import cached_sq_norms
    from .norms import sq_norms as bank_sq_norms

    if not extension_loaded():
        raise BackendUnavailableError(
            f"backend 'cpu' is not available here: {load_error()}. {HINT}"
        )
    values = memories if values is None else values
    capacity = capacity or default_capacity(queries.shape[0])
    if similarity == "l2" and sq_norms is None:
        with torch.no_grad():  # the op differentiates ||k||^2 itself
            # The cache is keyed by the tensor's identity and version, host state that a compiled
            # graph cannot consult: there the norms are one cheap O(M d) op of the graph.
            compiling = torch.compiler.is_compiling()
            sq_norms = bank_sq_norms(memories) if compiling else cached_sq_norms(memories)
    sparse_alpha = separation_alpha(separation, alpha) if separation != "polynomial" else 2.0
    op = torch.ops.hen_fast.retrieve_step

    def one_step(rows):
        out, support, argmax, lse, _ = op(
            rows.contiguous(),
            memories,
            sq_norms,
            values,
            float(beta),
            codes.similarity_code(similarity),
            codes.separation_code(separation),
            sparse_alpha,
            float(degree),
            capacity,
            return_info,
        )
        if similarity == "l2":  # the kernel scores 2 x.k - ||k||^2: shift back to -||x - k||^2
            lse = lse - beta * (rows * rows).sum(dim=1)
        return out, support, argmax, lse

    return iterate(
        one_step,
        queries,
        torch.float32,
        steps=steps,
        tol=tol,
        clamp_mask=clamp_mask,
        return_info=return_info,
    )


BACKEND = Backend(name="cpu", retrieve=retrieve, priority=10, is_available=load_extension,
                  unavailable_reason=load_error, check=check, auto_check=auto_check,
                  hint=HINT)  # fmt: skip
