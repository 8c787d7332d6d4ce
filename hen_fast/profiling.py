"""Measuring what a computation costs on the CPU, for benchmarks and tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_MEASURE = """
import json, re
def _resident(field):
    with open("/proc/self/status") as status:
        return 1024 * int(re.search(field + r":\\s+(\\d+) kB", status.read()).group(1))
def _peak_extra(run, warmup):
    if warmup:
        run()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _resident("VmRSS")
    run()
    return _resident("VmHWM") - before
"""


def peak_extra_bytes(
    setup: str, statements: list[str], *, warmup: bool = True, timeout: float = 600
) -> list[int]:
    """Peak resident memory each expression in ``statements`` adds after ``setup``, measured one
    after the other in a fresh Python process.

    The inputs made by ``setup`` do not count; what an expression allocates at its peak does. Each
    runs once first (``warmup``) so one-time allocations (thread pools, library workspaces) are
    not charged to it. glibc is told to map every block over 64 KiB separately, so freed memory
    goes back to the system and the kernel's peak counter sees each allocation. Linux only.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        raise OSError("peak_extra_bytes needs Linux's /proc/self/clear_refs")
    runs = ", ".join(f"lambda: ({statement})" for statement in statements)
    code = (
        _MEASURE
        + textwrap.dedent(setup)
        + (f"\nprint(json.dumps([_peak_extra(run, {warmup}) for run in [{runs}]]))\n")
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measured statements failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])
