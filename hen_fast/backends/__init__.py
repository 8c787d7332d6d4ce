"""Backend registry: one ``retrieve`` contract, several implementations.

A backend is a function with the signature of :func:`~hen_fast.backends.torch_backend.retrieve`
restricted to the
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
class Request:
    """What a backend is asked to compute on, for :attr:`Backend.check`."""

    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    needs_grad: bool
    # The problem, for rules that pick a backend by shape (None: unknown, e.g. a device probe).
    num_queries: int | None = None
    num_memories: int | None = None
    similarity: str | None = None
    separation: str | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    retrieve: Callable
    priority: int = 0
    # Called on first use, never at import: may import optional packages or load an extension.
    is_available: Callable[[], bool] = lambda: True
    # Why is_available() said no (e.g. the extension's load error), or None: named in the error.
    unavailable_reason: Callable[[], str | None] = lambda: None
    # Why the backend cannot compute this request (wrong device, dtype, autograd), or None.
    check: Callable[[Request], str | None] = lambda request: None
    # Device types on which "auto" may pick it; None: wherever check() accepts the request.
    auto_device_types: tuple[str, ...] | None = None
    # Why "auto" should leave a request it can compute to a lower-priority backend (a measured
    # speed rule), or None.
    auto_check: Callable[[Request], str | None] = lambda request: None
    # Why torch.compile cannot capture its computation of this request in one graph (it branches
    # on tensor data), or None: under compile "auto" prefers a backend that can.
    compile_check: Callable[[Request], str | None] = lambda request: None
    hint: str = ""

    def refusal(self, request: Request, *, auto: bool = False, speed: bool = True) -> str | None:
        """Why it cannot (or, with ``auto``, should not) compute ``request``; ``speed=False``
        leaves out the auto speed rule."""
        if auto and self.auto_device_types is not None:
            if request.device.type not in self.auto_device_types:
                return f"auto does not pick it for {request.device.type} tensors"
        return self.check(request) or (self.auto_check(request) if auto and speed else None)


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
    """Backends that can run here, best first; with ``device``, those ``auto`` may pick for
    float32 inputs on it."""
    ready = [b for b in _REGISTRY.values() if b.is_available()]
    if device is not None:
        request = Request(torch.device(device), (torch.float32,), needs_grad=False)
        ready = [b for b in ready if b.refusal(request, auto=True) is None]
    return tuple(b.name for b in sorted(ready, key=lambda b: -b.priority))


def constant_under_compile(fn: Callable) -> Callable:
    """Marks ``fn`` as :func:`torch.compiler.assume_constant_result` does: when dynamo traces a
    call to it, it calls it once and keeps the answer as a constant. Set here directly because
    that decorator imports torch._dynamo, which imports triton: too slow for ``import hen_fast``
    (tests/test_compile.py checks that the decorator still sets this attribute)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def _is_available(name: str) -> bool:
    """``is_available()`` of a registered backend, as ``torch.compile`` sees it: called once while
    tracing and kept as a constant (the probes load extensions and import packages, which dynamo
    cannot trace, and their answers do not change within a process)."""
    return _REGISTRY[name].is_available()


@constant_under_compile  # its probe, like _is_available's, does not trace
def _unavailable_message(name: str) -> str:
    backend = _REGISTRY[name]
    reason = backend.unavailable_reason()
    reason = f": {reason}" if reason else ""
    return f"backend {name!r} is not available here{reason}. {backend.hint}".rstrip()


def select_backend(name: str, request: Request) -> Backend:
    """The backend ``name`` (or the best one for the request when ``name == "auto"``)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        ranked = sorted(_REGISTRY.values(), key=lambda b: -b.priority)
        if torch.compiler.is_compiling():
            # A backend that compiles to one graph comes first, before the speed rules: with
            # fullgraph=True a graph break is an error, and otherwise it splits the graph.
            for speed in (True, False):
                for candidate in ranked:
                    if (
                        candidate.refusal(request, auto=True, speed=speed) is None
                        and candidate.compile_check(request) is None
                        and _is_available(candidate.name)
                    ):
                        return candidate
        for candidate in ranked:
            if candidate.refusal(request, auto=True) is None and _is_available(candidate.name):
                return candidate
        raise BackendUnavailableError(f"no backend can compute {request}")  # torch always can
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {registered_backends()}, got {name!r}")
    backend = _REGISTRY[name]
    if not _is_available(name):
        raise BackendUnavailableError(_unavailable_message(name))
    reason = backend.refusal(request)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {name!r} cannot compute this call: {reason}. {backend.hint}".rstrip()
        )
    return backend


def _torch_compile_check(request: Request) -> str | None:
    """The torch backend's sparse thresholds branch on tensor data: rows whose support outgrows
    the candidate buffer are finished by Newton passes, and Newton stops on convergence. Under
    torch.compile those are graph breaks (its softmax and polynomial steps trace whole)."""
    if request.separation in ("sparsemax", "entmax"):
        return "its sparse thresholds branch on tensor data (graph breaks under torch.compile)"
    return None


def _register_builtin() -> None:
    from . import torch_backend

    register_backend(
        Backend(
            name="torch",
            retrieve=torch_backend.retrieve,
            priority=0,
            compile_check=_torch_compile_check,
            hint="It is pure PyTorch and always available.",
        )
    )
    from .cpu import BACKEND as cpu_backend
    from .triton import BACKEND as triton_backend

    register_backend(cpu_backend)
    register_backend(triton_backend)
    from .cuda import BACKEND as cuda_backend  # by name only until measured on a GPU (issue 7)

    register_backend(cuda_backend)


_register_builtin()
