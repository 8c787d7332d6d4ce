"""Where the cpu backend's one-pass kernel stops beating its tiled BLAS path (and the torch
backend): the measurement behind ``most_queries`` in csrc/cpu/onepass_step.cpp and ``auto_check`` in
hen_fast/backends/cpu.py.

    python benchmarks/crossover_cpu.py                      # the default grid, about 10 minutes
    python benchmarks/crossover_cpu.py --M 2e5 --B 256 1024 --cases dot/softmax --isas avx2
    python benchmarks/crossover_cpu.py --quick --out /tmp/crossover.json

Every case (M, bank dtype, similarity/separation, B) times backend "cpu" forced onto each path
(HEN_FAST_CPU_PATH=onepass / tiled), under each instruction set asked for (HEN_FAST_CPU_ISA; the
tiled path's BLAS is the same under all), and backend "torch", interleaved, median of --runs after a
warm-up; d = 128, beta 0.05 for softmax and polynomial, 1 for sparsemax / entmax. It prints a line a
case and writes JSON (default benchmarks/results/cpu-crossover-<date>.json) with the CPU's model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hen_fast
from hen_fast.backends import cpu
from hen_fast.bench.machine import machine_name

DEFAULT_CASES = ("dot/softmax", "l2/softmax", "manhattan/softmax", "dot/sparsemax", "dot/entmax")


def _grid(args) -> list[tuple]:
    if args.quick:
        return [(2e4, "float32", "dot/softmax", b) for b in (1, 64)]
    grid = []
    for m in args.M:
        for dtype in args.dtypes:
            for case in args.cases:
                grid += [(m, dtype, case, b) for b in args.B]
    return grid


def _seconds(fn, env: dict) -> float:
    """One call of fn under the environment variables env, in seconds."""
    os.environ.update(env)
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        for key in env:
            del os.environ[key]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--M", type=float, nargs="+", default=[1e6])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--isas", nargs="+", default=None,
                        help="instruction sets for the one-pass path (default: this CPU's widest)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch backend")
    parser.add_argument("--quick", action="store_true", help="two tiny cases, to test the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not cpu.load_extension():
        raise SystemExit(f"the C++ extension is not built: {cpu.load_error()}")
    isas = args.isas or [cpu.instruction_sets()[-1].replace("amx", "avx512")]
    day = datetime.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"cpu-crossover-{day}.json"
    rows = []
    for m, dtype, case, b in tqdm(_grid(args), desc="cases"):
        similarity, separation = case.split("/")
        generator = torch.Generator().manual_seed(0)
        keys = torch.randn(int(m), 128, generator=generator).div_(128**0.5)
        keys = keys.to(getattr(torch, dtype))
        queries = torch.randn(b, 128, generator=generator).div_(128**0.5)
        beta = 0.05 if separation in ("softmax", "polynomial") else 1.0

        def call(backend, queries=queries, keys=keys, beta=beta, sim=similarity, sep=separation):
            return hen_fast.retrieve(queries, keys, beta=beta, similarity=sim, separation=sep,
                                     backend=backend)  # fmt: skip

        contenders = {
            f"onepass-{isa}": ("cpu", {"HEN_FAST_CPU_PATH": "onepass", "HEN_FAST_CPU_ISA": isa})
            for isa in isas
        }
        contenders["tiled"] = ("cpu", {"HEN_FAST_CPU_PATH": "tiled"})
        if not args.no_torch:
            contenders["torch"] = ("torch", {})
        times = {name: [] for name in contenders}
        for run in range(1 + args.runs):  # a warm-up, then interleaved: drift hits all alike
            for name, (backend, env) in contenders.items():
                seconds = _seconds(lambda backend=backend: call(backend), env)
                if run:
                    times[name].append(seconds)
        medians = {name: 1e3 * statistics.median(v) for name, v in times.items()}
        row = {"M": int(m), "dtype": dtype, "similarity": similarity, "separation": separation,
               "B": b, "d": 128, "ms": medians}  # fmt: skip
        rows.append(row)
        tqdm.write(f"M={int(m):>8} {dtype:8} {case:18} B={b:<5} "
                   + "  ".join(f"{k} {v:8.1f}" for k, v in row["ms"].items()))  # fmt: skip
    record = {
        "date": day,
        "cpu": machine_name("cpu"),
        "instruction_set": cpu.instruction_set(),
        "threads": torch.get_num_threads(),
        "versions": {"hen_fast": hen_fast.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},  # fmt: skip
        "unit": "ms, median",
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
