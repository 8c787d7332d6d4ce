"""Bank sources: where the parts of a bank come from, as chunks on the compute device.

A source yields this process's part of the bank in chunks: a bank in memory is one chunk; a
memory-mapped bank, or a bank on the host while the queries are on a GPU, is read ``chunk_rows``
memories at a time (on a GPU, chunk ``i + 1`` is copied from pinned host memory on a side stream
while chunk ``i`` computes, so at most two chunks occupy the device); a shard of a bank sharded
over ``torch.distributed`` is the same with an ``offset`` and the group's ``num_memories``. A
group's ``gather`` exchanges per-process partial states (:class:`LocalGroup`: nothing to exchange).
:func:`hen_fast.merge.merged_step` computes one update over any source and group.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from .partial import fold

Chunk = tuple[int, Tensor, Tensor | None, Tensor | None]  # (global start, keys, norms, values)


class BankSource(Protocol):
    """This process's part of the bank, as chunks on the compute device."""

    offset: int  # global index of this process's first memory
    local_count: int  # memories held here
    num_memories: int  # memories over every process
    value_dim: int

    def chunks(self) -> Iterator[Chunk]: ...

    def values_at(self, local_index: Tensor) -> Tensor: ...


class LocalGroup:
    """The collective of a single process: every part is here, nothing to exchange."""

    size = 1

    def gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]


LOCAL = LocalGroup()


def sum_in_order(group, tensor: Tensor) -> Tensor:
    """The sum over processes, added in rank order (the same bits on every process)."""
    return fold(group.gather(tensor), operator.add)


# Bank bytes per chunk for a memory-mapped bank when no memory_cap is given: large enough for
# efficient kernels and disk reads, small against RAM.
DEFAULT_MAPPED_CAP = 1 << 28
# Progress bars appear (on a terminal) for passes of at least this many chunks.
PROGRESS_MIN_CHUNKS = 16


