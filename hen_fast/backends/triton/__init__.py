"""The ``triton`` backend: fused Triton kernels (see retrieve.py). Registering it imports nothing;
triton is imported when the backend is first used."""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import Backend, Request

HINT = (
    "It needs the triton package (pip install triton) and a CUDA GPU, or TRITON_INTERPRET=1 "
    "to run its kernels, slowly, on the CPU."
)


def is_available() -> bool:
    """triton is installed and something can run it: a CUDA GPU or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return _interpreting() or torch.cuda.is_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(request: Request) -> str | None:
    if request.device.type != "cuda" and not (request.device.type == "cpu" and _interpreting()):
        return f"it computes on CUDA tensors, got {request.device}"
    if torch.float64 in request.dtypes:
        return "it computes float16, bfloat16 and float32 inputs, not float64"
    return None


def retrieve(*args, **kwargs):
    from .retrieve import retrieve as triton_retrieve

    return triton_retrieve(*args, **kwargs)


BACKEND = Backend(name="triton", retrieve=retrieve, priority=20, is_available=is_available,
                  check=check, auto_device_types=("cuda",), hint=HINT)  # fmt: skip
