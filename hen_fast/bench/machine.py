"""The machine's limits, measured in the run: read (CPU) or copy (GPU) bandwidth and matmul rates;
the timers; the memory and the names the report gives."""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_timer(target_s: float, min_runs: int = 3, max_runs: int = 20) -> Callable:
    """Milliseconds per call: one warm-up call, then the median of runs that fill ``target_s``
    (at least ``min_runs``, at most ``max_runs``)."""

    def measure(fn) -> float:
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        runs = max(min_runs, min(max_runs, int(target_s / max(first, 1e-9))))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return measure


def gpu_timer() -> Callable:
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")


def cpu_limits(measure, small: bool = False) -> dict:
    """The CPU's read bandwidth (bytes/s: the sum of a 256 MB float32 tensor) and its fp32 and bf16
    matmul rates (flop/s, 2048^3). ``small``: tiny sizes, to test the code."""
    n, size = (1 << 16, 64) if small else (1 << 26, 2048)
    data = torch.ones(n)  # written, so every page is mapped before timing
    read_ms = measure(lambda: data.sum())
    rates = {}
    for name in ("float32", "bfloat16"):
        a, b = (torch.randn(size, size).to(DTYPES[name]) for _ in range(2))
        rates[name] = 2 * size**3 / (measure(lambda a=a, b=b: a @ b) * 1e-3)
    return {
        "bandwidth_bytes_per_s": 4 * n / (read_ms * 1e-3),
        "bandwidth_how": f"sum of a {4 * n / 2**20:g} MiB float32 tensor, bytes read / time",
        "matmul_flops_per_s": rates,
        "matmul_how": f"{size}^3 matmul per dtype",
    }


def gpu_limits(device: str, measure) -> dict:
    """The GPU's copy bandwidth (bytes read + written per second, a 1 GiB float32 device-to-device
    copy) and bf16 tensor-core rate (flop/s, 8192^3); on the CPU (smoke) small float32 sizes."""
    n = (1 << 28) if device == "cuda" else (1 << 22)
    source = torch.empty(n, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_ms = measure(lambda: target.copy_(source))
    size = 8192 if device == "cuda" else 256
    matmul_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=matmul_dtype)
    b = torch.randn(size, size, device=device, dtype=matmul_dtype)
    matmul_ms = measure(lambda: a @ b)
    return {
        "bandwidth_bytes_per_s": 2 * 4 * n / (copy_ms * 1e-3),
        "bandwidth_how": f"device-to-device copy of {4 * n / 2**20:g} MiB, bytes read + written",
        "matmul_flops_per_s": {
            str(matmul_dtype).removeprefix("torch."): 2 * size**3 / (matmul_ms * 1e-3)
        },
        "matmul_how": f"{size}^3 matmul",
    }


def matmul_rate(limits: dict, dtype: str) -> float:
    """The bf16 rate for bf16 banks, the fp32 one otherwise (the one measured where only one is)."""
    rates = limits["matmul_flops_per_s"]
    if dtype == "bfloat16" and dtype in rates:
        return rates[dtype]
    return rates.get("float32", rates.get("bfloat16"))


def memory_bytes(field_name: str) -> int:
    """MemTotal or MemAvailable from /proc/meminfo (elsewhere: the physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def optional(module: str):
    """The module, or None when it is not installed (its column or plot is then left out)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
