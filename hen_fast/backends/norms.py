"""Bank norms that l2 needs beside the bank, computed once per bank."""

from __future__ import annotations

import weakref

import torch

_NORMS_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def cached_sq_norms(keys: torch.Tensor) -> torch.Tensor:
    """float32 ``||k||^2`` of a bank, computed once per bank: kept while the bank tensor lives and
    recomputed when it is modified in place (its version counter moves)."""
    entry = _NORMS_CACHE.get(id(keys))
    if entry is not None and entry[0]() is keys and entry[1] == keys._version:
        return entry[2]
    return remember_sq_norms(keys, sq_norms(keys))


def sq_norms(keys: torch.Tensor) -> torch.Tensor:
    """float32 ``||k||^2`` of every row, the one formula every backend's cached norms come from."""
    return keys.float().pow(2).sum(dim=1)


def remember_sq_norms(keys: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Registers norms that are already known (a :class:`~hen_fast.MemoryBank` keeps them; a
    streamed chunk slices them), so that no backend computes them again for this tensor."""
    _NORMS_CACHE[id(keys)] = (weakref.ref(keys), keys._version, norms)
    weakref.finalize(keys, _NORMS_CACHE.pop, id(keys), None)
    return norms
