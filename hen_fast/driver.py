"""The driver: every entry point's retrieval runs through :func:`run`.

The flow is request -> source -> parts -> backend step -> merge -> loop:

* the entry point (:func:`hen_fast.retrieve`, :meth:`hen_fast.distributed.ShardedMemory.retrieve`)
  checks its arguments once (:mod:`hen_fast.options`) and describes the bank as a source
  (:mod:`hen_fast.sources`): in memory, in chunks (memory-mapped, host-to-GPU), or a shard;
* :func:`run` picks the backend for the request (:mod:`hen_fast.backends`);
* a bank held whole, in one process, goes to the backend in one call, which runs its own update
  loop (Triton keeps it on the device; the others use :func:`hen_fast.loop.iterate`);
* a bank in parts runs the fused backend on each part and merges the parts' partial states
  exactly (:mod:`hen_fast.merge`, :mod:`hen_fast.partial`), under the one update loop;
* a bank with an index (:mod:`hen_fast.indexed`) is read, per query, cluster by cluster as far
  as its certified bounds require, its clusters' partial states merged the same way;
* a ``score_mask`` turns each update into unmasked ones of the paths above (:mod:`hen_fast.masked`:
  masked queries, or the masked columns of the keys), under the same loop.

So every path shares one validation, one backend choice, one extreme-value policy (the backends'
and the merge's: beta on differences from the row maximum, similarities clamped finite) and one
loop.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .backends import Request, select_backend
from .indexed import DEFAULT_EPS, IndexedBank, indexed_step
from .loop import iterate
from .masked import masked_step
from .merge import merged_step
from .numerics import accumulation_dtype
from .options import CheckedArguments
from .sources import LOCAL, ChunkSource, default_candidates


def run(args: CheckedArguments, source: ChunkSource, *, backend: str = "auto", group=LOCAL,
        candidates: int | None = None):  # fmt: skip
    """``out`` (or ``(out, info)`` with ``return_info``) of the checked call ``args`` over the
    bank ``source`` (this process's part of it when ``group`` spans several processes)."""
    queries, options = args.queries2d, args.options
    keys, values = source.keys, source.values
    tensors = [t for t in (queries, keys, values) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    whole = source.in_memory and group.size == 1
    request = Request(queries.device, tuple(t.dtype for t in tensors), needs_grad,
                      num_queries=queries.shape[0], num_memories=source.chunk_rows,
                      similarity=options.similarity, separation=options.separation)  # fmt: skip
    impl = select_backend(backend, request)
    candidates = candidates or default_candidates(queries.shape[0])
    use_index = source.index is not None and not needs_grad and group.size == 1
    if options.score_mask is not None:
        out, info = _score_masked(args, source, group, impl, candidates, use_index,
                                  accumulation_dtype(*tensors), needs_grad)  # fmt: skip
    elif use_index:
        out, info = _indexed(args, source, impl, candidates, accumulation_dtype(*tensors))
    elif whole:
        out, info = impl.retrieve(queries, keys, values, **options.kernel_kwargs())
    else:
        _no_grad_in_parts(needs_grad)
        one_step = _scan_step(source, group, impl, options, candidates, options.return_info)
        with torch.no_grad():
            out, info = iterate(one_step, queries, accumulation_dtype(*tensors),
                                steps=options.steps, tol=options.tol,
                                clamp_mask=options.clamp_mask,
                                return_info=options.return_info)  # fmt: skip
    if info is not None:
        info = info.with_scan_fields()
    if args.single:
        out = out.squeeze(0)
        info = None if info is None else info.squeeze()
    return (out, info) if options.return_info else out


def _no_grad_in_parts(needs_grad: bool) -> None:
    if needs_grad:
        raise ValueError(
            "a bank retrieved in parts (memory_cap, a memory-mapped bank, a host bank with "
            "queries on a GPU, or a ShardedMemory) computes without autograd; retrieve from "
            "a bank held whole in memory to differentiate"
        )


def _score_masked(args, source, group, impl, candidates, use_index, dtype, needs_grad):
    """The update loop with each update scored over the queries' ``score_mask``: dot over the
    masked queries (an index used as without a mask), l2 / manhattan over the masked columns."""
    options = args.options
    whole = source.in_memory and group.size == 1
    if not whole:
        _no_grad_in_parts(needs_grad)

    def step_over(part, similarity):
        part_options = dataclasses.replace(options, similarity=similarity)
        if use_index and part.index is not None:
            return _indexed_step(part, impl, part_options, candidates)
        return _scan_step(part, group, impl, part_options, candidates, options.return_info)

    one_step = masked_step(source, options.similarity, step_over)
    with contextlib.nullcontext() if whole else torch.no_grad():
        return iterate(one_step, args.queries2d, dtype, steps=options.steps, tol=options.tol,
                       clamp_mask=options.clamp_mask, return_info=options.return_info,
                       score_mask=options.score_mask)  # fmt: skip


def _scan_step(source, group, impl, options, candidates, want_info):
    """``one_step`` of one update over the whole bank: the backend's own call for a bank held
    whole, else the parts' merged partial states."""
    if source.in_memory and group.size == 1:

        def whole_step(rows):
            kwargs = dict(options.kernel_kwargs(), steps=1, tol=None, clamp_mask=None,
                          return_info=want_info)  # fmt: skip
            out, info = impl.retrieve(rows, source.keys, source.values, **kwargs)
            if info is None:  # softmax's support count costs the kernels a pass
                return out, None, None, None
            return out, info.support, info.argmax, info.lse

        return whole_step

    def merged(rows):
        return merged_step(rows, source, group, impl=impl, beta=options.beta,
                           similarity=options.similarity, separation=options.separation,
                           alpha=options.alpha, degree=options.degree, candidates=candidates,
                           want_info=want_info)  # fmt: skip

    return merged


def _indexed_step(source, impl, options, candidates):
    """``one_step`` of one update over an indexed bank."""
    bank = IndexedBank(source.keys, source.values, source.norms, source.index)
    scan = _scan_step(source, LOCAL, impl, options, candidates, options.return_info)

    def one_step(rows):
        return indexed_step(rows, bank, scan, impl=impl, beta=options.beta,
                            similarity=options.similarity, separation=options.separation,
                            alpha=options.alpha, degree=options.degree, candidates=candidates,
                            eps=DEFAULT_EPS if options.eps is None else options.eps,
                            want_info=options.return_info)  # fmt: skip

    return one_step


def _indexed(args, source, impl, candidates, dtype):
    """The update loop over an indexed bank (:mod:`hen_fast.indexed`): each query reads the
    clusters its bounds do not rule out; queries that would read most of the bank are scanned."""
    options = args.options
    one_step = _indexed_step(source, impl, options, candidates)
    with torch.no_grad():
        return iterate(one_step, args.queries2d, dtype, steps=options.steps, tol=options.tol,
                       clamp_mask=options.clamp_mask, return_info=options.return_info)
