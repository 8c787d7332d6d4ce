"""``hen-fast hen-table1``: the paper's Table 1 on offline data, with the KMN baseline and
occlusion-aware recall beside it.

For each encoder (raw pixels and the shipped autoencoders), similarity (dot, l2) and bank size,
store the eval images, recall from cues with the lower half hidden, and measure MSE and 1-SSIM
against the decoded stored latents plus exact identity recall. Beta is tuned per encoder and
similarity on the smallest bank (best exact recall, then lowest MSE) and held for larger ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..api import retrieve
from ..hen import HopfieldEncodingNetwork
from ..kmn import KernelMemoryNetwork
from . import common


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "hen-table1", help="HEN vs raw pixels vs KMN over bank sizes (the paper's Table 1)"
    )
    parser.add_argument("--data", choices=("mnist", "patches"), default="mnist")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--encoders", nargs="+", default=None, help="default: identity + shipped")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--kmn-betas", type=float, nargs="+", default=[0.5, 2.0, 8.0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/hen")
    parser.set_defaults(run=run_table1, extra="hen")


def _recall(latents, cue_latents, size, similarity, beta, steps, encoder, reference):
    (out, info), seconds = common.timed(
        retrieve,
        cue_latents[:size],
        latents[:size],
        beta=beta,
        similarity=similarity,
        steps=steps,
        return_info=True,
    )
    scores = common.recall_scores(
        encoder.decode(out, progress=False), info.argmax, reference[:size]
    )
    return {**scores, "seconds": seconds}


def _row(encoder, method, similarity, size, beta, steps, scores: dict) -> dict:
    """One row of the table: the setting, then its scores (MSE, 1-SSIM, exact recall, seconds)."""
    setting = dict(encoder=encoder, method=method, similarity=similarity, size=size, beta=beta)
    return {**setting, "steps": steps, **scores}


def _best(results: dict) -> float:
    """The beta with the highest exact recall, then the lowest MSE."""
    return max(results, key=lambda beta: (results[beta]["exact"], -results[beta]["mse"]))


def run_table1(args) -> int:
    from tqdm import tqdm

    sizes = sorted(args.sizes)
    images = common.load_images(args.data, sizes[-1], args.seed)
    cues, known = common.occluded(images)
    names = args.encoders or common.default_encoders(args.data)
    rows = []
    jobs = tqdm(names, desc="hen-table1", file=sys.stderr, disable=None)
    for name in jobs:
        encoder = common.load_encoder(name, images)
        latents = encoder.encode(images, progress=False)
        cue_latents = encoder.encode(cues, progress=False)
        reference = encoder.decode(latents, progress=False)
        for similarity in ("dot", "l2"):
            tuning = {
                beta: _recall(
                    latents, cue_latents, sizes[0], similarity, beta, args.steps, encoder, reference
                )
                for beta in args.betas
            }
            beta = _best(tuning)
            for size in sizes:
                scores = _recall(
                    latents, cue_latents, size, similarity, beta, args.steps, encoder, reference
                )
                rows.append(_row(name, "hen", similarity, size, beta, args.steps, scores))
                network = HopfieldEncodingNetwork(
                    encoder, beta=beta, similarity=similarity, steps=args.steps, progress=False
                )
                network.store(images[:size])
                recalled, seconds = common.timed(network.recall, cues[:size], known[:size])
                indices = network.recall_indices(cues[:size], known[:size])
                scores = common.recall_scores(recalled, indices, reference[:size])
                scores = {"seconds": seconds, **scores}
                rows.append(_row(name, "hen+known", similarity, size, beta, args.steps, scores))
        rows.extend(_kmn_rows(name, encoder, latents, cue_latents, reference, sizes, args))
    record = {"data": args.data, "cues": "lower half hidden", "rows": rows}
    out = Path(args.out)
    print(format_rows(rows))
    print(f"wrote {common.write_json(out, f'table1-{args.data}', record)}")
    print(f"wrote {plot_rows(rows, out, f'table1-{args.data}')}")
    return 0


def _kmn_rows(name, encoder, latents, cue_latents, reference, sizes, args) -> list[dict]:
    def run(size, beta):
        kmn = KernelMemoryNetwork(latents[:size], beta=beta)
        state, seconds = common.timed(kmn.recall, cue_latents[:size], args.steps)
        indices = kmn.recall_indices(cue_latents[:size], args.steps)
        scores = common.recall_scores(
            encoder.decode(state.clamp(-1e4, 1e4), progress=False), indices, reference[:size]
        )
        return {**scores, "seconds": seconds}

    beta = _best({beta: run(sizes[0], beta) for beta in args.kmn_betas})
    return [
        _row(name, "kmn", "exp-kernel", size, beta, args.steps, run(size, beta)) for size in sizes
    ]


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'encoder':12s} {'method':10s} {'sim':10s} {'M':>5s} {'beta':>7s} "
        f"{'MSE':>7s} {'1-SSIM':>7s} {'exact':>6s} {'s':>6s}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['encoder']:12s} {r['method']:10s} {r['similarity']:10s} {r['size']:5d} "
            f"{r['beta']:7g} {r['mse']:7.4f} {r['one_minus_ssim']:7.4f} {r['exact']:6.3f} "
            f"{r['seconds']:6.2f}"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict], out: Path, name: str) -> Path:
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("one_minus_ssim", "exact")):
        lines: dict[tuple, list] = {}
        for r in rows:
            lines.setdefault((r["encoder"], r["method"], r["similarity"]), []).append(r)
        for (encoder, method, similarity), points in lines.items():
            style = {"hen": "-", "hen+known": "--", "kmn": ":"}[method]
            axis.plot(
                [p["size"] for p in points],
                [p[metric] for p in points],
                style,
                marker="o",
                label=f"{encoder} {method} {similarity}",
            )
        axis.set_xlabel("memories stored")
        axis.set_ylabel(
            {"one_minus_ssim": "1 - SSIM (lower is better)", "exact": "exact identity recall"}[
                metric
            ]
        )
        axis.set_xscale("log")
    axes[1].legend(fontsize=6, loc="best")
    return common.save_figure(figure, out, name)