def default_candidates(num_queries: int) -> int:
    """Scores kept per query for the sparse thresholds. More than the in-memory backends keep:
    a row that outgrows the buffer costs passes over the bank, which here means re-reading it."""
    return max(256, min(4096, (1 << 21) // max(1, num_queries)))


def row_bytes(keys: Tensor, values: Tensor | None, with_norms: bool) -> int:
    """Device bytes one memory takes in a chunk."""
    size = keys.shape[1] * keys.element_size() + (4 if with_norms else 0)
    if values is not None:
        size += values.shape[1] * values.element_size()
    return size


def chunk_rows_for(memory_cap: int, keys: Tensor, values, with_norms: bool, buffers: int) -> int:
    """Memories per chunk so that ``buffers`` chunks fit in ``memory_cap`` bytes."""
    per_row = row_bytes(keys, values, with_norms)
    rows = memory_cap // (buffers * per_row)
    if rows < 1:
        raise ValueError(
            f"memory_cap must hold at least {buffers} memory row(s) of {per_row} bytes "
            f"({buffers * per_row} bytes), got {memory_cap}"
        )
    return int(rows)


def needs_double_buffer(keys: Tensor, device: torch.device) -> bool:
    return device.type == "cuda" and keys.device.type == "cpu"


class ChunkSource:
    """A bank (or one process's shard of it) read ``chunk_rows`` memories at a time onto
    ``device``; see :class:`hen_fast.merge.BankSource`."""

    def __init__(self, keys, values, norms, *, chunk_rows, device, offset=0, num_memories=None,
                 desc="bank"):  # fmt: skip
        self.keys, self.values, self.norms = keys, values, norms
        self.chunk_rows = max(1, int(chunk_rows))
        self.device = torch.device(device)
        self.offset = offset
        self.local_count = keys.shape[0]
        self.num_memories = self.local_count if num_memories is None else num_memories
        self.value_dim = keys.shape[1] if values is None else values.shape[1]
        self.desc = desc
        # The bank's BankIndex, when it has one (hen_fast.indexed reads only the clusters a
        # query needs); None: every update scans.
        self.index = None

    @property
    def in_memory(self) -> bool:
        """The whole bank is here, in one chunk on the compute device: no parts to merge."""
        return (
            self.chunk_rows >= self.local_count
            and self.local_count == self.num_memories
            and self.keys.device == self.device
        )

    @property
    def num_chunks(self) -> int:
        return -(-self.local_count // self.chunk_rows)

    def chunks(self):
        """Yields ``(global start, keys, norms or None, values or None)`` on the device."""
        if needs_double_buffer(self.keys, self.device):
            chunks = self._double_buffered()
        else:
            chunks = (self._slice(start) for start in range(0, self.local_count, self.chunk_rows))
        if self.num_chunks >= PROGRESS_MIN_CHUNKS:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, total=self.num_chunks, desc=self.desc, leave=False,
                          disable=None)  # fmt: skip
        for start, *tensors in chunks:
            yield (start + self.offset, *tensors)

    def values_at(self, local_index: Tensor) -> Tensor:
        """Value rows by local index (a gather: reads just those rows of a mapped bank)."""
        source = self.keys if self.values is None else self.values
        return source[local_index.to(source.device)].to(self.device)

    def _host_slices(self, start: int) -> list[Tensor | None]:
        stop = min(start + self.chunk_rows, self.local_count)
        return [None if t is None else t[start:stop] for t in (self.keys, self.norms, self.values)]

    def _slice(self, start: int):
        moved = (None if t is None else t.to(self.device) for t in self._host_slices(start))
        return (start, *moved)

    def _double_buffered(self):
        """Host -> device copies from pinned memory on a side stream, one chunk ahead of the
        compute stream. The caching host allocator keeps each pinned block until its copy is done;
        ``record_stream`` keeps each device chunk until the compute stream is done with it."""
        compute = torch.cuda.current_stream(self.device)
        copy = torch.cuda.Stream(self.device)

        def stage(start: int):
            host = self._host_slices(start)
            with torch.cuda.stream(copy):
                moved = [None if t is None else t.pin_memory().to(self.device, non_blocking=True)
                         for t in host]  # fmt: skip
                done = torch.cuda.Event()
                done.record(copy)
            return start, moved, done

        starts = range(0, self.local_count, self.chunk_rows)
        pending = stage(starts[0]) if len(starts) else None
        for position in range(len(starts)):
            start, moved, done = pending
            compute.wait_event(done)
            for tensor in moved:
                if tensor is not None:
                    tensor.record_stream(compute)
            if position + 1 < len(starts):
                pending = stage(starts[position + 1])
            yield (start, *moved)


def bank_source(queries: Tensor, keys: Tensor, values, norms, *, memory_cap, bank,
                similarity: str, index=None) -> ChunkSource:  # fmt: skip
    """The source of one process's bank for :func:`hen_fast.retrieve`: whole in memory, unless
    ``memory_cap`` bounds it, the bank is memory-mapped (chunks of DEFAULT_MAPPED_CAP bytes), or
    a host bank meets queries on a GPU (two chunks in flight, each half the cap)."""
    source = _bank_chunks(queries, keys, values, norms, memory_cap=memory_cap, bank=bank,
                          similarity=similarity)  # fmt: skip
    source.index = index  # from the same snapshot of the bank as the tensors
    return source


def _bank_chunks(queries, keys, values, norms, *, memory_cap, bank, similarity) -> ChunkSource:
    double = needs_double_buffer(keys, queries.device)
    whole = ChunkSource(keys, values, norms, chunk_rows=keys.shape[0], device=queries.device)
    if memory_cap is None:
        if bank is None or not (bank.mapped or double):
            return whole
        memory_cap = DEFAULT_MAPPED_CAP
    with_norms = bank is not None and similarity == "l2"
    rows = chunk_rows_for(memory_cap, keys, values, with_norms, buffers=2 if double else 1)
    if rows >= keys.shape[0] and not double:
        return whole
    return ChunkSource(keys, values, norms if similarity == "l2" else None, chunk_rows=rows,
                      device=queries.device)  # fmt: skip
