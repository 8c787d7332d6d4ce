"""The kernelized Hopfield layer of U-Hop (Section 3) and Algorithm 2's alternating training.

``U-Hop(Xi, x) = Sep(beta <W_K Phi(Xi), W_Q Phi(x)>) W_V Xi``: queries and memories pass through
the U-Hop feature map ``Phi`` (normalised ``W x``, trained by the separation loss), then the
layer's query and key projections; values are a projection of the raw memories. One memory set
(2-D inputs), or a batch whose per-sample banks are large, retrieves through
:func:`hen_fast.retrieve`, so forward and backward use the fused kernels (the ``cpu`` and
``triton`` backends differentiate queries, keys and values). A batch of samples that each bring a
small bank (3-D inputs, at most ``batched_max_memories`` memories per sample, e.g. an image's 16
patches) is scored by one batched matmul instead and separated exactly on the (N, B, M) scores with
torch autograd: one fused call per sample would cost a kernel launch and its fixed overhead for a
few dozen scores.

The paper writes the values as ``W_V W_K Xi``, a product of two linear maps of the memories; when
``Phi`` changes the dimension, ``W_K`` (which acts on ``Phi(Xi)``) cannot act on ``Xi``, so the
layer learns one value projection ``W_V`` of the memories, which spans the same maps.

The deep-learning separation loss (Definition 3.1) is
``log mean_{u != v} exp(2t (K(u, v)^2 - 1))`` with ``K(u, v) = <Phi(u), Phi(v)>`` over unit-norm
features. With ``psi(u) = Phi(u) Phi(u)^T`` flattened (unit norm too), ``||psi(u) - psi(v)||^2 =
2 - 2 K(u, v)^2``, so it is :func:`hen_fast.uhop.separation_loss` of ``psi``: the fused, tiled loss
with its O(M D^2) memory, never M x M.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import numerics
from ..backends import torch_backend
from .checks import check_int, check_positive
from .feature_map import FeatureMap
from .loss import separation_loss

LAYER_SEPARATIONS = ("softmax", "sparsemax", "entmax")
# 3-D inputs whose per-sample banks hold at most this many memories take the batched path: a few
# hundred scores per query are cheaper in one batched matmul than in one fused call per sample.
BATCHED_MAX_MEMORIES = 256


class UHopHopfieldLayer(nn.Module):
    """``Sep(beta <W_K Phi(Xi), W_Q Phi(x)>) W_V Xi`` with a trainable U-Hop feature map.

    Args:
        in_dim: dimension d of queries and memories.
        hidden_dim: dimension of the projected queries and keys (default ``feature_dim``).
        out_dim: dimension of the output (default ``in_dim``).
        feature_dim: output dimension of ``Phi`` (default ``in_dim``).
        beta: inverse temperature, ``> 0``.
        separation: ``"softmax"`` (modern Hopfield), ``"sparsemax"`` (sparse Hopfield) or
            ``"entmax"`` (generalized sparse Hopfield, parameter ``alpha`` in (1, 2)).
        t: the separation loss's scale, ``> 0``.
        uhop: False gives the plain Hopfield layer (``Phi`` the identity, no separation loss),
            the baseline the paper compares against.
        backend: :func:`hen_fast.retrieve`'s backend (2-D inputs and large per-sample banks).
        batched_max_memories: 3-D inputs with at most this many memories per sample take the
            batched path (one batched matmul, exact separation, torch autograd); larger banks
            run one fused :func:`hen_fast.retrieve` call per sample. 0 always takes the fused path.
        generator: seeds the initial weights.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        *,
        feature_dim: int | None = None,
        beta: float = 1.0,
        separation: str = "softmax",
        alpha: float = 1.5,
        t: float = 2.0,
        uhop: bool = True,
        backend: str = "auto",
        batched_max_memories: int = BATCHED_MAX_MEMORIES,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        in_dim = check_int("in_dim", in_dim)
        feature_dim = in_dim if feature_dim is None or not uhop else feature_dim
        feature_dim = check_int("feature_dim", feature_dim)
        hidden_dim = check_int("hidden_dim", feature_dim if hidden_dim is None else hidden_dim)
        out_dim = check_int("out_dim", in_dim if out_dim is None else out_dim)
        if separation not in LAYER_SEPARATIONS:
            raise ValueError(f"separation must be one of {LAYER_SEPARATIONS}, got {separation!r}")
        if separation == "entmax" and not 1.0 < float(alpha) < 2.0:
            raise ValueError(f"alpha must lie in (1, 2) for entmax, got {alpha}")
        self.beta = check_positive("beta", beta)
        self.t = check_positive("t", t)
        self.separation, self.alpha, self.backend, self.uhop = (
            separation,
            float(alpha),
            backend,
            uhop,
        )

        def init(rows, cols):
            return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)

        self.feature_map = FeatureMap(init(feature_dim, in_dim), normalize=True) if uhop else None
        self.query_proj = nn.Parameter(init(hidden_dim, feature_dim))  # W_Q
        self.key_proj = nn.Parameter(init(hidden_dim, feature_dim))  # W_K
        self.value_proj = nn.Parameter(init(out_dim, in_dim))  # W_V
        self.in_dim = in_dim
        self.batched_max_memories = check_int(
            "batched_max_memories", batched_max_memories, minimum=0
        )

    def features(self, x: Tensor) -> Tensor:
        """``Phi(x)``: the trained, normalised map, or x itself without U-Hop."""
        return x if self.feature_map is None else self.feature_map(x)

    def forward(self, queries: Tensor, memories: Tensor) -> Tensor:
        """``queries`` (B, d) against one memory set ``memories`` (M, d) gives (B, out_dim);
        ``queries`` (N, B, d) and ``memories`` (N, M, d) retrieve sample n's queries from
        sample n's memories and give (N, B, out_dim): in one batched pass when each bank holds at
        most ``batched_max_memories`` memories, else one fused call per sample."""
        _check_input("queries", queries, self.in_dim)
        _check_input("memories", memories, self.in_dim)
        if queries.dim() != memories.dim():
            raise ValueError(
                f"queries and memories must both be 2-D (one memory set) or both 3-D (one per "
                f"sample), got shapes {tuple(queries.shape)} and {tuple(memories.shape)}"
            )
        if queries.dim() == 3:
            if queries.shape[0] != memories.shape[0]:
                raise ValueError(
                    f"queries and memories must hold the same number of samples, got "
                    f"{queries.shape[0]} and {memories.shape[0]}"
                )
            if memories.shape[1] > self.batched_max_memories:
                return torch.stack([self(q, m) for q, m in zip(queries, memories)])
        projected_queries = self.features(queries) @ self.query_proj.T
        keys = self.features(memories) @ self.key_proj.T
        values = memories @ self.value_proj.T
        settings = dict(beta=self.beta, separation=self.separation, alpha=self.alpha)
        if queries.dim() == 3:
            return batched_retrieve(projected_queries, keys, values, **settings)
        from .. import retrieve

        return retrieve(projected_queries, keys, values, backend=self.backend, **settings)

    def separation_loss(self, memories: Tensor) -> Tensor:
        """Definition 3.1 over the rows of ``memories`` ((M, d), or (N, M, d) pooled into one
        set); differentiable in the feature map. Raises without U-Hop."""
        if self.feature_map is None:
            raise ValueError("this layer was built with uhop=False: it has no feature map")
        _check_input("memories", memories, self.in_dim)
        phi = self.features(memories.reshape(-1, self.in_dim))
        if phi.shape[0] < 2:
            raise ValueError(f"memories must hold at least 2 rows, got {phi.shape[0]}")
        squares = (phi[:, :, None] * phi[:, None, :]).flatten(1)
        return separation_loss(squares, self.t)

    def kernel_parameters(self) -> list[nn.Parameter]:
        """Stage I's parameters (theta): the feature map's."""
        return [] if self.feature_map is None else list(self.feature_map.parameters())


