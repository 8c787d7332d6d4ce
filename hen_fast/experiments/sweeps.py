"""``hen-fast hen-beta-sweep`` (Appendix B), ``hen-separability`` (Fig. 3) and ``hen-rank``
(Appendix C): how recall depends on beta, how separable each representation is, and whether the
recovered states collapse (meta-stable states) over the updates."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import metrics
from ..api import retrieve
from . import common


def add_commands(commands) -> None:
    sweep = commands.add_parser("hen-beta-sweep", help="MSE and 1-SSIM against beta (Appendix B)")
    _common_arguments(sweep, size=500)
    sweep.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=[10.0**e for e in (-3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 2)],
    )
    sweep.add_argument("--steps", type=int, default=3)
    sweep.set_defaults(run=run_beta_sweep, extra="hen")

    separability = commands.add_parser(
        "hen-separability", help="self/cross cosine-similarity histograms (Fig. 3)"
    )
    _common_arguments(separability, size=1000)
    separability.set_defaults(run=run_separability, extra="hen")

    rank = commands.add_parser(
        "hen-rank", help="relative rank of the recovered states over updates (Appendix C)"
    )
    _common_arguments(rank, size=500)
    rank.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0])
    rank.add_argument("--steps", type=int, default=10)
    rank.set_defaults(run=run_rank, extra="hen")


def _common_arguments(parser, size: int) -> None:
    parser.add_argument("--data", choices=("mnist", "patches"), default="mnist")
    parser.add_argument("--size", type=int, default=size, help="memories stored")
    parser.add_argument("--encoders", nargs="+", default=None, help="default: identity + shipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/hen")


def _encoded(args):
    """Per encoder: (name, encoder, memory latents, occluded-cue latents, decoded memories)."""
    from tqdm import tqdm

    images = common.load_images(args.data, args.size, args.seed)
    cues, _ = common.occluded(images)
    names = args.encoders or common.default_encoders(args.data)
    for name in tqdm(names, desc=args.command, file=sys.stderr, disable=None):
        encoder = common.load_encoder(name, images)
        latents = encoder.encode(images, progress=False)
        yield (
            name,
            encoder,
            latents,
            encoder.encode(cues, progress=False),
            encoder.decode(latents, progress=False),
        )


def run_beta_sweep(args) -> int:
    rows = []
    for name, encoder, latents, cue_latents, reference in _encoded(args):
        for similarity in ("dot", "l2"):
            for beta in args.betas:
                out, info = retrieve(
                    cue_latents,
                    latents,
                    beta=beta,
                    similarity=similarity,
                    steps=args.steps,
                    return_info=True,
                )
                scores = common.recall_scores(
                    encoder.decode(out, progress=False), info.argmax, reference
                )
                rows.append(dict(encoder=name, similarity=similarity, beta=beta, **scores))
    out = Path(args.out)
    name = f"beta-sweep-{args.data}"
    record = {"data": args.data, "size": args.size, "steps": args.steps, "rows": rows}
    print(f"wrote {common.write_json(out, name, record)}")
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, similarity in zip(axes, ("dot", "l2")):
        for encoder in dict.fromkeys(r["encoder"] for r in rows):
            points = [r for r in rows if r["encoder"] == encoder and r["similarity"] == similarity]
            axis.plot(
                [p["beta"] for p in points],
                [p["one_minus_ssim"] for p in points],
                marker="o",
                label=encoder,
            )
        axis.set_xscale("log")
        axis.set_xlabel("beta")
        axis.set_ylabel("1 - SSIM")
        axis.set_title(f"{similarity}, {args.size} {args.data} memories, {args.steps} steps")
        axis.legend()
    print(f"wrote {common.save_figure(figure, out, name)}")
    return 0


def run_separability(args) -> int:
    results = {}
    for name, _, latents, cue_latents, _ in _encoded(args):
        hist = metrics.similarity_histograms(cue_latents, latents, bins=60)
        results[name] = {
            key: (value.tolist() if hasattr(value, "tolist") else value)
            for key, value in hist.items()
        }
    out = Path(args.out)
    name = f"separability-{args.data}"
    summary = {
        k: {f: v[f] for f in ("overlap", "self_mean", "cross_mean")} for k, v in results.items()
    }
    for encoder, values in summary.items():
        print(
            f"{encoder:12s} overlap {values['overlap']:.3f}  self {values['self_mean']:.3f}  "
            f"cross {values['cross_mean']:.3f}"
        )
    record = {"data": args.data, "size": args.size, "histograms": results}
    print(f"wrote {common.write_json(out, name, record)}")
    plt = common.pyplot()
    figure, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for axis, (encoder, hist) in zip(axes[0], results.items()):
        centres = [(a + b) / 2 for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
        width = hist["edges"][1] - hist["edges"][0]
        axis.bar(centres, hist["cross"], width, color="tab:red", alpha=0.6, label="cross (i != j)")
        axis.bar(centres, hist["self"], width, color="tab:blue", alpha=0.6, label="self (i = i)")
        axis.set_title(f"{encoder}: overlap {hist['overlap']:.2f}")
        axis.set_xlabel("cosine(occluded cue, memory)")
    axes[0][0].legend(fontsize=7)
    print(f"wrote {common.save_figure(figure, out, name)}")
    return 0


def run_rank(args) -> int:
    curves = []
    for name, _, latents, cue_latents, _ in _encoded(args):
        for beta in args.betas:
            ranks = metrics.relative_rank_over_steps(cue_latents, latents, args.steps, beta=beta)
            curves.append({"encoder": name, "beta": beta, "relative_rank": ranks})
            print(
                f"{name:12s} beta {beta:<8g} relative rank after each update: "
                + " ".join(f"{r:.2f}" for r in ranks)
            )
    out = Path(args.out)
    name = f"rank-{args.data}"
    record = {"data": args.data, "size": args.size, "similarity": "dot", "curves": curves}
    print(f"wrote {common.write_json(out, name, record)}")
    plt = common.pyplot()
    encoders = list(dict.fromkeys(c["encoder"] for c in curves))
    figure, axes = plt.subplots(1, len(encoders), figsize=(4 * len(encoders), 3.2), squeeze=False)
    for axis, encoder in zip(axes[0], encoders):
        for curve in (c for c in curves if c["encoder"] == encoder):
            axis.plot(curve["relative_rank"], "--", marker=".", label=f"beta {curve['beta']:g}")
        axis.set_title(f"{encoder} (dot)")
        axis.set_xlabel("update")
        axis.set_ylabel("rank(states) / rank(memories)")
        axis.set_ylim(0, 1.05)
        axis.legend(fontsize=7)
    print(f"wrote {common.save_figure(figure, out, name)}")
    return 0
