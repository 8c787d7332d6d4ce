"""U-Hop's memory-retrieval experiments (Section 4.1, Figures 3, 5, 7 and 26) on offline data.

Every experiment stores a random memory set, makes one query per memory, applies one update and
reports the sum-of-squares pixel error between the retrieved and the stored pattern, averaged over
the memory set; each repeat draws a new memory set (and masks/noise), and the figures show the mean
and the standard deviation over repeats. Settings follow the paper (beta = 1, t = 2, SGD at lr 1)
unless an argument says otherwise. The ``hen-fast uhop-*`` commands (``hen_fast.uhop.cli``) run them
and write JSON and PNG.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path

import torch

from .. import __version__, datasets
from .._extras import require
from .baselines import BASELINES, baseline_retrieve
from .feature_map import FeatureMap, fit_feature_map
from .loss import separation_loss
from .retrieval import retrieve as uhop_retrieve

MODELS = ("uhop", *BASELINES)
DATASETS = ("mnist", "patches")
# Appendix F, Table 4.
PAPER_SIZES = (10, 20, 30, 50, 100, 200, 500)
PAPER_NOISE_LEVELS = (0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 1.2, 1.4, 2.0)
PAPER_ITERATIONS = (1, 10, 20, 50, 100, 200, 500, 1000)
PLOT_FLOOR = 1e-4
MASKED = "50% of entries masked"  # the query of every experiment but noise


def load_patterns(dataset: str) -> torch.Tensor:
    """All patterns of a dataset, flattened: MNIST 5k digits (784 pixels) or 32 x 32 colour
    patches from scikit-image's photos on a 16-pixel grid (3072 values; the colour set standing in
    for CIFAR10, which no installed package ships)."""
    if dataset == "mnist":
        return datasets.mnist5k()[0].flatten(1)
    if dataset == "patches":
        return datasets.natural_patches("all", size=32, stride=16).flatten(1)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def masked_queries(memories: torch.Tensor, seed: int) -> torch.Tensor:
    """Half of each pattern's entries, chosen at random, set to 0 (the rest unchanged)."""
    return datasets.mask_random(memories, 0.5, seed=seed)[0]


