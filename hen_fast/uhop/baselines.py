"""The baselines U-Hop is compared with, through U-Hop's retrieval signature (no feature map).

Each is :func:`hen_fast.retrieve` with the papers' mathematics: ``beta`` multiplies the scores
(logits); distance similarities are negative distances (``l2``: ``-||x - k||^2``, ``manhattan``:
``-||x - k||_1``), so the nearest memory scores highest.

Where the U-Hop authors' public code differs (their results are not reproduced bit for bit):

* it scores ``l2``/``manhattan`` with the distance's positive sign (weighting the farthest memories
  most) -- here the sign of the papers (Millidge et al. 2022);
* it multiplies the output, not the logits, by ``beta`` -- here the logits;
* its masked queries come from dropout, which scales the kept pixels by ``1 / (1 - p)`` (2 at 50%)
  -- here masked pixels are zeroed and kept ones unchanged;
* it normalises the feature rows ``Phi(x) / ||Phi(x)||`` instead of W's rows (Algorithm 1, line 4)
  -- here both (see :mod:`hen_fast.uhop.feature_map`).
"""

from __future__ import annotations

from torch import Tensor

from ..api import retrieve as hopfield_retrieve

BASELINES: dict[str, dict] = {
    # Ramsauer et al. 2020: dense modern Hopfield
    "mhm": dict(similarity="dot", separation="softmax"),
    # Hu et al. 2023: sparse modern Hopfield
    "sparse_mhm": dict(similarity="dot", separation="sparsemax"),
    # Wu et al. 2024: generalized sparse modern Hopfield (alpha-entmax)
    "gsh": dict(similarity="dot", separation="entmax", alpha=1.5),
    # Krotov & Hopfield 2016: dense associative memory, 10th-order polynomial energy
    "polynomial": dict(similarity="dot", separation="polynomial", degree=10),
    # Millidge et al. 2022: other similarities with softmax
    "l2_mhm": dict(similarity="l2", separation="softmax"),
    "manhattan_mhm": dict(similarity="manhattan", separation="softmax"),
}


def baseline_retrieve(
    name: str,
    queries: Tensor,
    memories: Tensor,
    beta: float = 1.0,
    steps: int = 1,
    backend: str = "auto",
) -> Tensor:
    """A baseline's retrieval of ``queries`` (B, d) from ``memories`` (M, d): ``steps`` updates."""
    if name not in BASELINES:
        raise ValueError(f"name must be one of {tuple(BASELINES)}, got {name!r}")
    return hopfield_retrieve(
        queries, memories, beta=beta, steps=steps, backend=backend, **BASELINES[name]
    )
