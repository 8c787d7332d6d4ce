"""What the CPU benchmarks share: each times a table of named expressions (grouped, the first of
each group the baseline) in one run, records the peak extra memory measured in a fresh process,
and prints time and memory as ratios to the baseline."""

from __future__ import annotations

import platform

import torch

import hen_fast


def machine() -> dict:
    """Versions and the machine, for every record."""
    return dict(
        torch=torch.__version__,
        hen_fast=hen_fast.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
    )


def time_case(benchmark, name, group, expression, inputs, peak_bytes, rounds, warmup, **info):
    """Times ``expression`` (evaluated in ``inputs``) under pytest-benchmark; returns the median
    in seconds."""
    compiled = compile(expression, name, "eval")
    benchmark.group = group
    benchmark.extra_info.update(info, peak_extra_mib=peak_bytes / 2**20, **machine())
    benchmark.pedantic(eval, args=(compiled, inputs), rounds=rounds, warmup_rounds=warmup)
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_ms"] = 1e3 * median
    return median


def print_ratios(title: str, cases: dict, times: dict, peaks: dict) -> None:
    """One line per timed case: ms, time and peak memory relative to its group's first case."""
    if not times:
        return
    width = max(len(name) for name in cases)
    print(f"\n{title}; ratios to the first case of each group")
    print(f"  {'case':{width}s} {'ms':>9s} {'time':>6s} {'peak MiB':>9s} {'memory':>7s}")
    for name, (group, _) in cases.items():
        base = next(n for n, (g, _) in cases.items() if g == group)
        if name in times:
            print(
                f"  {name:{width}s} {1e3 * times[name]:9.1f} {times[name] / times[base]:6.2f} "
                f"{peaks[name] / 2**20:9.1f} {peaks[name] / max(1, peaks[base]):7.3f}"
            )
