"""``hen-fast bench``: hen_fast's retrieval timed beside its baselines and against this machine's
measured limits, in one run.

    hen-fast bench                     # the GPU sweep where CUDA is available, else the CPU sweep
    hen-fast bench --quick             # a tiny sweep, well under a minute
    hen-fast bench --B 1 16 --M 1e6 --similarities dot --minutes 3
    hen-fast bench --smoke --out /tmp/bench.json   # tiny shapes on the CPU, to test the command

First the machine's limits: on the CPU the read bandwidth (the sum of a 256 MB float32 tensor) and
the fp32 and bf16 matmul rates (2048^3; torch uses AMX where the CPU has it); on a GPU the copy
bandwidth (device-to-device, bytes read + written) and the bf16 tensor-core rate (8192^3). Then, for
every case (B, M, d, bank dtype, similarity, separation), in the same run: hen_fast with backend
"auto" and each backend that applies (CPU: cpu, torch; GPU: triton, cuda) and the baselines: torch
eager, ``softmax(beta sim(X, K)) K`` on the case's bank dtype (for sparsemax/entmax the entmax
package's), ``torch.compile`` of it (dense separations; the compile time is reported, not timed),
SDPA on a GPU, and FAISS IndexFlatIP / IndexFlatL2 top-1 search on the CPU when faiss is installed.
A time is the median of several runs after a warm-up (CPU: time.perf_counter; GPU:
triton.testing.do_bench).

The default CPU sweep: d = 128, M = 1e5, 1e6 and 1e7, B = 1 to 4096, dot and l2 softmax on float32
banks, sparsemax and bfloat16 banks at a few points; the GPU sweep is the one the H200 run used.
Any of --B, --M, --d, --dtypes, --similarities, --separations sweeps the product of the given
values with the default grid's others. Cases run cheapest first; a case that would end past
--minutes is skipped and counted, and so is one whose bank does not fit in half the RAM (60% of
the GPU's memory); a CPU baseline whose scores would not fit in half the free memory is left out.

Each case reports hen_fast's ratio to each baseline (baseline time / hen_fast auto's time; > 1:
hen_fast is faster) and every contender's fraction of the limit, ``T_min / T`` with
``T_min = max(bytes / bandwidth, flops / matmul rate)``, bytes = the bank read once (the keys are
the values) + queries + output, flops = ``2 B M (d + dv)`` (the bf16 rate for bf16 banks, the fp32
rate otherwise; a GPU run measures the bf16 rate only and uses it for every dtype). It writes JSON
(default ``benchmarks/results/<device>-<date>.json``) and, with matplotlib, a PNG beside it.

Only torch and tqdm are imported here at module level (the core install); matplotlib, faiss, entmax
and triton are imported when used, and a missing one drops its column or plot, said in the output.
``benchmarks/bench_retrieve_gpu.py`` runs this module with the GPU sweep's defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from .cases import (
    BACKENDS,
    SEPARATIONS,
    SIMILARITIES,
    Case,
    Setup,
    eager,
    plan,
    run_case,
    sdpa,
    t_min_s,
)
from .machine import (
    DTYPES,
    cpu_limits,
    cpu_timer,
    gpu_limits,
    gpu_timer,
    machine_name,
    matmul_rate,
    optional,
)
from .report import case_table, finite, label, plot, versions
from .sweep import compile_limits, run_sweep

__all__ = [
    "Case",
    "case_table",
    "cpu_limits",
    "eager",
    "gpu_limits",
    "main",
    "matmul_rate",
    "plan",
    "run",
    "run_case",
    "sdpa",
    "t_min_s",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="which sweep: auto = the GPU one where CUDA is available, else the CPU one",
    )
    parser.add_argument("--B", type=int, nargs="+", help="numbers of queries")
    parser.add_argument("--M", type=float, nargs="+", help="numbers of memories (1e6 is fine)")
    parser.add_argument("--d", type=int, nargs="+", help="dimensions")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="bank dtypes")
    parser.add_argument("--similarities", nargs="+", choices=SIMILARITIES)
    parser.add_argument("--separations", nargs="+", choices=list(SEPARATIONS))
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("auto", "cpu", "torch", "triton", "cuda"),
        help="hen_fast backends to time (default: auto and the device's backends)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget (default 10, --quick 0.5): cases that would end past it are skipped "
        "and counted",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path, the PNG beside it (default benchmarks/results/<device>-<date>.json; "
        "--smoke: a temporary folder)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a tiny sweep, well under a minute")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU, to test the command (the GPU sweep's kernels through "
        "TRITON_INTERPRET=1); its times mean nothing",
    )


def add_commands(commands) -> None:
    """The ``hen-fast bench`` subcommand (hen_fast.cli)."""
    parser = commands.add_parser(
        "bench",
        help="time retrieval beside torch eager, torch.compile, entmax and FAISS, against the "
        "machine's measured bandwidth and matmul rate",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def build_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(**kwargs)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(prog="python -m hen_fast.bench", description=__doc__.split("\n\n")[0])
    return run(parser.parse_args(argv))


def bad_arguments(args) -> str | None:
    for axis in ("B", "M", "d"):
        values = getattr(args, axis) or ()
        if any(v < 1 or v != int(v) for v in values):
            return f"--{axis} takes positive whole numbers, got {' '.join(map(str, values))}"
    return None if args.minutes is None or args.minutes > 0 else "--minutes must be positive"


def make_setup(args, kind: str, device: str) -> tuple[Setup, list[str]]:
    """What the sweep runs with, and the notes that say what is left out and why."""
    from hen_fast.backends import cpu as cpu_backend

    setup = Setup(kind, device, args.smoke, args.quick, tuple(args.backends or BACKENDS[kind]))
    setup.target_s = 0.0 if args.smoke else 0.3 if args.quick else 1.0
    if args.smoke:  # one warm-up call and one timed call: the smoke run checks the code only
        setup.measure = cpu_timer(0.0, min_runs=1)
    else:
        setup.measure = gpu_timer() if device == "cuda" else cpu_timer(setup.target_s)
    setup.entmax = optional("entmax")
    setup.faiss = optional("faiss") if kind == "cpu" else None
    notes = []
    if setup.entmax is None:
        notes.append("entmax not installed: no baseline for sparsemax/entmax (pip install entmax)")
    if kind == "gpu":
        notes.append("FAISS is timed in the CPU sweep only")
    elif setup.faiss is None:
        notes.append("faiss not installed: no FAISS column (pip install faiss-cpu)")
    if args.quick:
        notes.append("--quick: torch.compile skipped (one compile takes 10-20 s on a CPU)")
    if args.smoke:
        notes.append(
            "--smoke: one run per contender, torch.compile only traces; times mean nothing"
        )
    if "cpu" in setup.backends and not cpu_backend.load_extension():
        notes.append(f"no C++ kernels, so no cpu backend: {cpu_backend.load_error()}")
    return setup, notes


def default_out(args, name: str, date: str) -> Path:
    if args.out is not None:
        return args.out
    if args.smoke:
        return Path(tempfile.mkdtemp(prefix="hen-fast-bench-")) / "smoke.json"
    stem = re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") + f"-{date}"
    return Path("benchmarks/results") / (stem + ("-quick" if args.quick else "") + ".json")


def run(args) -> int:
    """The command: limits, then the sweep, then the JSON and the PNG."""
    problem = bad_arguments(args)
    if problem:
        print(f"hen-fast bench: {problem}", file=sys.stderr)
        return 2
    if args.minutes is None:
        args.minutes = 0.5 if args.quick else 10.0
    cuda = torch.cuda.is_available()
    kind = args.device if args.device != "auto" else "gpu" if cuda and not args.smoke else "cpu"
    if kind == "gpu" and not cuda and not args.smoke:
        print(
            "hen-fast bench: no CUDA device; --smoke tests the GPU sweep on the CPU",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if kind == "gpu" and not args.smoke else "cpu"
    if kind == "gpu" and device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
    from hen_fast.backends import cpu as cpu_backend

    setup, notes = make_setup(args, kind, device)
    matplotlib = optional("matplotlib")
    if matplotlib is None:
        notes.append("matplotlib not installed: no PNG (pip install matplotlib)")
    name, date = machine_name(device), datetime.date.today().isoformat()
    out = default_out(args, name, date)
    isa = cpu_backend.instruction_set()
    print(
        f"hen-fast bench: {kind} sweep on {name} ({device}, {torch.get_num_threads()} threads, "
        f"CPU instruction set {isa or 'n/a: no C++ kernels'}), budget {args.minutes:g} min"
    )
    for note in notes:
        print(f"  note: {note}")
    deadline = time.monotonic() + 60 * args.minutes
    if kind == "gpu":
        limits = gpu_limits(device, setup.measure)
    else:
        limits = cpu_limits(setup.measure, small=args.smoke)
    rates = ", ".join(
        f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in limits["matmul_flops_per_s"].items()
    )
    print(
        f"  limits: bandwidth {limits['bandwidth_bytes_per_s'] / 1e9:.4g} GB/s "
        f"({limits['bandwidth_how']}); matmul {rates} ({limits['matmul_how']})\n"
    )
    result = {
        "device": name,
        "kind": kind,
        "compute_device": device,
        "instruction_set": isa,
        "threads": torch.get_num_threads(),
        "date": date,
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "versions": versions(setup),
        "limits": limits,
        "notes": notes,
        "skipped_counts": {},
        "skipped": [],
        "records": [],
    }
    if device == "cuda":
        result["compute_capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Writes the JSON as it stands, after every case: a run stopped early keeps its cases."""
        counts = result["skipped_counts"] = {}
        for entry in result["skipped"]:
            reason = entry["reason"].split(":")[0]
            counts[reason] = counts.get(reason, 0) + 1
        out.write_text(json.dumps(finite(result), indent=1, allow_nan=False))

    records, skipped = result["records"], result["skipped"]
    with compile_limits(setup):
        run_sweep(setup, plan(args, kind), limits, deadline, records, skipped, save)
    save()
    png = out.with_suffix(".png")
    drawn = matplotlib is not None and plot(records, png, matplotlib)
    for entry in skipped:
        if entry["reason"] != "budget":
            print(f"skipped {label(entry)}: {entry['reason']}")
    for record in records:
        for name, ms in {**record["hen_fast"], **record["baselines"]}.items():
            if isinstance(ms, str) and ms.startswith("error"):
                print(f"{name} failed on {label(record)}: {ms}", file=sys.stderr)
    counted = ", ".join(f"{n} {why}" for why, n in result["skipped_counts"].items()) or "none"
    print(f"{len(records)} cases timed, skipped: {counted}; JSON: {out}")
    if drawn:
        print(f"PNG: {png}")
    else:
        print("no PNG: " + ("no case timed" if matplotlib else "matplotlib not installed"))
    return 0
