"""``hen-fast hen-scaling``: the paper's scaling claim (Table 1, Fig. 2) on the largest offline
data: exact recall, 1-SSIM and meta-stable states against the number of stored images, for raw
pixels, each shipped encoder and the KMN baseline.

Images: every MNIST 5k digit (5000) or every 32x32 natural-image patch at stride 16 (15022),
shuffled; the first ``size`` are stored and recalled from cues with the lower half hidden (the
paper's cue), scored on everything (the paper's recall) and with ``known`` (the latent mask).
Both sets include the images the shipped models trained on: this measures how well the stored
patterns separate as the bank grows, not how the encoders generalise (benchmarks/hen_recall.py).

Each network uses its encoder's recommended setting (the package defaults). Per size: ``exact``
(the recalled memory is the cue's own), ``one_minus_ssim`` and ``mse`` of the decoded recall
against the decoded stored latent (the paper's metric), ``meta_stable``: the fraction of cues
whose final state lies farther than 5% (relative) from every stored latent, i.e. a mixture
rather than one memory, and ``relative_rank`` (Appendix C) of the final states.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .. import datasets, metrics
from ..hen import HopfieldEncodingNetwork
from ..kmn import KernelMemoryNetwork
from . import common

# A final state is one memory when it lies within this relative distance of a stored latent.
ONE_MEMORY = 0.05
KMN_BETAS = (0.5, 2.0, 8.0)


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "hen-scaling",
        help="recall and meta-stable states vs bank size (the paper's Table 1, Fig. 2)",
    )
    parser.add_argument("--data", choices=("mnist", "patches"), default="mnist")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 2000, 5000])
    parser.add_argument("--encoders", nargs="+", default=None, help="default: identity + shipped")
    parser.add_argument("--kmn-size", type=int, default=2000,
                        help="largest bank for the KMN (its Gram pseudo-inverse is O(M^3))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/hen")
    parser.set_defaults(run=run_scaling, extra="hen")


def scaling_images(data: str, seed: int) -> torch.Tensor:
    if data == "mnist":
        images = datasets.mnist5k("all")[0]
    else:
        images = datasets.natural_patches("all", size=32, stride=16)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order].contiguous()


def meta_stable_fraction(states: torch.Tensor, memories: torch.Tensor) -> float:
    """The fraction of states farther than ONE_MEMORY (relative) from every stored latent."""
    nearest = torch.cdist(states.double(), memories.double()).min(dim=1)
    scale = memories.double().norm(dim=1)[nearest.indices].clamp(min=1e-12)
    return float((nearest.values / scale > ONE_MEMORY).float().mean())


def _scores(encoder, states, indices, latents, reference) -> dict:
    recalled = encoder.decode(states.clamp(-1e4, 1e4), progress=False)
    scores = common.recall_scores(recalled, indices, reference)
    return dict(scores, meta_stable=meta_stable_fraction(states, latents),
                relative_rank=metrics.relative_rank(states, latents))  # fmt: skip


def run_scaling(args) -> int:
    from tqdm import tqdm

    sizes = sorted(args.sizes)
    images = scaling_images(args.data, args.seed)
    if sizes[-1] > images.shape[0] or sizes[0] < 2:
        print(f"--sizes must lie in 2..{images.shape[0]} for {args.data}", file=sys.stderr)
        return 2
    cues, known = datasets.mask_lower_half(images[: sizes[-1]])
    rows = []
    for name in tqdm(args.encoders or common.default_encoders(args.data), desc="hen-scaling",
                     file=sys.stderr, disable=None):  # fmt: skip
        encoder = common.load_encoder(name, images)
        latents = encoder.encode(images[: sizes[-1]], progress=False)
        reference = encoder.decode(latents, progress=False)
        network = HopfieldEncodingNetwork(encoder, progress=False)
        setting = dict(beta=network.beta, similarity=network.similarity, steps=network.steps)
        for size in tqdm(sizes, desc=name, file=sys.stderr, leave=False, disable=None):
            network.store(images[len(network) : size])  # the first `size` images stored
            for method, mask in (("hen", None), ("hen+known", known[:size])):
                states, info = network.recall_state(cues[:size], known=mask)
                scores = _scores(encoder, states, info.argmax, latents[:size], reference[:size])
                rows.append(dict(encoder=name, method=method, size=size, **setting, **scores))
        cue_latents = encoder.encode(cues, progress=False)
        rows += _kmn_rows(name, encoder, latents, cue_latents, reference, sizes, args.kmn_size)
    record = {"data": args.data, "cues": "lower half hidden", "one_memory": ONE_MEMORY,
              "rows": rows}  # fmt: skip
    out = Path(args.out)
    print(format_rows(rows))
    print(f"wrote {common.write_json(out, f'scaling-{args.data}', record)}")
    print(f"wrote {plot_rows(rows, out, f'scaling-{args.data}')}")
    return 0


def _kmn_rows(name, encoder, latents, cue_latents, reference, sizes, largest) -> list[dict]:
    """KMN over the same latents, beta tuned on the smallest bank (best exact, then MSE)."""

    def run(size, beta):
        kmn = KernelMemoryNetwork(latents[:size], beta=beta)
        states = kmn.recall(cue_latents[:size], 3)
        indices = kmn.recall_indices(cue_latents[:size], 3)
        return _scores(encoder, states, indices, latents[:size], reference[:size])

    tuned = {beta: run(sizes[0], beta) for beta in KMN_BETAS}
    beta = max(tuned, key=lambda b: (tuned[b]["exact"], -tuned[b]["mse"]))
    return [dict(encoder=name, method="kmn", size=size, beta=beta, similarity="exp-kernel",
                 steps=3, **run(size, beta)) for size in sizes if size <= largest]  # fmt: skip


def format_rows(rows: list[dict]) -> str:
    header = (f"{'encoder':12s} {'method':10s} {'M':>5s} {'exact':>6s} {'1-SSIM':>7s} "
              f"{'meta':>6s} {'rank':>6s}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['encoder']:12s} {r['method']:10s} {r['size']:5d} {r['exact']:6.3f} "
                     f"{r['one_minus_ssim']:7.4f} {r['meta_stable']:6.3f} "
                     f"{r['relative_rank']:6.3f}")  # fmt: skip
    return "\n".join(lines)


def plot_rows(rows: list[dict], out: Path, name: str) -> Path:
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("exact", "exact identity recall"), ("one_minus_ssim", "1 - SSIM (lower is better)"),
              ("meta_stable", "meta-stable states (fraction of cues)"))  # fmt: skip
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault((r["encoder"], r["method"]), []).append(r)
    for axis, (metric, label) in zip(axes, panels):
        for (encoder, method), points in lines.items():
            style = {"hen": "-", "hen+known": "--", "kmn": ":"}[method]
            axis.plot([p["size"] for p in points], [p[metric] for p in points], style,
                      marker="o", label=f"{encoder} {method}")  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel("images stored")
        axis.set_ylabel(label)
    axes[0].legend(fontsize=6, loc="best")
    return common.save_figure(figure, out, name)
