"""Shared test utilities: random problems with odd sizes and strides, error measures, and
running a named backend on its device."""

from __future__ import annotations

import math

import torch

import hen_fast
from hen_fast import SEPARATIONS, SIMILARITIES, RetrieveInfo, oracle
from hen_fast.backends import torch_backend

ENTMAX_ALPHAS = (1.25, 1.5, 1.8)
# (similarity, separation, alpha) for every combination retrieve defines.
COMBINATIONS = [
    (similarity, separation, alpha)
    for similarity in SIMILARITIES
    for separation in SEPARATIONS
    for alpha in (ENTMAX_ALPHAS if separation == "entmax" else (1.5,))
    if separation != "polynomial" or similarity == "dot"
]
# Scales that give supports from one memory to most of them on unit-Gaussian data of ~10 dims.
BETA = {"dot": 0.7, "l2": 0.25, "manhattan": 0.3}


def combo_kwargs(combo) -> dict:
    """retrieve's keyword arguments for a (similarity, separation, alpha) combination."""
    similarity, separation, alpha = combo
    return dict(beta=BETA[similarity], similarity=similarity, separation=separation, alpha=alpha)


def combo_id(combo) -> str:
    similarity, separation, alpha = combo
    return f"{similarity}-{separation}" + (f"{alpha}" if separation == "entmax" else "")


# One tolerance table: the largest error a computation may make, relative to the scale of the
# values it combines (value_scale), by backend and by the dtype it computes in. float32 is held
# far under 1e-4; float16 and bfloat16 inputs are rounded to 11 and 8 bits before the float32
# computation. Several update steps amplify rounding along the trajectory: STEPS_FACTOR.
TOLERANCES = {
    # backend:  float64  float32  float16  bfloat16
    "torch": (1e-10, 1e-5, 5e-3, 1e-2),
    "cpu": (None, 1e-5, 5e-3, 1e-2),
    "triton": (None, 1e-5, 5e-3, 1e-2),  # exact float32 dot products (not tf32), pinned
    "cuda": (None, 1e-5, 5e-3, 1e-2),
}
DTYPE_COLUMNS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
STEPS_FACTOR = 10


def tolerance(dtype: torch.dtype = torch.float32, backend: str = "torch", steps: int = 1) -> float:
    """The table's tolerance for a computation in ``dtype`` on ``backend``."""
    tol = TOLERANCES[backend][DTYPE_COLUMNS.index(dtype)]
    if tol is None:
        raise ValueError(f"backend {backend!r} does not compute in {dtype}")
    return tol * (STEPS_FACTOR if steps > 1 else 1)


def value_scale(values: torch.Tensor) -> float:
    """The scale of a retrieval's output: its largest value entry. Every output is a weighted
    mean of value rows, so this bounds it, while the output itself can cancel to near zero."""
    return float(values.detach().double().abs().max())


def rel_err(
    actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30, scale: float | None = None
) -> float:
    """Largest error relative to ``scale`` (default: the expected tensor's largest entry, at
    least ``floor``, for quantities that can be exactly 0 such as an energy). Pass the scale of
    the inputs (value_scale) wherever the expected tensor can cancel. Any NaN or Inf counts as
    infinite."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape or not bool(torch.isfinite(actual).all()):
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    if scale is None:
        scale = float(expected.abs().max())
    scale = max(scale, floor)
    return float((actual - expected).abs().max() / scale)


def randint(gen: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def strided(tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same values in a non-contiguous layout: every other column of a wider buffer, or
    column-major. The skipped entries hold NaN so reading them would show."""
    if randint(gen, 0, 1):
        rows, cols = tensor.shape
        wide = torch.full((rows, 2 * cols), float("nan"), dtype=tensor.dtype)
        view = wide[:, ::2]
        view.copy_(tensor)
        return view
    return tensor.T.contiguous().T


def random_problem(gen, *, dtype=torch.float64, same_dims=False, max_queries=9, max_memories=97):
    """Queries (B, d), memories (M, d), values (M, dv): odd random sizes, non-contiguous."""
    num_queries = randint(gen, 1, max_queries)
    num_memories = randint(gen, 5, max_memories)
    dim = randint(gen, 3, 17)
    value_dim = dim if same_dims else randint(gen, 1, 13)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    queries = strided(make(num_queries, dim), gen)
    memories = strided(make(num_memories, dim), gen)
    values = strided(make(num_memories, value_dim), gen)
    assert not (queries.is_contiguous() and memories.is_contiguous())
    return queries, memories, values


