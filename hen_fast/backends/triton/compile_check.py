"""Compile every Triton kernel, in each variant the backend launches on a GPU, to a cubin for
Hopper (sm_90) and Ampere (sm_80): no GPU needed. The interpreter runs kernels as Python and misses
what only the compiler checks (tl.dot operand types, globals that are not constexpr, shared-memory
budgets), so CI runs this too.

    python -m hen_fast.backends.triton.compile_check          # the representative variants (CI)
    python -m hen_fast.backends.triton.compile_check --all    # every dtype x separation x arch

Every kernel of the backend (each ``*_kernel`` of its modules: the forward passes, the backward
kernels, the separation-loss kernel) is compiled at least once; :func:`missing_kernels` says
which are not. Each variant prints one JSON line with its shared memory and, where cuobjdump is
at hand (triton ships one), its registers per thread and stack (local) bytes: a stack above 0
means spills.

Must run without TRITON_INTERPRET=1 (then @triton.jit gives compilable functions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

INT_POINTERS = {"active_ptr", "part_count_ptr", "part_index_ptr", "cand_index_ptr",
                "cand_count_ptr"}
DATA_POINTERS = {"x_ptr", "k_ptr", "v_ptr"}
FLOAT_SCALARS = {"beta", "degree", "alpha", "alpha_minus_1", "q", "scale", "q_minus_1", "t"}
POINTER_TYPES = {"arg_ptr": "*i64", "z_ptr": "*fp32"}  # the separation loss's argmax, features
MODULES = ("dense", "sparse", "stats", "backward", "separation_loss")
SHARED_MEMORY = {90: 227 * 1024, 80: 163 * 1024}


def compile_kernel(kernel, constants, data="bf16", arch=90, num_warps=4, num_stages=2):
    """Compile to a cubin; returns (bytes of shared memory it needs, the cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in POINTER_TYPES:
            signature[name] = POINTER_TYPES[name]
        elif name in DATA_POINTERS:
            signature[name] = f"*{data}"
        elif name in INT_POINTERS:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin")
    if compiled.metadata.shared > SHARED_MEMORY[arch]:
        raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory")
    return compiled.metadata.shared, compiled.asm["cubin"]


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nvidia

    shipped = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return shipped if os.path.exists(shipped) else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes of a cubin (cuobjdump's resource usage), or {}."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        done = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True,
                              text=True)
    found = {key.lower(): int(value)
             for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", done.stdout)}
    return {"registers": found["reg"], "stack_bytes": found.get("stack", 0)} if found else {}


def all_kernels() -> dict:
    """Every Triton kernel of the backend, by ``module.name``."""
    import importlib

    found = {}
    for module_name in MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "params"):
                found[f"{module_name}.{name}"] = value
    return found


def kernel_name(kernel) -> str:
    return f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}"


def missing_kernels(everything: bool = False) -> set:
    """The kernels no variant compiles (empty when compile_check covers the backend)."""
    covered = {kernel_name(variant[1]) for variant in variants(everything)}
    return set(all_kernels()) - covered


def variants(everything: bool = False):
    """(name, kernel, constants, data dtype, arch, num_warps, num_stages) for the launch forms:
    every similarity x separation in bf16 on sm_90, one of each for the other dtypes and sm_80
    (``everything``: all of them, about 3 minutes)."""
    from . import _common, backward, dense, separation_loss, sparse, stats

    biggest = _common.TUNED[-1]  # the autotuner's config with the most registers and memory
    tuned = dict(biggest.kwargs)

    def tiles(similarity, data):  # as retrieve.launch_config chooses them on a GPU
        block_b, block_d = (16, 4) if similarity == 2 else (64, 64)
        return dict(BLOCK_B=block_b, BLOCK_D=block_d, DOT_F32=data == "fp32", PRECISION="ieee")

    for arch in (90, 80):
        for data in ("bf16", "fp16", "fp32"):
            for sep in (_common.SOFTMAX, _common.POLYNOMIAL, dense.ENTMAX_WITH_TAU):
                for sim in (0, 1, 2):
                    representative = arch == 90 and data == "bf16" or sep == _common.SOFTMAX and (
                        data != "fp16" or sim == 0)
                    if not (everything or representative):
                        continue
                    yield (f"dense sm{arch} {data} sep{sep} sim{sim}", dense._dense_pass_kernel,
                           dict(tiles(sim, data), SIM=sim, SEP=sep, Q_KIND=0, SAME_KV=False,
                                BLOCK_DV=128, **tuned), data, arch, biggest.num_warps,
                           biggest.num_stages)
    for data in ("bf16", "fp16"):  # 16-bit banks only: see dense_pass
        for sim in (0, 1):
            yield (f"dense same-kv {data} sim{sim}", dense._dense_pass_kernel,
                   dict(tiles(sim, data), SIM=sim, SEP=_common.SOFTMAX, Q_KIND=1, SAME_KV=True,
                        BLOCK_DV=256, **tuned), data, 90, biggest.num_warps, biggest.num_stages)
    for sep in (_common.SOFTMAX, _common.POLYNOMIAL, dense.ENTMAX_WITH_TAU):
        yield (f"combine sep{sep}", dense._combine_kernel,
               dict(SEP=sep, BLOCK_S=64, BLOCK_DV=128), "fp32", 90, 4, 2)
    for sim in (0, 2):
        for newton, q_kind, q1_kind in ((False, 1, 3), (True, 1, 3), (True, 2, 1), (True, 0, 0)):
            yield (f"stats sim{sim} newton{int(newton)} q{q_kind}", stats._threshold_stats_kernel,
                   dict(tiles(sim, "bf16"), SIM=sim, NEWTON=newton, Q_KIND=q_kind,
                        Q1_KIND=q1_kind, **tuned), "bf16", 90, biggest.num_warps,
                   biggest.num_stages)
    for data in ("bf16", "fp32"):
        for sim in (0, 1, 2):
            yield (f"candidates {data} sim{sim}", sparse._candidates_kernel,
                   dict(tiles(sim, data), SIM=sim, BLOCK_M=64), data, 90, 4, 2)
    for q_kind in (0, 1, 2):
        yield (f"gather q{q_kind}", sparse._gather_kernel,
               dict(Q_KIND=q_kind, BLOCK_C=32, BLOCK_DV=128), "bf16", 90, 4, 2)
    yield from _backward_variants(backward, tiles, everything)
    # The separation loss as triton_row_stats launches it: the loss and gradient, the max loss.
    for arch, want_sum, want_acc in ((90, True, True), (80, True, True), (90, False, False)):
        yield (f"pair-stats sm{arch} sum{int(want_sum)} acc{int(want_acc)}",
               separation_loss._pair_stats_kernel,
               dict(WANT_SUM=want_sum, WANT_ACC=want_acc, BLOCK_I=64, BLOCK_J=64, BLOCK_D=32,
                    BLOCK_DV=256, PRECISION="ieee"), "fp32", arch, 8, 1)


