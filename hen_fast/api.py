"""``hen_fast.retrieve``, the public entry point: checks its arguments, describes the bank as a
source and hands both to :func:`hen_fast.driver.run`."""

from __future__ import annotations

import torch
from torch import Tensor

from . import driver
from .bank import MemoryBank
from .info import RetrieveInfo
from .options import check_arguments, not_finite_message, require_finite
from .sources import bank_source


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
    score_mask: Tensor | None = None,
    backend: str = "auto",
    return_info: bool = False,
    check_finite: bool = True,
    memory_cap: int | None = None,
    eps: float | None = None,
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
        score_mask: boolean, broadcastable to the queries: the components each query's
            similarity sums over (e.g. the known part of an occluded cue), at every update:
            dot ``sum_S x_j k_j``, l2 ``-sum_S (x_j - k_j)^2``, manhattan ``-sum_S |x_j - k_j|``
            over the query's True components ``S``; the values are read whole, components
            outside ``S`` are not read, an empty ``S`` scores every memory 0. Exact on every
            backend and source (:mod:`hen_fast.masked`); l2 and manhattan make one call per
            distinct mask over the gathered columns of the keys and scan an indexed bank.
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
        eps: softmax and polynomial over a bank with an index: the weight the skipped memories
            may have, relative to the memories read (the output moves by at most
            ``2 * eps * max ||v||``); default ``2**-24``, float32's unit roundoff. 0 reads every
            cluster whose bound is not ``-inf`` (polynomial: not ``<= 0``). Other separations
            take none: over an index they skip only memories of weight exactly 0.

    A :class:`~hen_fast.MemoryBank` with an index (:meth:`~hen_fast.MemoryBank.build_index`)
    is read cluster by cluster, each query only the clusters whose certified score bound can
    matter (sparsemax / entmax: the result is the full scan's; softmax / polynomial: within
    ``eps``); ``info.fraction_read`` says how much of the bank each query read and
    ``info.mass_bound`` the softmax weight skipped. The queries of a call read at most a tenth
    of the bank together; those still needing more are scanned instead, and so are all queries
    of a call on a bank of less than 56 MiB plus 12 MiB per query. With
    autograd the bank is scanned; pass ``bank.keys`` and ``bank.values`` to scan without the
    index.

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
    norms = index = None
    if bank is not None:
        if values is not None:
            raise ValueError(
                "values must be None when memories is a MemoryBank: the bank holds its values"
            )
        state = bank.state
        memories, values, norms, index = state.keys, state.values, state.norms, state.index
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
        score_mask=score_mask, return_info=return_info, check_finite=check_finite and bank is None,
        memory_cap=memory_cap, check_devices=not host_bank, eps=eps,
    )  # fmt: skip
    if check_finite and bank is not None:
        bank_name = "memories (the MemoryBank)"
        if torch.compiler.is_compiling():
            # The bank's remembered answer is host state: the compiled graph checks its tensors.
            for tensor in (memories, values):
                if tensor is not None:
                    require_finite(bank_name, tensor)
        elif not bank.all_finite():  # remembered until the bank's tensors change
            raise ValueError(not_finite_message(bank_name))
        require_finite("queries", queries)
    source = bank_source(queries, memories, values, norms, memory_cap=memory_cap, bank=bank,
                         similarity=similarity, index=index)  # fmt: skip
    return driver.run(args, source, backend=backend)
