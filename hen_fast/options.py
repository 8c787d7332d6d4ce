"""The options of one retrieval, and every check of :func:`hen_fast.retrieve`'s arguments.

Checked once, here, for every entry point (``hen_fast.retrieve``, ``ShardedMemory.retrieve``):
each bad argument raises a TypeError or ValueError that names it, what it got and what was
expected. The checks never read a tensor's data except the finiteness check, which
``check_finite=False`` skips (the one check that costs a read of the bank).

Under ``torch.compile`` the checks of types, shapes, dtypes and numbers stay Python (they depend
on nothing the graph computes, and dynamo guards on them), while the finiteness check becomes an
op of the graph that raises when it runs (:func:`require_finite`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .codes import SEPARATIONS, SIMILARITIES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class RetrieveOptions:
    """What to compute, validated: every backend takes these as keyword arguments
    (:meth:`kernel_kwargs`)."""

    beta: float
    similarity: str
    separation: str
    alpha: float
    degree: float
    steps: int
    tol: float | None
    clamp_mask: Tensor | None
    return_info: bool
    # The softmax / polynomial weight an indexed bank may skip (None: the default); not a kernel
    # argument: the backends scan, the indexed driver (hen_fast.indexed) skips.
    eps: float | None = None
    # (B, d) bool: the coordinates each query's similarity sums over (None: all); not a kernel
    # argument: hen_fast.masked gives the backends the masked query, or the masked columns.
    score_mask: Tensor | None = None

    def kernel_kwargs(self) -> dict:
        return dict(beta=self.beta, similarity=self.similarity, separation=self.separation,
                    alpha=self.alpha, degree=self.degree, steps=self.steps, tol=self.tol,
                    clamp_mask=self.clamp_mask, return_info=self.return_info)  # fmt: skip


@dataclass(frozen=True)
class CheckedArguments:
    """retrieve's arguments after validation: the queries as a 2-D batch (``single``: the caller
    gave one 1-D query) and the options."""

    single: bool
    queries2d: Tensor
    options: RetrieveOptions


def check_arguments(
    queries,
    memories,
    values,
    *,
    beta,
    similarity,
    separation,
    alpha,
    degree,
    steps,
    tol,
    clamp_mask,
    return_info,
    check_finite,
    memory_cap=None,
    check_devices=True,
    eps=None,
    score_mask=None,
) -> CheckedArguments:
    """Every check :func:`hen_fast.retrieve` makes, raising its TypeError/ValueError; shared with
    :class:`hen_fast.distributed.ShardedMemory` (which passes its local shard as ``memories``)."""
    single = check_tensor("queries", queries, (1, 2))
    check_tensor("memories", memories, (2,))
    if values is not None:
        check_tensor("values", values, (2,))
    queries2d = queries.unsqueeze(0) if single else queries
    num_queries, dim = queries2d.shape
    num_memories = memories.shape[0]
    if num_queries == 0:
        raise ValueError(f"queries must hold at least one query, got shape {tuple(queries.shape)}")
    if dim == 0:
        raise ValueError(
            f"queries must have at least one feature, got shape {tuple(queries.shape)}"
        )
    if num_memories == 0:
        raise ValueError(
            f"memories is empty (shape {tuple(memories.shape)}): store at least one pattern"
        )
    if memories.shape[1] != dim:
        raise ValueError(
            f"memories must have the queries' dimension d={dim}, got shape {tuple(memories.shape)}"
        )
    if values is not None and values.shape[0] != num_memories:
        raise ValueError(
            f"values must have one row per memory ({num_memories}), got shape {tuple(values.shape)}"
        )
    value_dim = dim if values is None else values.shape[1]
    if value_dim == 0:
        raise ValueError(f"values must have at least one column, got shape {tuple(values.shape)}")
    if check_devices:
        _check_devices(queries=queries, memories=memories, values=values, clamp_mask=clamp_mask,
                       score_mask=score_mask)  # fmt: skip
    else:
        _check_devices(queries=queries, clamp_mask=clamp_mask, score_mask=score_mask)
        _check_devices(memories=memories, values=values)

    beta = check_real("beta", beta, positive=True)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if separation not in SEPARATIONS:
        raise ValueError(f"separation must be one of {SEPARATIONS}, got {separation!r}")
    if separation == "entmax":
        alpha = check_real("alpha", alpha)
        if not 1.0 < alpha < 2.0:
            raise ValueError(
                f"alpha must lie in the open interval (1, 2) for entmax (use "
                f"'softmax' for 1, 'sparsemax' for 2), got {alpha}"
            )
    if separation == "polynomial":
        degree = check_real("degree", degree)
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        if similarity != "dot":
            raise ValueError(
                f"separation 'polynomial' is defined for similarity 'dot' only "
                f"(distance scores are all <= 0), got similarity {similarity!r}"
            )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if tol is not None:
        tol = check_real("tol", tol)
        if tol < 0:
            raise ValueError(f"tol must be >= 0 or None, got {tol}")
    if steps > 1 and value_dim != dim:
        raise ValueError(
            f"steps > 1 feeds each output back as the next query, so values must "
            f"have the queries' dimension d={dim}, got dv={value_dim}"
        )
    if clamp_mask is not None:
        clamp_mask = _check_mask("clamp_mask", clamp_mask, queries)
        if value_dim != dim:
            raise ValueError(
                f"clamp_mask holds components of the query in the output, so values must "
                f"have the queries' dimension d={dim}, got dv={value_dim}"
            )
    if score_mask is not None:
        score_mask = _check_mask("score_mask", score_mask, queries)
    if eps is not None:
        eps = check_real("eps", eps)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must lie in [0, 1) (a fraction of the weight), got {eps}")
        if separation not in ("softmax", "polynomial"):
            raise ValueError(
                f"eps bounds the skipped weight of softmax and polynomial; {separation!r} over an "
                f"index skips only memories of weight exactly 0, so it takes no eps"
            )
    if memory_cap is not None:
        if isinstance(memory_cap, bool) or not isinstance(memory_cap, numbers.Integral):
            raise TypeError(f"memory_cap must be an int (bytes) or None, got {memory_cap!r}")
        if memory_cap <= 0:
            raise ValueError(f"memory_cap must be > 0 bytes, got {memory_cap}")
    for flag_name, flag in (("return_info", return_info), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    if check_finite:
        for name, tensor in (("queries", queries), ("memories", memories), ("values", values)):
            if tensor is not None:
                require_finite(name, tensor)

    options = RetrieveOptions(beta, similarity, separation, alpha, degree, int(steps), tol,
                              clamp_mask, return_info, eps, score_mask)  # fmt: skip
    return CheckedArguments(single, queries2d, options)


def check_tensor(name: str, tensor, dims: tuple[int, ...], shape: str | None = None) -> bool:
    """Type, dtype and rank of an input (``shape`` names the expected shape in the message);
    returns whether it is a single 1-D vector."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {tensor.dtype}"
        )
    if tensor.dim() not in dims:
        shapes = shape or " or ".join({1: "(d,)", 2: "(N, d)"}[n] for n in dims)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(tensor.shape)}")
    return tensor.dim() == 1