def odd_strides(tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same values in a view whose strides are odd, neither 1 nor a multiple of 16: Triton
    specialises integer arguments equal to 1 or divisible by 16, so this runs the generic path
    (row stride an odd number above 3 x cols, column stride 3). The gaps hold NaN."""
    rows, cols = tensor.shape
    row_stride = 3 * cols + 2 * randint(gen, 0, 4) + 1 + (3 * cols % 2)
    if row_stride % 16 == 0:
        row_stride += 2
    buffer = torch.full(((rows - 1) * row_stride + 3 * (cols - 1) + 1,), float("nan"))
    view = buffer.to(tensor.dtype).as_strided((rows, cols), (row_stride, 3))
    view.copy_(tensor)
    assert all(s != 1 and s % 16 for s in view.stride()), view.stride()
    return view


# ------------------------------------------------------------------ a named backend on its device
BACKENDS = ("torch", "cpu", "triton", "cuda")
# The backends whose bank splits a caller can force (kernel_retrieve's splits).
FORCED_SPLITS = ("torch", "triton")
LAYOUTS = ("contiguous", "padded", "every_other", "column_major")


def backend_device(backend: str) -> torch.device:
    """Where ``backend`` computes: cuda on CUDA tensors; triton on a GPU when there is one, else on
    CPU tensors through the interpreter (TRITON_INTERPRET=1, set by conftest.py); torch and cpu
    on CPU tensors (where the float64 oracle runs)."""
    on_gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    return torch.device("cuda" if on_gpu else "cpu")


def compute_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """The full-precision dtypes ``backend`` computes in: those of its tolerance table row."""
    return tuple(
        dtype
        for dtype in (torch.float64, torch.float32)
        if TOLERANCES[backend][DTYPE_COLUMNS.index(dtype)] is not None
    )


def to_device(tensor: torch.Tensor, device, gen=None, layout: str | None = None) -> torch.Tensor:
    """The values of a CPU ``tensor`` on ``device``, for a matrix in ``layout``: "same" (its own
    strides), "contiguous", "padded" (rows 0-9 elements wider), "aligned_padded" (rows padded to
    a multiple of 16 elements: 16-byte aligned for every dtype, so vector loads run),
    "every_other" (column), "column_major"; None keeps a CPU tensor as it is (random_problem
    lays it out oddly already) and draws one of LAYOUTS from ``gen`` elsewhere (``.to`` would
    make most views contiguous). Padding and gaps hold NaN, so reading them would show."""
    device = torch.device(device)
    if tensor.dim() != 2 or (layout is None and device.type == "cpu"):
        return tensor.to(device)
    layout = layout or LAYOUTS[randint(gen, 0, len(LAYOUTS) - 1)]
    rows, cols = tensor.shape
    if layout == "contiguous":
        return tensor.to(device).contiguous()
    if layout == "column_major":
        return tensor.to(device).T.contiguous().T
    if layout == "same":
        span = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) + 1
        buffer = torch.full((span,), math.nan, dtype=tensor.dtype, device=device)
        view = buffer.as_strided(tensor.shape, tensor.stride())
        view.copy_(tensor)
        return view
    if layout == "every_other":
        width = 2 * cols
    elif layout == "aligned_padded":
        width = (cols + 15) // 16 * 16
    elif layout == "padded":
        width = cols + randint(gen, 0, 9)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    wide = torch.full((rows, width), math.nan, dtype=tensor.dtype, device=device)
    view = wide[:, ::2] if layout == "every_other" else wide[:, :cols]
    view.copy_(tensor)
    return view


def poison_cuda_allocator() -> None:
    """Fills free blocks of torch's caching allocator (small and large pools) with NaN, so an
    output element a CUDA kernel forgets to write shows as NaN (the poisoned_buffers fixture of
    conftest.py does this for torch.empty on the CPU)."""
    blocks = [
        torch.full((n,), math.nan, device="cuda") for n in (1 << 8, 1 << 12, 1 << 17, 1 << 24)
    ]
    del blocks


def kernel_retrieve(backend, queries, memories, values=None, *, splits=None, capacity=None, **kw):
    """The backend's own retrieve (no argument checks, no device moves), with its knobs where it
    has them: ``splits`` bank splits (triton: num_splits_override; torch: chunks of
    ceil(M / splits) memories; cpu and cuda choose their splits themselves) and a sparse
    candidate buffer of ``capacity`` entries (torch: candidates). Returns (out, info or None)."""
    extra = {}
    if backend == "torch":
        retrieve = torch_backend.retrieve
        if splits:
            extra["chunk_size"] = -(-memories.shape[0] // splits)
        if capacity:
            extra["candidates"] = capacity
    else:
        if backend == "triton":
            from hen_fast.backends.triton.retrieve import retrieve

            if splits:
                extra["num_splits_override"] = splits
        elif backend in ("cpu", "cuda"):
            from hen_fast.backends import cpu, cuda

            retrieve = cpu.retrieve if backend == "cpu" else cuda.retrieve
        else:
            raise ValueError(f"unknown backend {backend!r}")
        if capacity:
            extra["capacity"] = capacity
    return retrieve(queries, memories, values, **kw, **extra)


def run_backend(
    backend,
    queries,
    memories,
    values=None,
    *,
    gen=None,
    layout=None,
    splits=None,
    capacity=None,
    return_info=True,
    **kwargs,
):
    """``backend`` on its device (backend_device) with CPU inputs moved there by to_device
    (``layout``; the masks move too): through hen_fast.retrieve, or the backend's own retrieve
    when ``splits`` or ``capacity`` asks for its knobs (kernel_retrieve). Checks the output is
    on that device in the queries' dtype, and returns (out, info or None) on the CPU, for the
    float64 oracle. On a GPU the allocator's free blocks are poisoned first."""
    device = backend_device(backend)
    queries, memories = (to_device(t, device, gen, layout) for t in (queries, memories))
    values = None if values is None else to_device(values, device, gen, layout)
    for mask in ("clamp_mask", "score_mask"):
        if isinstance(kwargs.get(mask), torch.Tensor):
            kwargs[mask] = kwargs[mask].to(device)
    if device.type == "cuda":
        poison_cuda_allocator()
    if splits is None and capacity is None:
        result = hen_fast.retrieve(
            queries, memories, values, backend=backend, return_info=return_info, **kwargs
        )
    else:
        result = kernel_retrieve(
            backend, queries, memories, values, splits=splits, capacity=capacity,
            return_info=return_info, **kwargs,
        )  # fmt: skip
    out, info = result if isinstance(result, tuple) else (result, None)
    assert out.device.type == device.type and out.dtype == queries.dtype, (out.device, out.dtype)
    if info is not None:
        info = RetrieveInfo(*(field.cpu() for field in info.as_tuple()))
    return out.cpu(), info


def check_against_reference(out, info, queries, memories, values, *, backend="torch", **kwargs):
    """Accuracy rule for a float32 backend, errors relative to the scale of the values. One
    update: at most twice the float32 reference's error against float64 (plus a floor for a lucky
    reference) and within the float32 tolerance (far under 1e-4). Several
    updates amplify rounding along the trajectory, differently for every rounding order, so a
    single reference sample says little: there the bound is the 1e-4 that test_retrieve measured
    for the reference itself (worst 5.4e-5 over 300 seeds x every combination).

    Info: equal to the float64 computation's, except where a float32 computation may decide
    otherwise: a score within rounding of a threshold (support off by at most 2) or of a tie
    (argmax, steps: then equal to the float32 reference's)."""
    expected, expected_info = oracle.naive_retrieve(
        queries, memories, values, return_info=True, **kwargs
    )
    ours, ours_info = torch_backend.retrieve(queries, memories, values, return_info=True, **kwargs)
    scale = value_scale(memories if values is None else values)
    ours_error = rel_err(ours, expected, scale=scale)
    error = rel_err(out, expected, scale=scale)
    steps = kwargs.get("steps", 1)
    if steps == 1:
        assert error <= 2 * ours_error + 2e-6 and error < tolerance(backend=backend), (
            error,
            ours_error,
        )
    else:
        assert error < tolerance(backend=backend, steps=steps), (error, ours_error)
    if info is None:
        return
    for field in ("steps", "argmax"):
        got, want, same_precision = (
            getattr(i, field).cpu() for i in (info, expected_info, ours_info)
        )
        assert bool(((got == want) | (got == same_precision)).all()), field
    assert int((info.support.cpu() - expected_info.support).abs().max()) <= 2
    finite = torch.isfinite(expected_info.lse)
    assert torch.equal(torch.isfinite(info.lse.cpu()), finite)
    lse_error = rel_err(info.lse.cpu()[finite], expected_info.lse[finite], floor=1.0)
    ours_lse_error = rel_err(ours_info.lse[finite], expected_info.lse[finite], floor=1.0)
    assert lse_error <= 2 * ours_lse_error + 2e-6 * steps or (steps > 1 and lse_error < 1e-4), (
        lse_error,
        ours_lse_error,
    )
