"""Out-of-core streaming throughput against in-memory retrieval.

For a bank of M memories (float32) and B queries, times ``hen_fast.retrieve``:

* ``in-memory``: the whole bank as one tensor (the backend's own tiling);
* ``memory_cap``: the same tensor streamed in chunks of a quarter of the bank (merge overhead);
* ``mmap``: a saved MemoryBank loaded with ``mmap=True`` and streamed in chunks of the same size
  (the page cache is warm after the first repeat, so this is the streaming path, not the disk).

Prints a table, writes ``benchmarks/results/streaming-<date>.json`` (machine, versions) and a PNG.
Run: ``python benchmarks/bench_streaming.py [--M 200000 --d 128 --B 16 --repeats 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import hen_fast
from hen_fast import MemoryBank

RESULTS = Path(__file__).parent / "results"


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: extension load, page cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--M", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--separations", default="softmax,sparsemax,entmax")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(args.M, args.d, generator=gen)
    queries = keys[: args.B] + 0.3 * torch.randn(args.B, args.d, generator=gen)
    bank_bytes = keys.numel() * 4
    cap = bank_bytes // 4 + 1
    records = []
    with tempfile.TemporaryDirectory() as folder:
        path = MemoryBank(keys).save(Path(folder) / "bank.safetensors")
        mapped = MemoryBank.load(path, mmap=True)
        for separation in args.separations.split(","):
            kwargs = dict(beta=0.1, similarity="dot", separation=separation)
            cases = {
                "in-memory": lambda kw=kwargs: hen_fast.retrieve(queries, keys, **kw),
                "memory_cap": lambda kw=kwargs: hen_fast.retrieve(
                    queries, keys, memory_cap=cap, **kw
                ),
                "mmap": lambda kw=kwargs: hen_fast.retrieve(queries, mapped, memory_cap=cap, **kw),
            }
            reference = hen_fast.retrieve(queries, keys, **kwargs)
            for name, fn in cases.items():
                error = float((fn() - reference).abs().max() / reference.abs().max())
                seconds = best_time(fn, args.repeats)
                records.append(
                    dict(separation=separation, case=name, seconds=seconds,
                         bank_gb_per_s=bank_bytes / seconds / 1e9, rel_err_vs_in_memory=error)
                )  # fmt: skip
                print(f"{separation:10s} {name:11s} {seconds * 1e3:9.1f} ms "
                      f"{bank_bytes / seconds / 1e9:6.2f} GB/s  err {error:.1e}")  # fmt: skip
    date = datetime.date.today().isoformat()
    out = dict(
        benchmark="streaming",
        date=date,
        shape=dict(M=args.M, d=args.d, B=args.B, dtype="float32", chunk_bytes=cap),
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            load_average=os.getloadavg(),
        ),  # fmt: skip
        versions=dict(torch=torch.__version__, hen_fast=hen_fast.__version__),
        backends=list(hen_fast.available_backends("cpu")),
        records=records,
    )
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"streaming-{date}.json"
    target.write_text(json.dumps(out, indent=2))
    _plot(records, RESULTS / f"streaming-{date}.png", args)
    print(f"wrote {target}")


def _plot(records, target: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    separations = list(dict.fromkeys(r["separation"] for r in records))
    cases = list(dict.fromkeys(r["case"] for r in records))
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        rate = {r["separation"]: r["bank_gb_per_s"] for r in records if r["case"] == case}
        heights = [rate[s] for s in separations]
        axis.bar([j + i * width for j in range(len(separations))], heights, width, label=case)
    axis.set_xticks([j + width * (len(cases) - 1) / 2 for j in range(len(separations))])
    axis.set_xticklabels(separations)
    axis.set_ylabel("bank read rate (GB/s)")
    axis.set_title(f"retrieve, M={args.M} d={args.d} B={args.B} float32, chunks of a quarter bank")
    axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
