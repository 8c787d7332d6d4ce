"""U-Hop Stage I: learn the feature map ``Phi(x) = W x`` by minimising the separation loss.

Normalisation (the choices that make U-Hop work on images):

* Stage I computes the separation loss on unit-norm features ``W x / ||W x||`` (``normalize=True``;
  Appendix D.2 assumes unit-norm features). On raw ``W x`` of pixel images the distances are large,
  the gradient at lr 1 is huge and SGD diverges within a few steps (measured on MNIST).
* After training, W's rows are scaled to unit norm (Algorithm 1, line 4) and Stage II uses
  ``Phi(x) = W x`` itself: its scores scale with the patterns like the dot product's, so the
  paper's beta = 1 means what it means for plain MHM. Comparing unit-norm features in Stage II
  (``normalize_output=True``) bounds every score to [-1, 1]; at beta = 1 the weights are then
  nearly uniform and the output is close to the mean memory (MNIST, M = 100: sum-of-squares error
  50 against 0.61 for ``W x``), so that variant needs a beta of tens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_int, check_point_set, check_positive
from .loss import SEPARATION_REDUCTIONS, separation_loss

OPTIMIZERS = ("sgd", "adam")


class FeatureMap(nn.Module):
    """``Phi(x) = W x`` with ``W`` of shape ``(out_dim, in_dim)``, then ``Phi(x) / ||Phi(x)||``
    when ``normalize``. ``loss_history`` holds the separation loss at each Stage I step and
    ``final_loss`` that of the returned map (after W's rows were normalised)."""

    def __init__(self, weight: Tensor, normalize: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.normalize = bool(normalize)
        self.loss_history: list[float] = []
        self.final_loss: float | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"the feature map takes inputs of dimension {self.in_features}, got shape "
                f"{tuple(x.shape)}"
            )
        features = F.linear(x.to(self.weight.dtype), self.weight)
        return F.normalize(features, dim=-1) if self.normalize else features

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, normalize={self.normalize}"


def fit_feature_map(
    memories: Tensor,
    t: float = 2.0,
    steps: int = 100,
    lr: float = 1.0,
    out_dim: int | None = None,
    optimizer: str = "sgd",
    loss: str = "average",
    *,
    normalize: bool = True,
    normalize_output: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    progress: bool | None = None,
    callback=None,
) -> FeatureMap:
    """Stage I of U-Hop (Algorithm 1, lines 1-4): a feature map that separates ``memories``.

    Args:
        memories: the stored patterns ``(M, d)``, ``M >= 2``.
        t: the separation loss's kernel scale, ``> 0`` (the paper uses 2).
        steps: optimiser steps N, ``>= 0`` (0 keeps the random map, rows normalised).
        lr: learning rate, ``> 0`` (the paper's SGD uses 1).
        out_dim: rows of W (default d).
        optimizer: ``"sgd"`` or ``"adam"``.
        loss: ``"average"`` (Definition 2.2) or ``"max"`` (Appendix G.2).
        normalize: compute the loss on unit-norm features ``W x / ||W x||``.
        normalize_output: the returned map gives unit-norm features too (default: ``W x``).
        generator: for W's random Gaussian start (entries N(0, 1/d): full rank almost surely).
        backend: the separation loss's backend (see :func:`hen_fast.uhop.separation_loss`).
        progress: show a tqdm bar (None: only on a terminal).
        callback: called as ``callback(step, weight)`` after each step (1-based), e.g. to
            evaluate W at several N in one run; ``weight`` is the live (unnormalised) W.

    Returns:
        a :class:`FeatureMap` on the memories' device (float64 for float64 memories, else float32).
    """
    check_point_set("memories", memories, shape="(M, d)", pairs="patterns to separate")
    steps = check_int("steps", steps, minimum=0)
    lr = check_positive("lr", lr)
    check_positive("t", t)
    dim = memories.shape[1]
    out_dim = dim if out_dim is None else check_int("out_dim", out_dim, minimum=1)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if loss not in SEPARATION_REDUCTIONS:
        raise ValueError(f"loss must be one of {SEPARATION_REDUCTIONS}, got {loss!r}")
    from tqdm import tqdm

    dtype = torch.float64 if memories.dtype == torch.float64 else torch.float32
    data = memories.detach().to(dtype)
    weight = torch.randn(out_dim, dim, generator=generator, dtype=dtype).div_(math.sqrt(dim))
    feature_map = FeatureMap(weight.to(memories.device), normalize=normalize)
    params = [feature_map.weight]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    bar = tqdm(
        range(steps), desc="U-Hop Stage I", disable=None if progress is None else not progress
    )
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        value = separation_loss(feature_map(data), t, loss, backend=backend)
        value.backward()
        opt.step()
        value = float(value.detach())
        feature_map.loss_history.append(value)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if not bool(torch.isfinite(feature_map.weight).all()):
            raise FloatingPointError(
                f"Stage I diverged at step {len(feature_map.loss_history)} (W is no longer "
                f"finite); lower lr or train on normalised features (normalize=True)"
            )
        if callback is not None:
            callback(len(feature_map.loss_history), feature_map.weight.detach())
    with torch.no_grad():
        # Algorithm 1, line 4; a zero row (never seen in practice) is left as it is.
        norms = torch.linalg.vector_norm(feature_map.weight, dim=1, keepdim=True)
        feature_map.weight.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
        feature_map.final_loss = float(separation_loss(feature_map(data), t, loss, backend=backend))
    feature_map.normalize = bool(normalize_output)
    feature_map.weight.requires_grad_(False)
    return feature_map
