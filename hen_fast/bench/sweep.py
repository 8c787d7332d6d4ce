"""The sweep: the order of the cases (few queries first), banks shared between cases, the time
budget (cost estimates that learn from the cases timed) and the memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from tqdm import tqdm

from .cases import Case, Setup, make_bank, run_case, t_min_s
from .machine import memory_bytes
from .report import case_table

# What one torch.compile of the eager baseline costs, roughly (seconds): a CPU recompiles a case
# with dynamic shapes, a GPU compiles each shape.
COMPILE_GUESS_S = {"cpu": 5.0, "cuda": 20.0}


def estimate_s(setup: Setup, case: Case, limits: dict) -> float:
    """A rough guess of the case's wall time, to order the sweep and keep it within its budget:
    a few times T_min per call (more for sparse separations and manhattan), times the calls."""
    slowdown = 3 * (1 if case.dense else 3) * (10 if case.similarity == "manhattan" else 1)
    t = slowdown * t_min_s(case, limits)[0]
    contenders = len(setup.backends) + (3 if case.dense else 2)
    if setup.device == "cuda":  # do_bench: 5 estimating calls, then warm-up and repetitions
        per_contender = 0.06 + 7 * t
    else:
        per_contender = t + max(3 * t, min(20 * t, setup.target_s))
    compiling = 0.0
    if case.dense and not (setup.quick or setup.smoke):  # a GPU compiles every shape anew
        compiling = COMPILE_GUESS_S[setup.device]
    return contenders * per_contender + compiling


def does_not_fit(setup: Setup, case: Case) -> str | None:
    """Why the case's bank cannot be held here, or None."""
    if setup.device == "cuda":
        need = case.bank_bytes + 2 * case.B * case.d * 4
        total = torch.cuda.get_device_properties(0).total_memory
        return None if need < 0.6 * total else "memory: the bank does not fit in 60% of the GPU"
    half = memory_bytes("MemTotal") // 2
    if case.bank_bytes > half:
        return (
            f"memory: the bank ({case.bank_bytes / 2**30:.1f} GiB) does not fit in half the RAM "
            f"({half / 2**30:.1f} GiB)"
        )
    return None


class Banks:
    """The banks in use, generated once and kept while they fit in ``cap`` bytes (the newest one
    always), so cases that share a bank do not draw it again."""

    def __init__(self, device: str, cap: int):
        self.device, self.cap, self.held = device, cap, {}

    def get(self, case: Case) -> torch.Tensor:
        key = (case.M, case.d, case.dtype)
        if key in self.held:
            self.held[key] = self.held.pop(key)  # most recently used last
            return self.held[key]
        while self.held and sum(b.nbytes for b in self.held.values()) + case.bank_bytes > self.cap:
            del self.held[next(iter(self.held))]
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.held[key] = make_bank(case.M, case.d, case.dtype, self.device)
        return self.held[key]


def priority(case: Case, estimate: float) -> tuple:
    """Few queries first, since they are what hen_fast is for: the plot's B = 1 and 16, then the
    other B <= 64, then the rest; within each, bank by bank from the smallest (so each bank is
    drawn once per group), cheapest first. A case too costly for the budget is skipped and the
    cheaper ones after it still run."""
    group = 0 if case.B in (1, 16) else 1 if case.B <= 64 else 2
    return (group, case.M, case.d, case.dtype, estimate)


def run_sweep(
    setup: Setup,
    cases: list[Case],
    limits: dict,
    deadline: float,
    records: list,
    skipped: list,
    save: Callable[[], None],
) -> None:
    """Times the cases in the order of :func:`priority` into ``records``; those past the budget
    or the memory go to ``skipped`` with the reason. ``save`` is called after each timed case."""
    estimates = {case: estimate_s(setup, case, limits) for case in cases}
    ordered = sorted(cases, key=lambda case: priority(case, estimates[case]))
    cap = 0 if setup.device == "cuda" else int(0.35 * memory_bytes("MemTotal"))
    banks, learned = Banks(setup.device, cap), []
    for case in tqdm(ordered, desc="cases", disable=None):
        # Learned from finished cases: how far the guess was off on this machine.
        correction = statistics.median(learned) if learned else 1.0
        reason = does_not_fit(setup, case)
        if reason is None and time.monotonic() + correction * estimates[case] > deadline:
            reason = "budget"
        if reason is not None:
            skipped.append({**asdict(case), "reason": reason})
            continue
        start = time.monotonic()
        records.append(run_case(setup, case, banks.get(case), limits, deadline))
        if estimates[case] >= 1.0:
            learned.append((time.monotonic() - start) / estimates[case])
        tqdm.write(case_table(records[-1]) + "\n")
        save()


def compile_limits(setup: Setup):
    """Lets torch.compile hold a graph per case: past dynamo's recompile limit (8) it would fall
    back to eager silently, and the torch_compile column would time eager."""
    import contextlib

    if setup.quick:
        return contextlib.nullcontext()
    import torch._dynamo.config as config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: 256})
