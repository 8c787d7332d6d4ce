"""Argument checks shared by U-Hop's modules (Stage I, the separation loss, retrieval, the layer):
each raises a TypeError or ValueError that names the argument, what it got and what was expected.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive(name: str, value) -> float:
    """A finite real number > 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_point_set(name: str, tensor, *, shape: str, pairs: str, dtypes=None) -> None:
    """A 2-D floating-point tensor (of one of ``dtypes`` when given) with at least two rows: the
    loss and Stage I compare pairs of rows. ``shape`` names the axes in the message (e.g.
    ``"(M, d)"``) and ``pairs`` says why two rows are needed."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point() if dtypes is None else tensor.dtype in dtypes):
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 {pairs}, got {tensor.shape[0]}")
