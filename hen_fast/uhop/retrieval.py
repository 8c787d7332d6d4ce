"""U-Hop Stage II: Hopfield retrieval in the learnt kernel space.

``T_K(x) = Xi Sep(beta K(Xi, x))`` with ``K(u, v) = <Phi u, Phi v>``: keys ``Phi(memories)``,
queries ``Phi(x)``, values the memories themselves, through :func:`hen_fast.retrieve` (so every
backend and separation serves U-Hop too). The projected bank is cached per feature map and is
recomputed when the memories or the map's parameters change (in place or by rebinding).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..api import retrieve as hopfield_retrieve
from .checks import check_int

# feature map -> (weakref to the memories, their version, the parameters' versions, keys)
_KEY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def retrieve(
    queries: Tensor,
    memories: Tensor,
    feature_map,
    beta: float = 1.0,
    separation: str = "softmax",
    alpha: float = 1.5,
    steps: int = 1,
    backend: str = "auto",
) -> Tensor:
    """U-Hop retrieval (Algorithm 1, lines 5-8): ``steps`` updates of ``x <- T_K(x)``.

    Args:
        queries: ``(B, d)`` or ``(d,)``, in the memories' space.
        memories: ``(M, d)``, the stored patterns (the values retrieved).
        feature_map: a callable ``(N, d) -> (N, D)``, e.g. from :func:`fit_feature_map`.
        beta, separation, alpha, backend: as :func:`hen_fast.retrieve` (dot similarity on the
            features; ``"polynomial"`` works too).
        steps: updates, ``>= 1``; each re-projects the current state through ``feature_map``.

    Returns:
        ``(B, d)`` (or ``(d,)``) in the queries' dtype.
    """
    if not callable(feature_map):
        raise TypeError(f"feature_map must be callable, got {type(feature_map).__name__}")
    for name, tensor in (("queries", queries), ("memories", memories)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if memories.dim() != 2 or memories.shape[0] == 0:
        raise ValueError(
            f"memories must have shape (M, d) with M >= 1, got {tuple(memories.shape)}"
        )
    if queries.dim() not in (1, 2) or queries.shape[-1] != memories.shape[1]:
        raise ValueError(
            f"queries must have shape (B, {memories.shape[1]}) or ({memories.shape[1]},) like the "
            f"memories, got {tuple(queries.shape)}"
        )
    expected = getattr(feature_map, "in_features", None)
    if expected is not None and expected != memories.shape[1]:
        raise ValueError(
            f"feature_map takes inputs of dimension {expected}, but the memories have "
            f"dimension {memories.shape[1]}"
        )
    steps = check_int("steps", steps, minimum=1)
    keys = projected_bank(memories, feature_map)
    state = queries
    for _ in range(steps):
        state = hopfield_retrieve(
            feature_map(state).to(keys.dtype),
            keys,
            memories,
            beta=beta,
            similarity="dot",
            separation=separation,
            alpha=alpha,
            backend=backend,
        )
    return state.to(queries.dtype)


def projected_bank(memories: Tensor, feature_map) -> Tensor:
    """``feature_map(memories)``, cached while neither the memories nor the map's parameters
    change. Under autograd with trainable parameters nothing is cached (the graph is needed)."""
    params = list(feature_map.parameters()) if hasattr(feature_map, "parameters") else []
    if torch.is_grad_enabled() and (memories.requires_grad or any(p.requires_grad for p in params)):
        return feature_map(memories)
    versions = tuple((p.data_ptr(), p._version) for p in params)
    try:
        cached = _KEY_CACHE.get(feature_map)
    except TypeError:  # not weak-referenceable: no caching
        return feature_map(memories)
    if cached is not None:
        bank_ref, bank_version, param_versions, keys = cached
        if (
            bank_ref() is memories
            and bank_version == memories._version
            and param_versions == versions
        ):
            return keys
    with torch.no_grad():
        keys = feature_map(memories)
    _KEY_CACHE[feature_map] = (weakref.ref(memories), memories._version, versions, keys)
    return keys
