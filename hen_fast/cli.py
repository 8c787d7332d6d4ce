"""The ``hen-fast`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from . import __version__, datasets
from .api import retrieve
from .backends import available_backends, registered_backends

# Similarity, separation and the beta that suits pixel images in [0, 1] for it: scores of 784-pixel
# digits differ by tens, so beta of a few makes the nearest memory dominate.
DEMO_CONFIGS = [
    (similarity, separation, beta)
    for similarity, beta in (("dot", 5.0), ("l2", 2.0), ("manhattan", 2.0))
    for separation in ("softmax", "sparsemax", "entmax")
]
# Modules that add their own subcommands: each has ``add_commands(subparsers)`` and imports only
# what parsing needs, so ``hen-fast --help`` stays fast.
COMMAND_MODULES: tuple[str, ...] = ("hen_fast.experiments", "hen_fast.uhop.cli")
EXACT_PIXEL_ERROR = 0.02  # a recall is exact when no pixel is off by more than this (about 5/255)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hen-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hen_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="recall MNIST digits from occluded cues on the CPU")
    demo.add_argument("--memories", type=int, default=1000, help="digits stored (<= 5000)")
    demo.add_argument(
        "--mask",
        choices=("half", "random"),
        default="half",
        help="hide the lower half of each cue, or half its pixels at random",
    )
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--seed", type=int, default=0, help="which digits are stored")
    demo.add_argument(
        "--out", default="hen_fast_demo.png", help="PNG of cues and recalls ('' to skip)"
    )
    demo.set_defaults(run=run_demo)

    backends = commands.add_parser("backends", help="list the retrieval backends")
    backends.set_defaults(run=run_backends)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(commands)

    args = parser.parse_args(argv)
    return args.run(args)


def run_backends(args) -> int:
    ready = set(available_backends())
    for name in registered_backends():
        print(f"{name:10s} {'available' if name in ready else 'not available'}")
    return 0


def run_demo(args) -> int:
    from tqdm import tqdm

    images, _ = datasets.mnist5k()
    if not 1 <= args.memories <= images.shape[0]:
        print(f"--memories must lie in 1..{images.shape[0]}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    stored = images[torch.randperm(images.shape[0], generator=generator)[: args.memories]]
    masker = datasets.mask_lower_half if args.mask == "half" else datasets.mask_random
    cues, _ = masker(stored)
    memories, queries = stored.flatten(1), cues.flatten(1)
    truth = torch.arange(memories.shape[0])

    print(
        f"hen_fast {__version__} demo: {memories.shape[0]} MNIST digits stored, recalled from "
        f"cues with {'the lower half' if args.mask == 'half' else 'half the pixels'} hidden; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    # One small call first: loading a compiled backend is a one-time cost, not the retrieval's.
    retrieve(queries[:2], memories[:8], backend=args.backend)
    rows, recalls = [], []
    for similarity, separation, beta in tqdm(
        DEMO_CONFIGS, desc="retrieving", file=sys.stderr, disable=None
    ):
        start = time.perf_counter()
        out, info = retrieve(
            queries,
            memories,
            beta=beta,
            similarity=similarity,
            separation=separation,
            backend=args.backend,
            return_info=True,
        )
        elapsed = time.perf_counter() - start
        pixel_error = (out - memories).abs().amax(dim=1)
        rows.append(
            (
                similarity,
                separation,
                beta,
                100 * (pixel_error <= EXACT_PIXEL_ERROR).float().mean().item(),
                100 * (info.argmax == truth).float().mean().item(),
                ((out - memories) ** 2).mean().item(),
                info.support.float().mean().item(),
                1e3 * elapsed,
            )
        )
        recalls.append(out)
    header = ("similarity", "separation", "beta", "exact %", "nearest %", "MSE", "support", "ms")
    print(_table(header, rows))
    print(
        f"exact: every pixel within {EXACT_PIXEL_ERROR} of the stored digit; nearest: the most "
        "similar memory is the stored digit; support: memories with non-zero weight (softmax: "
        "> 1e-6), mean over queries"
    )
    if args.out:
        _save_grid(Path(args.out), stored, cues, recalls, [f"{s}/{p}" for s, p, _ in DEMO_CONFIGS])
        print(f"wrote {args.out}")
    return 0


def _table(header, rows) -> str:
    cells = [header] + [
        (s, p, f"{b:g}", f"{e:.1f}", f"{n:.1f}", f"{m:.4f}", f"{k:.1f}", f"{t:.0f}")
        for s, p, b, e, n, m, k, t in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _save_grid(path: Path, stored, cues, recalls, labels, columns: int = 12, scale: int = 2):
    """A PNG: one column per example; rows stored digit, cue, then each configuration's recall."""
    from PIL import Image, ImageDraw

    size = stored.shape[-1]
    label_width = 150
    panels = [stored, cues] + [r.reshape(stored.shape) for r in recalls]
    names = ["stored", "cue"] + labels
    count = min(columns, stored.shape[0])
    canvas = Image.new("L", (label_width + count * size * scale, len(panels) * size * scale), 255)
    draw = ImageDraw.Draw(canvas)
    for row, (panel, name) in enumerate(zip(panels, names)):
        draw.text((4, row * size * scale + size * scale // 2 - 6), name, fill=0)
        for col in range(count):
            pixels = (panel[col, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(255 - pixels, mode="L").resize((size * scale,) * 2)
            canvas.paste(tile, (label_width + col * size * scale, row * size * scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
