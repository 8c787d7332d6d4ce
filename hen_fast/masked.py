"""Similarities over part of each query's coordinates: :func:`hen_fast.retrieve`'s ``score_mask``.

A query's similarity to a memory sums over the coordinates its mask holds (``S``): dot
``sum_{j in S} x_j k_j``, l2 ``-sum_{j in S} (x_j - k_j)^2``, manhattan
``-sum_{j in S} |x_j - k_j|``; the values are read whole. Each is an unmasked retrieval that the
fused kernels of every backend already compute, so the mask needs no kernel of its own:

* dot: the query with the coordinates outside ``S`` set to zero, against the whole bank. This
  holds for every source, an index included (its bounds hold for any query vector).
* l2 and manhattan: the query's coordinates in ``S`` against the same columns of the keys, one
  call per distinct mask (one in all when a batch shares its mask, e.g. one occlusion). A bank
  held whole has those columns gathered once per call; a bank in parts (memory-mapped, streamed,
  sharded) has them gathered a chunk at a time, so it is never copied whole. A bank's index
  bounds full-coordinate distances, so these calls scan.

Coordinates outside the mask are not read (a NaN there changes nothing). A query whose mask holds
nothing scores every memory 0, the empty sum: the weights are uniform.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sources import ChunkSource


def masked_step(source, similarity: str, step_over):
    """``one_step(rows, mask)`` for :func:`hen_fast.loop.iterate`: one update of ``rows`` scored
    over each row's ``mask``. ``step_over(source, similarity)`` is the unmasked ``one_step`` of
    one update over a source."""
    if similarity == "dot":
        whole = step_over(source, "dot")

        def dot_step(rows: Tensor, mask: Tensor):
            return whole(torch.where(mask, rows, 0.0))

        return dot_step

    def column_step(rows: Tensor, mask: Tensor):
        masks, group = torch.unique(mask, dim=0, return_inverse=True)
        parts = []
        for position, columns_mask in enumerate(masks):
            members = (group == position).nonzero().squeeze(1)
            columns = columns_mask.nonzero().squeeze(1)
            if columns.numel() == 0:  # the empty sum: zero queries score every memory 0 by dot
                part = step_over(source, "dot")(torch.zeros_like(rows[members]))
            else:
                part = step_over(column_source(source, columns), similarity)(
                    rows[members][:, columns]
                )
            parts.append((members, part))
        if len(parts) == 1:
            return parts[0][1]
        return _assemble(parts, rows.shape[0])

    return column_step


def column_source(source, columns: Tensor):
    """The bank with its keys restricted to ``columns`` and its values whole (the full keys for
    auto-association): gathered once when held whole, else per chunk."""
    if source.in_memory:
        values = source.keys if source.values is None else source.values
        return ChunkSource(source.keys.index_select(1, columns.to(source.keys.device)), values,
                           None, chunk_rows=source.local_count, device=source.device,
                           offset=source.offset, num_memories=source.num_memories)  # fmt: skip
    return _ColumnChunks(source, columns)


class _ColumnChunks:
    """A source in parts whose chunks carry ``columns`` of the keys and the whole values."""

    in_memory = False
    index = None

    def __init__(self, source, columns: Tensor):
        self.source, self.columns = source, columns.to(source.device)
        self.offset, self.local_count = source.offset, source.local_count
        self.num_memories, self.value_dim = source.num_memories, source.value_dim
        self.chunk_rows, self.device = source.chunk_rows, source.device

    def chunks(self):
        for start, keys, _, values in self.source.chunks():
            columns = keys.index_select(1, self.columns)
            yield start, columns, None, keys if values is None else values

    def values_at(self, local_index: Tensor) -> Tensor:
        return self.source.values_at(local_index)


def _assemble(parts, count: int):
    """One step's ``(out, *info fields)`` for all rows from the groups' (members, result)."""
    fields = []
    for position, like in enumerate(parts[0][1]):
        if like is None:
            fields.append(None)
            continue
        merged = like.new_zeros((count, *like.shape[1:]))
        for members, result in parts:
            merged = merged.index_copy(0, members, result[position])
        fields.append(merged)
    return tuple(fields)
