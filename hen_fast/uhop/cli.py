"""``hen-fast uhop-*``: U-Hop's memory-retrieval experiments, each writing JSON and a PNG."""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_OUT = "results/uhop"
# Options passed on to the experiment functions under the same names (where a command has them).
SETTINGS = ("steps", "t", "lr", "beta")


def add_commands(subparsers) -> None:
    """Adds uhop-capacity, uhop-noise, uhop-iterations, uhop-loss-error and uhop-memorise."""

    def command(name: str, run, summary: str, size: int | None = 100, lr: bool = True):
        """A uhop-* parser with the options its experiment shares with the others."""
        parser = subparsers.add_parser(name, help=summary)
        parser.add_argument("--dataset", choices=("mnist", "patches"), default="mnist")
        parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON and PNG")
        parser.add_argument("--beta", type=float, default=1.0)
        parser.add_argument("--t", type=float, default=2.0, help="separation-loss scale")
        if size is not None:
            parser.add_argument("--size", type=int, default=size, help="memory-set size M")
        if lr:
            parser.add_argument("--lr", type=float, default=1.0, help="Stage I learning rate")
        parser.set_defaults(run=run, extra="uhop")
        return parser

    capacity = command(
        "uhop-capacity",
        _run_capacity,
        "U-Hop vs baselines: error against memory-set size (50%% masked)",
        size=None,
    )
    capacity.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 30, 50, 100, 200, 500])
    capacity.add_argument(
        "--repeats",
        type=int,
        nargs="+",
        default=[20],
        help="repeats, one number for all sizes or one per size",
    )
    capacity.add_argument("--steps", type=int, default=100, help="Stage I iterations N")

    noise = command("uhop-noise", _run_noise, "U-Hop vs baselines: error against noise")
    noise.add_argument("--levels", type=float, nargs="+", default=None)
    noise.add_argument("--repeats", type=int, default=20)
    noise.add_argument("--steps", type=int, default=100, help="Stage I iterations N")

    iters = command(
        "uhop-iterations",
        _run_iterations,
        "U-Hop's error and loss against Stage I iterations N (Fig. 5)",
    )
    iters.add_argument("--checkpoints", type=int, nargs="+", default=None)
    iters.add_argument("--repeats", type=int, default=5)

    loss_error = command(
        "uhop-loss-error",
        _run_loss_error,
        "U-Hop's error against its separation loss (Fig. 7)",
        lr=False,  # each run draws its own
    )
    loss_error.add_argument("--runs", type=int, default=50)
    loss_error.add_argument("--max-steps", type=int, default=200)

    memorise = subparsers.add_parser(
        "uhop-memorise",
        help="U-Hop layer: max train accuracy vs training-set size (Fig. 6 / Table 1)",
    )
    memorise.add_argument("--dataset", choices=("mnist", "digits"), default="mnist")
    memorise.add_argument("--labels", choices=("true", "random"), default="true")
    # Unset options take memorisation()'s defaults (the tuned ones), so they live in one place.
    memorise.add_argument("--sizes", type=int, nargs="+")
    memorise.add_argument("--separations", nargs="+", choices=("softmax", "sparsemax", "entmax"))
    memorise.add_argument("--seeds", type=int, nargs="+")
    memorise.add_argument("--steps", type=int, help="optimiser steps at every size (whole epochs)")
    memorise.add_argument("--width", type=int, help="token embedding dimension")
    memorise.add_argument("--feature-dim", type=int, help="U-Hop Phi's output (default: width)")
    memorise.add_argument("--t", type=float, help="separation-loss scale")
    memorise.add_argument("--beta", type=float)
    memorise.add_argument("--inner-steps", type=int, help="Stage I steps per step")
    memorise.add_argument("--kernel-lr", type=float)
    memorise.add_argument("--model-lr", type=float)
    memorise.add_argument("--tag", default="", help="suffix of the output files' names")
    memorise.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON and PNG")
    memorise.set_defaults(run=_run_memorise, extra="uhop")


def _settings(args) -> dict:
    """The Stage I and retrieval settings the command has options for, as the experiment's
    keyword arguments."""
    return {name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}