def all_finite(tensor: Tensor) -> bool:
    """No NaN or Inf, in one read and O(1) memory: the min and max are finite exactly then (both
    are NaN if any entry is). torch.isfinite would allocate temporaries the size of the bank."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def not_finite_message(name: str) -> str:
    return (
        f"{name} contains NaN or Inf; clean the input or pass check_finite=False to skip this check"
    )


def require_finite(name: str, tensor: Tensor) -> None:
    """Raises if ``tensor`` holds NaN or Inf.

    Eagerly a ValueError, before anything is computed. Under ``torch.compile`` reading the answer
    on the host would break the graph (a data-dependent branch), so the same condition becomes a
    graph op, ``torch._assert_async`` on the finiteness of the min and max, which raises a
    RuntimeError with the same message when the compiled code runs (on a GPU, an asynchronous
    device-side assert)."""
    if not torch.compiler.is_compiling():
        if not all_finite(tensor):
            raise ValueError(not_finite_message(name))
        return
    if tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    torch._assert_async(torch.isfinite(low) & torch.isfinite(high), not_finite_message(name))


def _check_devices(**tensors) -> None:
    placed = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(placed.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in placed.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_real(name: str, value, positive: bool = False) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument can be
    # symbolic, and dynamo turns comparisons (not math.isfinite) into guards. NaN compares False.
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_mask(name: str, mask, queries: Tensor) -> Tensor:
    """A bool mask over the queries' components (clamp_mask, score_mask), broadcast to (B, d)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, queries.shape)
        expanded = mask.broadcast_to(queries.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the "
            f"queries' shape {tuple(queries.shape)}"
        ) from None
    return expanded.reshape(-1, queries.shape[-1])
