"""The ``hen-fast`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from . import __version__, datasets
from ._extras import MissingExtraError, check_extra, require
from .api import retrieve
from .backends import available_backends, registered_backends

# The demo's data sets: the shipped models' eval splits and 32x32 patches of photos that no
# shipped model saw (the other held-out sets are in benchmarks/hen_recall.py); each is shown with
# raw pixels and every installed shipped encoder for it (experiments.common.DATA_ENCODERS).
DEMO_DATA = ("mnist", "patches", "photos")
DEMO_NOISE = 0.3  # standard deviation of the Gaussian noise on noisy cues (pixels in [0, 1])
# Modules that add their own subcommands: each has ``add_commands(subparsers)`` and imports only
# what parsing needs, so ``hen-fast --help`` stays fast (and works on a core install). A subcommand
# that needs an extra says so with ``set_defaults(extra=...)``; main checks it before any work.
COMMAND_MODULES: tuple[str, ...] = ("hen_fast.experiments", "hen_fast.uhop.cli", "hen_fast.bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hen-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hen_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="HEN: store MNIST digits and natural-image patches, recall from occluded and noisy "
        "cues (raw pixels vs a shipped encoder)",
    )
    demo.add_argument(
        "--memories", type=int, default=500,
        help="images stored per data set (<= 1000; fewer where a data set has fewer)",
    )  # fmt: skip
    demo.add_argument("--data", nargs="+", choices=DEMO_DATA, default=list(DEMO_DATA))
    demo.add_argument(
        "--encoder", default=None, help="one encoder for every data set (default: the shipped ones)"
    )
    demo.add_argument("--noise", type=float, default=DEMO_NOISE, help="noisy cues' noise std")
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--seed", type=int, default=0, help="which images are stored")
    demo.add_argument(
        "--out", default="hen_fast_demo.png", help="PNG of cues, recalls and truth ('' to skip)"
    )
    demo.set_defaults(run=run_demo, extra="hen")

    backends = commands.add_parser("backends", help="list the retrieval backends")
    backends.set_defaults(run=run_backends)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(commands)

    args = parser.parse_args(argv)
    try:
        if getattr(args, "extra", None):
            check_extra(args.extra)
        return args.run(args)
    except MissingExtraError as error:
        # A missing optional package is a set-up problem, not a bug: one line, no traceback.
        print(f"hen-fast {args.command}: {error}", file=sys.stderr)
        return 2


def run_backends(args) -> int:
    ready = set(available_backends())
    for name in registered_backends():
        print(f"{name:10s} {'available' if name in ready else 'not available'}")
    return 0


def run_demo(args) -> int:
    from .experiments import common

    limit = 1000  # MNIST has 1000 eval digits; the patches' eval photos give more
    if not 1 <= args.memories <= limit:
        print(f"--memories must lie in 1..{limit}", file=sys.stderr)
        return 2
    if not 0 <= args.noise <= 1:
        print("--noise must lie in [0, 1]", file=sys.stderr)
        return 2
    print(
        f"hen_fast {__version__} demo: {args.memories} memories per data set, recalled from cues "
        f"with the lower half hidden and from cues with Gaussian noise (std {args.noise}); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    # One small call first: loading a compiled backend is a one-time cost, not the recall's.
    retrieve(torch.zeros(2, 4), torch.ones(8, 4), backend=args.backend)
    rows, blocks = [], []
    for data in args.data:
        images = common.load_images(data, min(args.memories, common.AVAILABLE[data]), args.seed)
        data_rows, panels = _demo_data_set(data, images, args)
        rows += data_rows
        blocks.append(common.image_grid(*zip(*panels)))
    print(_table(rows))
    print(
        "exact: the recalled memory is the stored image the cue came from; MSE and 1-SSIM against "
        "that image; known: recall told which cue pixels are real (occluded cues); seconds: "
        "encode + retrieve + decode for all cues"
    )
    if args.out:
        _stack(blocks).save(Path(args.out))
        print(f"wrote {args.out}")
    return 0


def _demo_networks(data, images, args):
    """(label, network) pairs: raw pixels, and the shipped encoders for the data (or
    ``--encoder``)."""
    from . import encoders
    from .experiments import common
    from .hen import HopfieldEncodingNetwork

    present = set(encoders.available())
    shipped = [name for name in common.DATA_ENCODERS[data] if name in present]
    chosen = [args.encoder] if args.encoder else shipped
    names = ["identity", *(name for name in chosen if name != "identity")]
    if len(names) == 1:
        print(f"note: no shipped encoder for {data} is installed; showing raw pixels only")
    networks = []
    for name in names:
        encoder = common.load_encoder(name, images)
        network = HopfieldEncodingNetwork(encoder, backend=args.backend, progress=False)
        network.store(images)
        networks.append(("pixels" if name == "identity" else f"HEN {name}", network))
    return networks


def _demo_data_set(data, images, args):
    """Table rows and PNG panels (images, label) for one data set."""
    from . import metrics

    occluded, known = datasets.mask_lower_half(images)
    noisy = datasets.add_noise(images, args.noise, seed=args.seed + 1)
    truth = torch.arange(images.shape[0])
    rows, panels = [], [(images, f"{data}: truth")]
    networks = _demo_networks(data, images, args)
    for cue_name, cues, mask in (("occluded", occluded, known), ("noisy", noisy, None)):
        panels.append((cues, f"{cue_name} cue"))
        for label, network in networks:
            for aware in (False, True) if mask is not None else (False,):
                start = time.perf_counter()  # one pass gives the images and the indices
                states, info = network.recall_state(cues, known=mask if aware else None)
                recalled = network.encoder.decode(states, progress=False)
                seconds = time.perf_counter() - start
                indices = info.argmax
                target = network.encoder.prepare(images)
                name = label + (" + known" if aware else "")
                rows.append(
                    (
                        data,
                        cue_name,
                        name,
                        100 * metrics.exact_recall(indices.cpu(), truth),
                        float(metrics.mse(recalled, target).mean()),
                        float(metrics.one_minus_ssim(recalled, target).mean()),
                        seconds,
                    )
                )
                panels.append((recalled, name))
    return rows, panels


def _table(rows) -> str:
    header = ("data", "cue", "method", "exact %", "MSE", "1-SSIM", "seconds")
    cells = [header] + [
        (d, c, m, f"{e:.1f}", f"{mse:.4f}", f"{s:.4f}", f"{t:.2f}")
        for d, c, m, e, mse, s, t in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _stack(blocks):
    """The data sets' grids one under the other, on a white canvas."""
    Image = require("PIL.Image", "hen")
    width = max(block.width for block in blocks)
    canvas = Image.new(
        "RGB", (width, sum(block.height for block in blocks) + 8 * len(blocks)), "white"
    )
    top = 0
    for block in blocks:
        canvas.paste(block, (0, top))
        top += block.height + 8
    return canvas


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