def _finish(result, args) -> int:
    from .experiments import save

    json_path, png_path = save(result, Path(args.out))
    summary = result["summary"]
    if "uhop_over_mhm_mean" in summary:
        print(f"U-Hop error / MHM error, mean over x: {summary['uhop_over_mhm_mean']:.3f}")
    print(f"wrote {json_path} and {png_path}")
    return 0


def _positive(name, values, minimum: int = 1) -> bool:
    if any(v < minimum for v in values):
        print(f"--{name} must be >= {minimum}, got {values}", file=sys.stderr)
        return False
    return True


def _run_capacity(args) -> int:
    from . import experiments

    if len(args.repeats) not in (1, len(args.sizes)):
        print("--repeats takes one number or one per size", file=sys.stderr)
        return 2
    if not (_positive("sizes", args.sizes, 2) and _positive("repeats", args.repeats)):
        return 2
    repeats = args.repeats[0] if len(args.repeats) == 1 else args.repeats
    result = experiments.capacity(args.dataset, args.sizes, repeats, **_settings(args))
    return _finish(result, args)


def _run_noise(args) -> int:
    from . import experiments

    levels = args.levels or list(experiments.PAPER_NOISE_LEVELS)
    if not (_positive("size", [args.size], 2) and _positive("repeats", [args.repeats])):
        return 2
    result = experiments.noise(args.dataset, args.size, levels, args.repeats, **_settings(args))
    return _finish(result, args)


def _run_iterations(args) -> int:
    from . import experiments

    checkpoints = args.checkpoints or list(experiments.PAPER_ITERATIONS)
    if not (
        _positive("checkpoints", checkpoints)
        and _positive("size", [args.size], 2)
        and _positive("repeats", [args.repeats])
    ):
        return 2
    result = experiments.iterations(
        args.dataset, args.size, checkpoints, args.repeats, **_settings(args)
    )
    return _finish(result, args)


def _run_loss_error(args) -> int:
    from . import experiments

    if not (
        _positive("size", [args.size], 2)
        and _positive("runs", [args.runs])
        and _positive("max-steps", [args.max_steps])
    ):
        return 2
    result = experiments.loss_vs_error(
        args.dataset, args.size, args.runs, max_steps=args.max_steps, **_settings(args)
    )
    return _finish(result, args)


def _run_memorise(args) -> int:
    import torch

    from . import memorisation

    options = {name: getattr(args, name) for name in MEMORISE_OPTIONS}
    options = {name: value for name, value in options.items() if value is not None}
    for name, minimum in MEMORISE_MINIMA.items():
        value = options.get(name)
        values = value if isinstance(value, list) else [value]
        if value is not None and not _positive(name.replace("_", "-"), values, minimum):
            return 2
    torch.set_num_threads(1)  # tiny tensors: more threads only contend (layer_example)
    try:
        result = memorisation.memorisation(args.dataset, labels=args.labels, **options)
    except ValueError as error:
        print(f"uhop-memorise: {error}", file=sys.stderr)
        return 2
    json_path, png_path = memorisation.save(result, Path(args.out), args.tag)
    largest = str(max(record["size"] for record in result["records"]))
    for name, by_size in result["summary"].items():
        cell = by_size[largest]
        test = cell.get("test_accuracy")
        print(
            f"{name:<22} n={largest}: max train acc {cell['max_train_accuracy']:.3f} "
            f"+- {cell['max_train_accuracy_std']:.3f}, converged in "
            f"{cell['steps_to_converge']:.0f} steps"
            + (f", test acc {test:.3f}" if test is not None else "")
        )
    print(f"wrote {json_path} and {png_path}")
    return 0


MEMORISE_OPTIONS = ("sizes", "separations", "seeds", "steps", "width", "feature_dim", "t", "beta",
                    "inner_steps", "kernel_lr", "model_lr")  # fmt: skip
MEMORISE_MINIMA = {"sizes": 1, "steps": 1, "width": 1, "feature_dim": 1, "inner_steps": 0}
