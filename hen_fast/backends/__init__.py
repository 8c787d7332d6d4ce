"""Backend registry: one ``retrieve`` contract, several implementations.

A backend is a function with the signature of :func:`hen_fast.reference.retrieve` restricted to the
keyword arguments of :func:`hen_fast.retrieve` (validated 2-D inputs in, ``(out, info)`` out), plus
an availability probe that is called lazily (never at import) and a hint that tells the user how to
get it. ``backend="auto"`` takes the available backend of highest priority that accepts the
request's device; asking for one by name that is missing raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class BackendUnavailableError(ValueError):
    """A backend asked for by name cannot run here (not installed, not built, or wrong device)."""


@dataclass(frozen=True)
class Backend:
    name: str
    retrieve: Callable
    priority: int = 0
    # Called on first use, never at import: may import optional packages or load an extension.
    is_available: Callable[[], bool] = lambda: True
    # Which devices' tensors the backend computes on ("cpu", "cuda", ...); None: any.
    device_types: tuple[str, ...] | None = None
    hint: str = ""

    def accepts(self, device: torch.device) -> bool:
        return self.device_types is None or device.type in self.device_types


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Adds (or replaces) a backend under its name."""
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> Backend:
    """Removes a backend and returns it (KeyError if there is none by that name)."""
    return _REGISTRY.pop(name)


def registered_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def available_backends(device: torch.device | str | None = None) -> tuple[str, ...]:
    """Backends that can run here (on ``device``'s tensors, if given), best first."""
    device = None if device is None else torch.device(device)
    ready = [
        b for b in _REGISTRY.values() if (device is None or b.accepts(device)) and b.is_available()
    ]
    return tuple(b.name for b in sorted(ready, key=lambda b: -b.priority))


def select_backend(name: str, device: torch.device) -> Backend:
    """The backend ``name`` (or the best one for ``device`` when ``name == "auto"``)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        choices = available_backends(device)
        if not choices:  # unreachable while the torch backend is registered
            raise BackendUnavailableError(f"no backend can compute on {device}")
        return _REGISTRY[choices[0]]
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {registered_backends()}, got {name!r}")
    backend = _REGISTRY[name]
    if not backend.accepts(device):
        raise BackendUnavailableError(
            f"backend {name!r} computes on {backend.device_types} tensors, but the inputs are on "
            f"{device}. {backend.hint}".rstrip()
        )
    if not backend.is_available():
        raise BackendUnavailableError(
            f"backend {name!r} is not available here. {backend.hint}".rstrip()
        )
    return backend


def _register_builtin() -> None:
    from .. import reference

    register_backend(
        Backend(
            name="torch",
            retrieve=reference.retrieve,
            priority=0,
            hint="It is pure PyTorch and always available.",
        )
    )


_register_builtin()