def noisy_queries(memories: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """Each pattern plus a Gaussian vector rescaled to ``level`` times the pattern's norm."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(memories.shape, generator=generator)
    noise *= level * memories.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)
    return memories + noise


def sum_of_squares(retrieved: torch.Tensor, memories: torch.Tensor) -> float:
    """Mean over patterns of the summed squared error."""
    return float(((retrieved - memories) ** 2).sum(dim=1).mean())


def evaluate(queries, memories, feature_map: FeatureMap | None, models, beta: float) -> dict:
    """Error of each model on one memory set (U-Hop with ``feature_map``)."""
    errors = {}
    for model in models:
        if model == "uhop":
            out = uhop_retrieve(queries, memories, feature_map, beta=beta)
        else:
            out = baseline_retrieve(model, queries, memories, beta=beta)
        errors[model] = sum_of_squares(out, memories)
    return errors


def _subset(patterns, size: int, seed: int) -> torch.Tensor:
    order = torch.randperm(patterns.shape[0], generator=torch.Generator().manual_seed(seed))
    return patterns[order[:size]]


def _fit(memories, repeat: int, **options):
    """Stage I for one repeat: W drawn from seed ``repeat``, no progress bar of its own (the
    experiment's bar counts repeats)."""
    return fit_feature_map(
        memories, generator=torch.Generator().manual_seed(repeat), progress=False, **options
    )


def capacity(
    dataset, sizes, repeats, *, steps=100, t=2.0, lr=1.0, beta=1.0, models=MODELS, progress=None
) -> dict:
    """Error against memory-set size, queries with 50% of entries masked (Fig. 3 left, Fig. 26).
    ``repeats`` is an int or one count per size."""
    patterns = load_patterns(dataset)
    counts = [repeats] * len(sizes) if isinstance(repeats, int) else list(repeats)
    records = []
    jobs = [(size, r) for size, count in zip(sizes, counts) for r in range(count)]
    for size, r in _bar(jobs, f"capacity {dataset}", progress):
        memories = _subset(patterns, size, seed=1000 * size + r)
        feature_map = _fit(memories, r, t=t, steps=steps, lr=lr)
        errors = evaluate(masked_queries(memories, seed=r), memories, feature_map, models, beta)
        records.append(dict(size=size, repeat=r, loss=feature_map.final_loss, errors=errors))
    settings = dict(sizes=list(sizes), repeats=counts, steps=steps, t=t, lr=lr, beta=beta)
    return _result("capacity", dataset, records, settings, MASKED)


def noise(
    dataset,
    size,
    levels,
    repeats,
    *,
    steps=100,
    t=2.0,
    lr=1.0,
    beta=1.0,
    models=MODELS,
    progress=None,
) -> dict:
    """Error against the noise level (noise norm / pattern norm) at a fixed size (Fig. 3 right)."""
    patterns = load_patterns(dataset)
    levels = list(levels)
    records = []
    for r in _bar(range(repeats), f"noise {dataset}", progress):
        memories = _subset(patterns, size, seed=1000 * size + r)
        feature_map = _fit(memories, r, t=t, steps=steps, lr=lr)
        for level in levels:
            queries = noisy_queries(memories, level, seed=r)
            errors = evaluate(queries, memories, feature_map, models, beta)
            records.append(dict(level=level, repeat=r, errors=errors))
    settings = dict(size=size, levels=levels, repeats=repeats, steps=steps, t=t, lr=lr, beta=beta)
    query = "pattern + Gaussian noise of norm level x ||pattern||"
    return _result("noise", dataset, records, settings, query)


def iterations(
    dataset, size, checkpoints, repeats, *, t=2.0, lr=1.0, beta=1.0, progress=None
) -> dict:
    """U-Hop's error and separation loss against the Stage I iterations N (Fig. 5), one training
    run per repeat evaluated at every checkpoint; MHM's error beside it."""
    patterns = load_patterns(dataset)
    checkpoints = sorted(set(int(n) for n in checkpoints))
    records = []
    for r in _bar(range(repeats), f"iterations {dataset}", progress):
        memories = _subset(patterns, size, seed=1000 * size + r)
        queries = masked_queries(memories, seed=r)
        mhm = evaluate(queries, memories, None, ["mhm"], beta)["mhm"]

        def record(step, weight, memories=memories, queries=queries, r=r, mhm=mhm):
            if step in checkpoints:
                feature_map = _row_normalised(weight)
                errors = evaluate(queries, memories, feature_map, ["uhop"], beta)
                loss = _normalised_loss(feature_map, memories, t)
                records.append(
                    dict(steps=step, repeat=r, loss=loss, errors=dict(mhm=mhm, **errors))
                )

        _fit(memories, r, t=t, steps=max(checkpoints), lr=lr, callback=record)
    settings = dict(size=size, checkpoints=checkpoints, repeats=repeats, t=t, lr=lr, beta=beta)
    return _result("iterations", dataset, records, settings, MASKED)


def loss_vs_error(
    dataset, size, runs, *, max_steps=200, t=2.0, beta=1.0, seed=0, progress=None
) -> dict:
    """U-Hop's error against its final separation loss over runs with random learning rates
    ``|N(0, 1)|``, iterations N uniform in [1, max_steps] and random starting W, on one memory set
    and one set of masked queries (drawn by ``seed``), so only the learnt kernel varies
    (Fig. 1 and Fig. 7)."""
    patterns = load_patterns(dataset)
    draws = torch.Generator().manual_seed(seed)
    memories = _subset(patterns, size, seed=1000 * size + seed)
    queries = masked_queries(memories, seed=seed)
    records = []
    for r in _bar(range(runs), f"loss-error {dataset}", progress):
        lr = abs(float(torch.randn((), generator=draws))) + 1e-3
        steps = int(torch.randint(1, max_steps + 1, (), generator=draws))
        feature_map = _fit(memories, r, t=t, steps=steps, lr=lr)
        errors = evaluate(queries, memories, feature_map, ["uhop"], beta)
        records.append(dict(run=r, lr=lr, steps=steps, loss=feature_map.final_loss, errors=errors))
    settings = dict(size=size, runs=runs, max_steps=max_steps, t=t, beta=beta, seed=seed)
    memory_set = "one set for all runs"
    return _result("loss_vs_error", dataset, records, settings, MASKED, memory_set=memory_set)


def _bar(items, desc: str, progress):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=None if progress is None else not progress)


def _row_normalised(weight: torch.Tensor) -> FeatureMap:
    norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp(min=1e-30)
    feature_map = FeatureMap(weight / norms)
    feature_map.weight.requires_grad_(False)
    return feature_map


def _normalised_loss(feature_map: FeatureMap, memories, t: float) -> float:
    with torch.no_grad():
        features = torch.nn.functional.normalize(feature_map(memories), dim=1)
        return float(separation_loss(features, t))


def _result(kind, dataset, records, settings: dict, query: str, **more_settings) -> dict:
    """The JSON record of one experiment: its settings (the arguments, then how the queries were
    made and ``more_settings``), records, summary and the machine."""
    return dict(
        experiment=kind,
        dataset=dataset,
        settings={**settings, "query": query, **more_settings},
        records=records,
        summary=summarise(kind, records),
        machine=dict(
            platform=platform.platform(),
            torch=torch.__version__,
            hen_fast=__version__,
            threads=torch.get_num_threads(),
        ),
        date=datetime.date.today().isoformat(),
    )


def summarise(kind: str, records: list[dict]) -> dict:
    """Mean and standard deviation of each model's error per x value (size, level or steps);
    for capacity also U-Hop's error as a fraction of MHM's, per size and averaged over sizes."""
    axis = {"capacity": "size", "noise": "level", "iterations": "steps"}.get(kind)
    if axis is None:
        return {}
    table: dict = {}
    for rec in records:
        for model, error in rec["errors"].items():
            table.setdefault(model, {}).setdefault(rec[axis], []).append(error)
    summary = {
        model: {str(x): dict(mean=_mean(v), std=_std(v), n=len(v)) for x, v in by_x.items()}
        for model, by_x in table.items()
    }
    if "uhop" in table and "mhm" in table:
        ratios = {x: _mean(table["uhop"][x]) / _mean(table["mhm"][x]) for x in table["mhm"]}
        summary["uhop_over_mhm"] = {str(x): r for x, r in ratios.items()}
        summary["uhop_over_mhm_mean"] = _mean(list(ratios.values()))
    return summary


def _mean(values) -> float:
    return sum(values) / len(values)


def _std(values) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def save(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """``<experiment>-<dataset>.json`` and ``.png`` in ``out_dir`` (JSON written atomically)."""
    return save_as(result, out_dir / f"{result['experiment']}-{result['dataset']}", plot)


def save_as(result: dict, stem: Path, plot_to) -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.png``, drawn by ``plot_to(result, path)``."""
    # the JSON goes through a temporary file so an interrupted run never leaves half a result
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    partial = json_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(json_path)
    plot_to(result, png_path)
    return json_path, png_path


def plot(result: dict, path: Path) -> None:
    require("matplotlib", "uhop").use("Agg")
    plt = require("matplotlib.pyplot", "uhop")

    kind, dataset = result["experiment"], result["dataset"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if kind == "loss_vs_error":
        losses = [r["loss"] for r in result["records"]]
        errors = [r["errors"]["uhop"] for r in result["records"]]
        ax.scatter(losses, errors, s=14)
        ax.set_xlabel("separation loss of the memory set (after Stage I)")
        ax.set_ylabel("sum-of-squares error")
    else:
        xlabel = {
            "capacity": "memory set size M",
            "noise": "noise level (||noise|| / ||pattern||)",
            "iterations": "Stage I iterations N",
        }[kind]
        for model, by_x in result["summary"].items():
            if model.startswith("uhop_over"):
                continue
            xs = sorted(by_x, key=float)
            mean = torch.tensor([by_x[x]["mean"] for x in xs])
            std = torch.tensor([by_x[x]["std"] for x in xs])
            at = [float(x) for x in xs]
            # A log axis: errors below PLOT_FLOOR (exact recalls) are drawn at it.
            line = ax.plot(
                at,
                mean.clamp(min=PLOT_FLOOR),
                marker="o",
                ms=3,
                label=model,
                lw=2.2 if model == "uhop" else 1.0,
            )[0]
            ax.fill_between(
                at,
                (mean - std).clamp(min=PLOT_FLOOR),
                (mean + std).clamp(min=PLOT_FLOOR),
                color=line.get_color(),
                alpha=0.12,
            )
        if kind == "iterations":  # the loss Stage I minimises, beside the error (Fig. 8)
            by_steps: dict = {}
            for rec in result["records"]:
                by_steps.setdefault(rec["steps"], []).append(rec["loss"])
            steps = sorted(by_steps)
            loss_axis = ax.twinx()
            loss_axis.plot(steps, [_mean(by_steps[n]) for n in steps], "k--", lw=1)
            loss_axis.set_ylabel("separation loss (dashed)")
        if kind in ("capacity", "iterations"):
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"sum-of-squares error, mean +- std (floor {PLOT_FLOOR:g})")
        ax.legend(fontsize=8)
    settings = result["settings"]
    ax.set_title(
        f"U-Hop {kind.replace('_', ' ')}: {dataset} (beta={settings.get('beta')}, "
        f"t={settings.get('t')})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