def _backward_variants(backward, tiles, everything):
    """The backward kernels as step_backward launches them (untuned: BLOCK_M 64, 4 warps, 2
    stages; float32 dot products), for each separation's weight form: softmax, polynomial, and
    entmax's slope (indicator for sparsemax, linear for alpha 1.5, a power otherwise)."""
    from . import _common

    forms = [("softmax", _common.SOFTMAX, 1, 3), ("polynomial", _common.POLYNOMIAL, 1, 3),
             ("sparsemax", _common.ENTMAX, 1, 3), ("entmax1.5", _common.ENTMAX, 2, 1),
             ("entmax", _common.ENTMAX, 0, 0)]
    for arch in (90, 80):
        for data in ("bf16", "fp32"):
            for sim in (0, 1, 2):
                for form, sep, q_kind, g_kind in forms:
                    if form == "polynomial" and sim != 0:
                        continue  # polynomial is defined for dot only
                    block = dict(tiles(sim, data), DOT_F32=True, BLOCK_M=64, BLOCK_DV=128)
                    block_dx = block["BLOCK_D"] if sim == 2 else 64
                    codes = dict(SIM=sim, SEP=sep, Q_KIND=q_kind, G_KIND=g_kind)
                    name = f"sm{arch} {data} sim{sim} {form}"
                    launches = [
                        ("grad-queries", backward._grad_queries_kernel,
                         dict(block, **codes, BLOCK_DX=block_dx)),
                        ("grad-keys", backward._grad_bank_kernel,
                         dict(block, **codes, VALUES=False, BLOCK_DX=block_dx)),
                        ("grad-values", backward._grad_bank_kernel,
                         dict(block, **codes, VALUES=True, BLOCK_DX=64)),
                    ]
                    if sep == _common.ENTMAX:
                        launches.append(("slope-values", backward._slope_values_kernel,
                                         dict(block, SIM=sim, G_KIND=g_kind)))
                    for kind, kernel, constants in launches:
                        if everything or _representative(arch, data, sim, form, kind):
                            yield (f"{kind} {name}", kernel, constants, data, arch, 4, 2)


def _representative(arch, data, sim, form, kind) -> bool:
    """The backward launches CI compiles (each takes tens of seconds): on sm_90 in bf16 dot
    softmax's three kernels, the entmax slope pass, l2's dK (its norm term) and manhattan's dx
    and dK (their sign paths); on sm_80 dot softmax's dx. ``--all`` compiles every one."""
    if arch == 90 and data == "bf16":
        if sim == 0:
            return form == "softmax" or form == "entmax" and kind == "slope-values"
        if form == "entmax":
            return kind == "grad-keys" or sim == 2 and kind == "grad-queries"
        return False
    return arch == 80 and data == "bf16" and sim == 0 and form == "softmax" and (
        kind == "grad-queries")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    everything = "--all" in sys.argv
    missing = missing_kernels(everything)
    failures = len(missing)
    if missing:
        print(json.dumps({"variant": "coverage", "ok": False,
                          "error": f"kernels never compiled: {sorted(missing)}"}), flush=True)
    for name, kernel, constants, data, arch, warps, stages in variants(everything):
        start = time.perf_counter()
        result = {"variant": name, "kernel": kernel_name(kernel)}
        try:
            shared, cubin = compile_kernel(kernel, constants, data, arch, warps, stages)
            result.update(ok=True, shared_bytes=shared, **resource_usage(cubin))
        except Exception as error:  # report every failing variant, not just the first
            failures += 1
            result.update(ok=False, error=f"{type(error).__name__}: {error}")
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
