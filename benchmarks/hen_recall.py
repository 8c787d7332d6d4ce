"""HEN's exact recall against raw pixels with the package defaults, on the demo's data and on
data no shipped model saw, from occluded cues (with and without ``known=``) and noisy cues.

    python benchmarks/hen_recall.py                # every data set, 500 memories (~4 minutes)
    python benchmarks/hen_recall.py --data photos --memories 200 --out /tmp/recall.json

Data (hen_fast.experiments.common.load_images): ``mnist`` and ``patches`` (the shipped models'
eval splits, as in ``hen-fast demo``) and held-out ``digits`` (scikit-learn's 8x8), ``faces``
(scikit-image's 25x25 LFW subset) and ``photos`` (32x32 patches of scikit-learn's two photos).
Each network is ``HopfieldEncodingNetwork(encoder)`` with its defaults; raw pixels work at the
images' own size. Cues: the lower 50% or 40% of the rows hidden (set to 0), recalled with and
without ``known``; Gaussian noise of std 0.2 and 0.3, clipped to [0, 1]. Exact: the recalled
memory is the stored image the cue came from. Untiled variants of the patch models (``tile=None``)
show what tiling gives. JSON to benchmarks/results/hen-recall-cpu-<date>.json, a plot beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hen_fast
from hen_fast import datasets, encoders
from hen_fast.bench.machine import machine_name
from hen_fast.encoders.shipped import DEFAULT_TILES
from hen_fast.experiments import common
from hen_fast.hen import HopfieldEncodingNetwork

RESULTS = Path(__file__).resolve().parent / "results"
DATA = ("mnist", "patches", "digits", "faces", "photos")
CUES = ("lower 50% + known", "lower 40% + known", "lower 50%", "lower 40%", "noise 0.2",
        "noise 0.3")


def networks_for(data: str, images: torch.Tensor):
    """(label, encoder) pairs: raw pixels, each shipped model for the data, the patch models
    untiled too (the tile models have no untiled form)."""
    present = set(encoders.available())
    pairs = [("pixels", common.load_encoder("identity", images))]
    for name in common.DATA_ENCODERS[data]:
        if name not in present:
            continue
        pairs.append((name, encoders.load(name)))
        if name in DEFAULT_TILES:
            pairs.append((f"{name} untiled", encoders.load(name, tile=None)))
    return pairs


def cues_for(images: torch.Tensor, seed: int):
    """(cue name, cues, known or None) for every CUES entry."""
    for name in CUES:
        if name.startswith("noise"):
            std = float(name.split()[1])
            yield name, datasets.add_noise(images, std, seed=seed + 1), None
        else:
            fraction = int(name.split()[1].rstrip("%")) / 100
            cues, known = datasets.mask_lower(images, fraction)
            yield name, cues, known if name.endswith("known") else None


def measure(data: str, memories: int, seed: int) -> list[dict]:
    images = common.load_images(data, min(memories, common.AVAILABLE[data]), seed)
    truth = torch.arange(images.shape[0])
    rows = []
    for label, encoder in networks_for(data, images):
        network = HopfieldEncodingNetwork(encoder, progress=False)
        network.store(images)
        for cue_name, cues, known in cues_for(images, seed):
            start = time.perf_counter()
            indices = network.recall_indices(cues, known=known)
            seconds = time.perf_counter() - start
            rows.append(dict(data=data, memories=images.shape[0], encoder=label, cue=cue_name,
                             exact=float((indices.cpu() == truth).float().mean()),
                             seconds=round(seconds, 3),
                             setting=dict(beta=network.beta, similarity=network.similarity,
                                          separation=network.separation,
                                          steps=network.steps)))  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: one line per data set and encoder, exact recall (%) per cue."""
    lines = ["| data | encoder | " + " | ".join(CUES) + " |",
             "|---|---|" + "---:|" * len(CUES)]  # fmt: skip
    seen: dict[tuple, dict] = {}
    for r in rows:
        seen.setdefault((r["data"], r["encoder"]), {})[r["cue"]] = r["exact"]
    for (data, encoder), exact in seen.items():
        cells = " | ".join(f"{100 * exact[c]:.1f}" for c in CUES)
        lines.append(f"| {data} | {encoder} | {cells} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    data_sets = list(dict.fromkeys(r["data"] for r in rows))
    figure, axes = plt.subplots(len(data_sets), 1, figsize=(11, 2.6 * len(data_sets)),
                                squeeze=False)  # fmt: skip
    for axis, data in zip(axes[:, 0], data_sets):
        mine = [r for r in rows if r["data"] == data]
        labels = list(dict.fromkeys(r["encoder"] for r in mine))
        width = 0.8 / len(labels)
        for position, label in enumerate(labels):
            exact = {r["cue"]: r["exact"] for r in mine if r["encoder"] == label}
            axis.bar([i + position * width for i in range(len(CUES))],
                     [100 * exact[c] for c in CUES], width, label=label)  # fmt: skip
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(CUES))], CUES, fontsize=8)
        axis.set_ylabel("exact recall (%)")
        axis.set_ylim(0, 105)
        axis.set_title(f"{data} ({mine[0]['memories']} memories)", fontsize=9)
        axis.legend(fontsize=7, loc="lower left", ncol=len(labels))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    parser.add_argument("--memories", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="print a results file's table")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())["rows"]))
        return
    rows = []
    for data in tqdm(args.data, desc="hen-recall"):
        rows += measure(data, args.memories, args.seed)
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"hen-recall-cpu-{date}.json"
    record = dict(date=date, cpu=machine_name("cpu"), hen_fast=hen_fast.__version__,
                  torch=torch.__version__, python=platform.python_version(),
                  threads=torch.get_num_threads(), command="python benchmarks/hen_recall.py",
                  rows=rows)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