def batched_retrieve(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    beta: float = 1.0,
    separation: str = "softmax",
    alpha: float = 1.5,
) -> Tensor:
    """``Sep(beta q k^T) v`` for every sample n of ``queries`` (N, B, h) against its own ``keys``
    (N, M, h) and ``values`` (N, M, dv); returns (N, B, dv), differentiable by torch autograd.

    Exact like :func:`hen_fast.backends.torch_backend.retrieve` with one step and dot similarity,
    sample by
    sample: the same float64 thresholds, the same threshold derivative. Meant for small banks (it
    holds the (N, B, M) scores); samples go in groups of about ``torch_backend.DENSE_MAX_SCORES``
    scores.
    """
    per_sample = queries.shape[1] * keys.shape[1]
    group = max(1, torch_backend.DENSE_MAX_SCORES // max(per_sample, 1))
    if queries.shape[0] > group:
        return torch.cat(
            [
                batched_retrieve(
                    queries[n : n + group],
                    keys[n : n + group],
                    values[n : n + group],
                    beta=beta,
                    separation=separation,
                    alpha=alpha,
                )
                for n in range(0, queries.shape[0], group)
            ]
        )
    dtype = numerics.accumulation_dtype(queries, keys, values)
    scores = beta * torch.bmm(queries.to(dtype), keys.to(dtype).transpose(1, 2))
    if separation == "softmax":
        weights = torch.softmax(scores, dim=-1)
    else:
        weights = _sparse_weights(scores, numerics.separation_alpha(separation, alpha))
    return torch.bmm(weights, values.to(dtype)).to(queries.dtype)


def _sparse_weights(scores: Tensor, alpha: float) -> Tensor:
    """alpha-entmax over the last dimension of ``scores``, differentiable.

    The threshold tau comes from :mod:`hen_fast.numerics`' exact solvers on float64 sorted rows
    (closed forms for sparsemax and alpha 1.5, Newton otherwise). For autograd tau moves with the
    scores as the torch backend's sparse step has it: ``sum_i g_i (dx_i - dtau) = 0`` with
    ``g = dp/dx``, so ``dtau = sum_i g_i dx_i / sum_i g_i``; ``tau_shift`` (value 0) carries that
    derivative and the weights are corrected to first order, ``p(tau + s) = p(tau) - g s``.
    """
    shape = scores.shape
    x = (alpha - 1.0) * scores.reshape(-1, shape[-1])
    x_sorted = x.detach().double().sort(dim=1, descending=True).values
    if alpha in (1.5, 2.0):
        tau = numerics.sorted_threshold(x_sorted, alpha)
    else:
        tau = numerics.newton_threshold(
            numerics.row_sums(x_sorted, 1.0 / (alpha - 1.0)),
            x_sorted[:, 0],
            x_sorted[:, 0] - 1.0,
            alpha,
        )
    q = 1.0 / (alpha - 1.0)
    excess = torch.relu(x - tau.to(x.dtype)[:, None])
    p = numerics.power(excess, q)
    if x.requires_grad:
        slope = excess.detach()
        g = (slope > 0).to(x.dtype) if q == 1.0 else q * numerics.power(slope, q - 1.0)
        tau_shift = (g * (x - x.detach())).sum(dim=1, keepdim=True) / g.sum(dim=1, keepdim=True)
        p = p - g * tau_shift
    # Dividing by the total makes the weights sum to 1 to rounding whatever tau's last bit.
    return (p / p.sum(dim=1, keepdim=True)).reshape(shape)


def fit_uhop(
    model: nn.Module,
    layer: UHopHopfieldLayer,
    inputs: Tensor,
    targets: Tensor,
    objective: Callable[[Tensor, Tensor], Tensor],
    memories_of: Callable[[Tensor], Tensor],
    *,
    epochs: int = 1,
    inner_steps: int = 1,
    batch_size: int = 64,
    kernel_batch_size: int | None = None,
    kernel_lr: float = 0.1,
    model_lr: float = 1e-3,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Algorithm 2: alternate ``inner_steps`` SGD steps of Stage I (the layer's separation loss on
    the memories of a minibatch, ``memories_of(x)``, updating the feature map only) with one Adam
    step of ``objective(model(x), y)`` on every other parameter of ``model``.

    A layer without U-Hop trains the same way minus the inner steps, so the two compare fairly.
    ``epochs`` passes of ``batch_size`` over the data set the number of outer steps. Returns the
    history of both losses (``"separation"`` one entry per inner step, ``"objective"`` per outer).
    ``after_epoch(epoch)`` (0-based), if given, runs after each epoch's steps (e.g. to measure
    accuracy; the model is back in training mode after it).
    """
    from tqdm.auto import tqdm

    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs and targets must hold the same, non-zero number of samples, got "
            f"{inputs.shape[0]} and {targets.shape[0]}"
        )
    epochs = check_int("epochs", epochs)
    inner_steps = check_int("inner_steps", inner_steps, minimum=0)
    batch_size = check_int("batch_size", batch_size)
    kernel_batch_size = check_int("kernel_batch_size", kernel_batch_size or batch_size)
    kernel = layer.kernel_parameters()
    kernel_ids = {id(p) for p in kernel}
    rest = [p for p in model.parameters() if id(p) not in kernel_ids]
    kernel_opt = (
        torch.optim.SGD(kernel, lr=check_positive("kernel_lr", kernel_lr)) if kernel else None
    )
    model_opt = torch.optim.Adam(rest, lr=check_positive("model_lr", model_lr))
    history: dict[str, list[float]] = {"separation": [], "objective": []}
    count = inputs.shape[0]
    per_epoch = -(-count // batch_size)
    steps = epochs * per_epoch
    model.train()
    for step in tqdm(
        range(steps), desc="U-Hop training", disable=None if progress is None else not progress
    ):
        for _ in range(inner_steps if kernel_opt is not None else 0):
            batch = torch.randint(count, (min(kernel_batch_size, count),), generator=generator)
            loss = layer.separation_loss(memories_of(inputs[batch]))
            kernel_opt.zero_grad()
            loss.backward()
            kernel_opt.step()
            history["separation"].append(float(loss.detach()))
        batch = torch.randint(count, (min(batch_size, count),), generator=generator)
        loss = objective(model(inputs[batch]), targets[batch])
        model_opt.zero_grad()
        if kernel_opt is not None:
            kernel_opt.zero_grad()
        loss.backward()
        model_opt.step()
        history["objective"].append(float(loss.detach()))
        if after_epoch is not None and (step + 1) % per_epoch == 0:
            after_epoch((step + 1) // per_epoch - 1)
            model.train()
    return history


def _check_input(name: str, tensor, dim: int) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() not in (2, 3) or tensor.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (M, {dim}) or (N, M, {dim}), got "
                         f"{tuple(tensor.shape)}")  # fmt: skip
