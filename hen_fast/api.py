"""``hen_fast.retrieve``: argument checking and backend dispatch."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import Request, select_backend
from .bank import MemoryBank
from .info import RetrieveInfo
from .reference import SEPARATIONS, SIMILARITIES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def retrieve(
    queries: Tensor,
    memories: Tensor | MemoryBank,
    values: Tensor | None = None,
    *,
    beta: float = 1.0,
    similarity: str = "dot",
    separation: str = "softmax",
    alpha: float = 1.5,
    degree: float = 10,
    steps: int = 1,
    tol: float | None = None,
    clamp_mask: Tensor | None = None,
    backend: str = "auto",
    return_info: bool = False,
    check_finite: bool = True,
    memory_cap: int | None = None,
) -> Tensor | tuple[Tensor, RetrieveInfo]:
    """Modern Hopfield retrieval: ``x <- Sep(beta * sim(K, x)) V``, ``steps`` times.

    Args:
        queries: ``(B, d)`` or a single ``(d,)`` query.
        memories: the keys ``K``, ``(M, d)``, or a :class:`~hen_fast.MemoryBank` (then
            ``values`` must be None: the bank holds them; its cached norms are reused).
        values: ``(M, dv)``; default the memories themselves (auto-association).
        beta: inverse temperature, multiplies the scores (never the output); finite, ``> 0``.
        similarity: ``"dot"`` (``x.k``), ``"l2"`` (``-||x - k||^2``) or ``"manhattan"``
            (``-||x - k||_1``).
        separation: ``"softmax"``, ``"sparsemax"``, ``"entmax"`` (parameter ``alpha`` in (1, 2);
            alpha -> 1 is softmax, 2 is sparsemax) or ``"polynomial"`` (weights proportional to
            ``relu(beta * score) ** degree``, ``dot`` only; a query whose scores are all ``<= 0``
            gets zero weights and a zero output).
        alpha: the entmax parameter (``separation="entmax"`` only).
        degree: the polynomial degree, ``>= 1`` (``separation="polynomial"`` only).
        steps: updates to apply, ``>= 1``; more than one needs ``dv == d``.
        tol: with ``steps > 1``, a query stops once an update moves it by at most ``tol``
            (Euclidean norm); None runs every step.
        clamp_mask: boolean, broadcastable to the queries: components held at their query value
            after every update (partial cues, hetero-association). Needs ``dv == d``.
        backend: ``"auto"`` (the fastest available for the inputs' device) or a name from
            :func:`hen_fast.available_backends`.
        return_info: also return a :class:`~hen_fast.RetrieveInfo`.
        check_finite: reject NaN/Inf in the inputs (one extra read of the bank; a MemoryBank
            remembers the answer until its tensors change). With ``False``, non-finite inputs
            never crash: a query containing NaN gets a NaN output row, Inf similarities tie at
            the largest finite value; a NaN in the memories or values gives unspecified output
            (it may reach any row, or be skipped where the weight is 0), other rows unaffected
            by it are computed as usual.
        memory_cap: bytes of bank (keys, values, norms) to hold on the compute device at once.
            A larger bank is streamed in chunks through the backend and the chunks' partial
            states are merged exactly (out-of-core). A memory-mapped MemoryBank is streamed by
            default in chunks of 256 MiB, and a MemoryBank on the CPU with queries on a GPU is
            streamed to the GPU (two chunks in flight, so each chunk takes half the cap).
            Streaming computes without autograd.

    Extremes: any finite ``beta`` (up to 1e30 and more) and scores beyond float32's range give
    a finite result, the float64 one or its limit: beta multiplies differences from each row's
    maximum similarity, and sparse thresholds are solved relative to it. Similarities that
    overflow the compute dtype (inputs of magnitude ~1e19 in float32) are clamped to its largest
    finite value, so the memories that overflowed share the weight evenly. ``info.lse`` is the
    float32 value of the log-partition and may be +-inf when it lies beyond float32's range.

    Returns:
        ``(B, dv)`` (or ``(dv,)`` for a single query) in the queries' dtype, and the info when
        ``return_info``. Computation is in float32 (float64 when any input is float64).

    Raises:
        TypeError: a non-tensor, or an integer, complex or boolean tensor where a float is needed.
        ValueError: any other bad argument, naming it, what it got and what was expected;
            :class:`~hen_fast.BackendUnavailableError` for a named backend that cannot run here.
    """
    bank = memories if isinstance(memories, MemoryBank) else None
    norms = None
    if bank is not None:
        if values is not None:
            raise ValueError(
                "values must be None when memories is a MemoryBank: the bank holds its values"
            )
        state = bank.state
        memories, values, norms = state.keys, state.values, state.norms
    # A host bank with queries on a GPU is streamed to the GPU, so only then devices may differ.
    host_bank = (
        bank is not None
        and isinstance(queries, Tensor)
        and memories.device.type == "cpu"
        and queries.device.type == "cuda"
    )
    args = check_arguments(
        queries, memories, values, beta=beta, similarity=similarity, separation=separation,
        alpha=alpha, degree=degree, steps=steps, tol=tol, clamp_mask=clamp_mask,
        return_info=return_info, check_finite=check_finite and bank is None,
        check_devices=not host_bank,
    )  # fmt: skip
    if check_finite:
        if bank is not None and not bank.all_finite():
            raise ValueError(
                "memories (the MemoryBank) contains NaN or Inf; clean the input or pass "
                "check_finite=False to skip this check"
            )
        if bank is not None and not _all_finite(queries):
            raise ValueError(
                "queries contains NaN or Inf; clean the input or pass "
                "check_finite=False to skip this check"
            )
    if memory_cap is not None:
        if isinstance(memory_cap, bool) or not isinstance(memory_cap, numbers.Integral):
            raise TypeError(f"memory_cap must be an int (bytes) or None, got {memory_cap!r}")
        if memory_cap <= 0:
            raise ValueError(f"memory_cap must be > 0 bytes, got {memory_cap}")

    tensors = [t for t in (queries, memories, values) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    chunk_rows = _stream_chunk_rows(memory_cap, bank, memories, values, similarity, queries)
    request = Request(
        queries.device,
        tuple(t.dtype for t in tensors),
        needs_grad,
        num_queries=args.queries2d.shape[0],
        num_memories=memories.shape[0] if chunk_rows is None else chunk_rows,
        similarity=similarity,
        separation=separation,
    )
    impl = select_backend(backend, request)
    kwargs = dict(beta=args.beta, similarity=similarity, separation=separation, alpha=args.alpha,
                  degree=args.degree, steps=int(steps), tol=args.tol,
                  clamp_mask=args.clamp_mask, return_info=return_info)  # fmt: skip
    if chunk_rows is not None:
        if needs_grad:
            raise ValueError(
                "memory_cap: out-of-core streaming computes without autograd; retrieve in "
                "memory (no memory_cap, a bank that is not memory-mapped) to differentiate"
            )
        from .streaming import stream_retrieve

        out, info = stream_retrieve(
            args.queries2d, memories, values, norms if similarity == "l2" else None, impl=impl,
            chunk_rows=chunk_rows, **kwargs,
        )  # fmt: skip
    else:
        out, info = impl.retrieve(args.queries2d, memories, values, **kwargs)
    if args.single:
        out = out.squeeze(0)
        info = None if info is None else info.squeeze()
    return (out, info) if return_info else out


@dataclass(frozen=True)
class CheckedArguments:
    """retrieve's arguments after validation, in the form the backends take."""

    single: bool
    queries2d: Tensor
    beta: float
    alpha: float
    degree: float
    tol: float | None
    clamp_mask: Tensor | None


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
    check_devices=True,
) -> CheckedArguments:
    """Every check :func:`retrieve` makes, raising its TypeError/ValueError; shared with
    :class:`hen_fast.distributed.ShardedMemory` (which passes its local shard as ``memories``)."""
    single = _check_tensor("queries", queries, (1, 2))
    _check_tensor("memories", memories, (2,))
    if values is not None:
        _check_tensor("values", values, (2,))
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
        _check_devices(queries=queries, memories=memories, values=values, clamp_mask=clamp_mask)
    else:
        _check_devices(queries=queries, clamp_mask=clamp_mask)
        _check_devices(memories=memories, values=values)

    beta = _check_real("beta", beta, positive=True)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if separation not in SEPARATIONS:
        raise ValueError(f"separation must be one of {SEPARATIONS}, got {separation!r}")
    if separation == "entmax":
        alpha = _check_real("alpha", alpha)
        if not 1.0 < alpha < 2.0:
            raise ValueError(
                f"alpha must lie in the open interval (1, 2) for entmax (use "
                f"'softmax' for 1, 'sparsemax' for 2), got {alpha}"
            )
    if separation == "polynomial":
        degree = _check_real("degree", degree)
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
        tol = _check_real("tol", tol)
        if tol < 0:
            raise ValueError(f"tol must be >= 0 or None, got {tol}")
    if steps > 1 and value_dim != dim:
        raise ValueError(
            f"steps > 1 feeds each output back as the next query, so values must "
            f"have the queries' dimension d={dim}, got dv={value_dim}"
        )
    if clamp_mask is not None:
        clamp_mask = _check_mask(clamp_mask, queries, value_dim)
    for flag_name, flag in (("return_info", return_info), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    if check_finite:
        for name, tensor in (("queries", queries), ("memories", memories), ("values", values)):
            if tensor is not None and not _all_finite(tensor):
                raise ValueError(
                    f"{name} contains NaN or Inf; clean the input or pass "
                    "check_finite=False to skip this check"
                )

    return CheckedArguments(single, queries2d, beta, alpha, degree, tol, clamp_mask)


def _stream_chunk_rows(memory_cap, bank, keys, values, similarity, queries) -> int | None:
    """Memories per chunk when the bank must be streamed, else None (it is retrieved in memory)."""
    from .streaming import DEFAULT_MAPPED_CAP, chunk_rows_for, needs_double_buffer

    double = needs_double_buffer(keys, queries.device)
    if memory_cap is None:
        if bank is None or not (bank.mapped or double):
            return None
        memory_cap = DEFAULT_MAPPED_CAP
    with_norms = bank is not None and similarity == "l2"
    rows = chunk_rows_for(memory_cap, keys, values, with_norms, buffers=2 if double else 1)
    return None if rows >= keys.shape[0] and not double else rows


def _check_tensor(name: str, tensor, dims: tuple[int, ...]) -> bool:
    """Type, dtype and rank of an input; returns whether it is a single 1-D vector."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {tensor.dtype}"
        )
    if tensor.dim() not in dims:
        shapes = " or ".join({1: "(d,)", 2: "(N, d)"}[n] for n in dims)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(tensor.shape)}")
    return tensor.dim() == 1


def _all_finite(tensor: Tensor) -> bool:
    """No NaN or Inf, in one read and O(1) memory: the min and max are finite exactly then (both
    are NaN if any entry is). torch.isfinite would allocate temporaries the size of the bank."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_devices(**tensors) -> None:
    placed = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(placed.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in placed.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_real(name: str, value, positive: bool = False) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_mask(clamp_mask, queries: Tensor, value_dim: int) -> Tensor:
    if not isinstance(clamp_mask, Tensor):
        raise TypeError(f"clamp_mask must be a torch.Tensor, got {type(clamp_mask).__name__}")
    if clamp_mask.dtype != torch.bool:
        raise TypeError(f"clamp_mask must be a bool tensor, got {clamp_mask.dtype}")
    if value_dim != queries.shape[-1]:
        raise ValueError(
            f"clamp_mask holds components of the query in the output, so values must "
            f"have the queries' dimension d={queries.shape[-1]}, got dv={value_dim}"
        )
    try:
        torch.broadcast_shapes(clamp_mask.shape, queries.shape)
        expanded = clamp_mask.broadcast_to(queries.shape)
    except RuntimeError:
        raise ValueError(
            f"clamp_mask of shape {tuple(clamp_mask.shape)} does not broadcast to the "
            f"queries' shape {tuple(queries.shape)}"
        ) from None
    return expanded.reshape(-1, queries.shape[-1])
