"""``ShardedMemory``: one memory bank split across the processes of a ``torch.distributed`` group.

Each rank holds one shard (rank 0 the first rows of the bank, rank 1 the next, ...). ``retrieve``
is a collective: every rank calls it with the same queries and arguments and every rank gets the
result of :func:`hen_fast.retrieve` over the whole bank (the shards concatenated in rank order).
Each rank computes partial states over its shard with the fused backends and the ranks exchange
them with ``all_gather``; every rank then folds them in rank order (:mod:`hen_fast.merge`), so the
results are bit-identical on every rank and ``steps``/``tol`` decisions agree without extra talk.
Exchanged per update: softmax and polynomial ``O(B * dv)`` floats per rank; sparsemax and entmax
``O(B * candidates)`` scores and indices plus ``O(B * dv)`` (and a few ``O(B)`` sums per Newton
pass for rows whose support outgrows the candidate buffer). gloo on CPU tensors, NCCL on CUDA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import driver
from .backends.norms import cached_sq_norms
from .bank import MemoryBank
from .options import all_finite, check_arguments
from .sources import ChunkSource, chunk_rows_for


class ProcessGroupGather:
    """``gather`` for :mod:`hen_fast.merge`: every rank's tensor (same shape on all), rank order."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)

    def gather(self, tensor: Tensor) -> list[Tensor]:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return parts


class ShardedMemory:
    """This rank's shard of a bank sharded across a process group.

    Args:
        local_keys: ``(m_r, d)`` keys held by this rank (at least one row), or a
            :class:`~hen_fast.MemoryBank` (its values and norms are used).
        local_values: ``(m_r, dv)`` or None for auto-association; the same choice on every rank.
        group: the process group (default: the default group, which must be initialised).
        candidates: scores kept per query for the sparse thresholds (default by batch size).

    Shapes, dtypes and the values choice are checked across ranks at construction; a mismatch
    raises the same ValueError on every rank (no rank is left waiting in a collective).
    """

    def __init__(self, local_keys, local_values: Tensor | None = None, group=None, *,
                 candidates: int | None = None):  # fmt: skip
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "group: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group (e.g. under torchrun) first"
            )
        self.bank = local_keys if isinstance(local_keys, MemoryBank) else None
        if self.bank is not None:
            if local_values is not None:
                raise ValueError("local_values must be None when local_keys is a MemoryBank")
            state = self.bank.state
            local_keys, local_values, self._norms = state.keys, state.values, state.norms
        else:
            self._norms = None
        for name, tensor in (("local_keys", local_keys), ("local_values", local_values)):
            if tensor is not None and not isinstance(tensor, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor is not None and (tensor.dim() != 2 or not tensor.dtype.is_floating_point):
                raise ValueError(f"{name} must be a 2-D floating-point tensor, got "
                                 f"{tuple(tensor.shape)} {tensor.dtype}")  # fmt: skip
        self.keys, self.values = local_keys, local_values
        self.group = group
        self.gatherer = ProcessGroupGather(group)
        self.rank = dist.get_rank(group)
        self.world_size = self.gatherer.size
        self.candidates = candidates
        self._collective_device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        rows = local_keys.shape[0]
        value_dim = -1 if local_values is None else local_values.shape[1]
        value_rows = rows if local_values is None else local_values.shape[0]
        layout = self._gather_ints([rows, local_keys.shape[1], value_dim, value_rows])
        sizes = [int(entry[0]) for entry in layout]
        shapes = {tuple(int(n) for n in entry[1:3]) for entry in layout}
        if len(shapes) != 1:
            raise ValueError(f"local_keys/local_values: every rank must hold the same (d, dv), "
                             f"got {sorted(shapes)} across ranks")  # fmt: skip
        if any(int(entry[0]) != int(entry[3]) for entry in layout):
            raise ValueError("local_values must have one row per local key on every rank")
        if min(sizes) < 1:
            raise ValueError(f"local_keys: every rank must hold at least one memory, got shard "
                             f"sizes {sizes}")  # fmt: skip
        self.shard_sizes = sizes
        self.offset = sum(sizes[: self.rank])
        self.num_memories = sum(sizes)

    def __len__(self) -> int:
        """Memories over all ranks."""
        return self.num_memories

    def _gather_ints(self, numbers: list[int]) -> list[Tensor]:
        local = torch.tensor(numbers, dtype=torch.long, device=self._collective_device)
        return [t.cpu() for t in self.gatherer.gather(local)]

    def _shard_finite(self) -> bool:
        if self.bank is not None:
            return self.bank.all_finite()
        return all(all_finite(t) for t in (self.keys, self.values) if t is not None)

    def retrieve(self, queries: Tensor, *, beta: float = 1.0, similarity: str = "dot",
                 separation: str = "softmax", alpha: float = 1.5, degree: float = 10,
                 steps: int = 1, tol: float | None = None, clamp_mask: Tensor | None = None,
                 score_mask: Tensor | None = None, backend: str = "auto",
                 return_info: bool = False, check_finite: bool = True,
                 memory_cap: int | None = None):  # fmt: skip
        """:func:`hen_fast.retrieve` over the whole sharded bank; a collective (call it on every
        rank with the same arguments). ``info.argmax`` indexes the whole bank. ``memory_cap``
        streams this rank's shard in chunks of at most that many bytes."""
        args = check_arguments(
            queries, self.keys, self.values, beta=beta, similarity=similarity,
            separation=separation, alpha=alpha, degree=degree, steps=steps, tol=tol,
            clamp_mask=clamp_mask, score_mask=score_mask, return_info=return_info,
            check_finite=False, memory_cap=memory_cap,
        )  # fmt: skip
        if check_finite:
            flags = self._gather_ints([int(self._shard_finite()), int(all_finite(queries))])
            if not all(int(flag[1]) for flag in flags):
                raise ValueError("queries contains NaN or Inf (on some rank); clean the input "
                                 "or pass check_finite=False to skip this check")  # fmt: skip
            bad = [rank for rank, flag in enumerate(flags) if not int(flag[0])]
            if bad:
                raise ValueError(f"memories contain NaN or Inf in the shard of rank(s) {bad}; "
                                 "clean them or pass check_finite=False")  # fmt: skip
        keys, values = self.keys, self.values
        norms = None
        if similarity == "l2":
            norms = self._norms if self._norms is not None else cached_sq_norms(keys)
        chunk_rows = keys.shape[0]
        if memory_cap is not None:
            chunk_rows = chunk_rows_for(memory_cap, keys, values, norms is not None, buffers=1)
        source = ChunkSource(keys, values, norms, chunk_rows=chunk_rows, device=queries.device,
                             offset=self.offset, num_memories=self.num_memories,
                             desc=f"shard {self.rank}")  # fmt: skip
        return driver.run(
            args, source, backend=backend, group=self.gatherer, candidates=self.candidates
        )
