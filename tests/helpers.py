"""Shared test utilities: random problems with odd sizes and strides, and error measures."""

from __future__ import annotations

import torch

from hen_fast import SEPARATIONS, SIMILARITIES, oracle
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


def check_against_reference(out, info, queries, memories, values, **kwargs):
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
        assert error <= 2 * ours_error + 2e-6 and error < tolerance(), (error, ours_error)
    else:
        assert error < tolerance(steps=steps), (error, ours_error)
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
