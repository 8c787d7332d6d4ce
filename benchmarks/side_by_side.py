"""What the CPU benchmarks share: each times a table of named expressions (grouped, the first of
each group the baseline) in one run, records the peak extra memory measured in a fresh process,
and prints time and memory as ratios to the baseline."""

from __future__ import annotations

import platform

import torch

import hen_fast
from hen_fast.profiling import peak_extra_bytes


def machine() -> dict:
    """Versions and the machine, for every record."""
    return dict(
        torch=torch.__version__,
        hen_fast=hen_fast.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
    )


class SideBySide:
    """One benchmark module's table: ``cases`` maps a name to (group, expression evaluated in the
    namespace ``setup`` builds); collects each case's time and peak extra memory for the ratios
    printed at the end."""

    def __init__(self, setup: str, cases: dict):
        self.setup, self.cases = setup, cases
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}

    def prepare(self) -> dict:
        """Measures every case's peak extra memory (each in a fresh process, once per module) and
        returns the namespace the timed expressions run in."""
        expressions = [expression for _, expression in self.cases.values()]
        self.peaks.update(zip(self.cases, peak_extra_bytes(self.setup, expressions)))
        namespace: dict = {}
        exec(self.setup, namespace)
        return namespace

    def time(self, benchmark, name, inputs, rounds, warmup, **info) -> None:
        """Times case ``name`` (evaluated in ``inputs``) under pytest-benchmark and keeps the
        median in seconds."""
        group, expression = self.cases[name]
        compiled = compile(expression, name, "eval")
        benchmark.group = group
        benchmark.extra_info.update(info, peak_extra_mib=self.peaks[name] / 2**20, **machine())
        benchmark.pedantic(eval, args=(compiled, inputs), rounds=rounds, warmup_rounds=warmup)
        if benchmark.stats is None:  # --benchmark-disable: the case ran once, untimed
            return
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = 1e3 * median
        self.times[name] = median

    def print_ratios(self, title: str) -> None:
        """One line per timed case: ms, time and peak memory relative to its group's first case."""
        times, peaks = self.times, self.peaks
        if not times:
            return
        width = max(len(name) for name in self.cases)
        print(f"\n{title}; ratios to the first case of each group")
        print(f"  {'case':{width}s} {'ms':>9s} {'time':>6s} {'peak MiB':>9s} {'memory':>7s}")
        for name, (group, _) in self.cases.items():
            base = next(n for n, (g, _) in self.cases.items() if g == group)
            if name in times:
                print(
                    f"  {name:{width}s} {1e3 * times[name]:9.1f} {times[name] / times[base]:6.2f} "
                    f"{peaks[name] / 2**20:9.1f} {peaks[name] / max(1, peaks[base]):7.3f}"
                )
