"""Compile every Triton kernel, in each variant the backend launches on a GPU, to a cubin for
Hopper (sm_90) and Ampere (sm_80): no GPU needed. The interpreter runs kernels as Python and misses
what only the compiler checks (tl.dot operand types, globals that are not constexpr, shared-memory
budgets), so CI runs this too.

    python -m hen_fast.backends.triton.compile_check          # the representative variants (CI)
    python -m hen_fast.backends.triton.compile_check --all    # every dtype x separation x arch

Must run without TRITON_INTERPRET=1 (then @triton.jit gives compilable functions).
"""

from __future__ import annotations

import json
import os
import sys
import time

INT_POINTERS = {"active_ptr", "part_count_ptr", "part_index_ptr", "cand_index_ptr",
                "cand_count_ptr"}
DATA_POINTERS = {"x_ptr", "k_ptr", "v_ptr"}
FLOAT_SCALARS = {"beta", "degree", "alpha", "alpha_minus_1", "q", "scale", "q_minus_1"}
SHARED_MEMORY = {90: 227 * 1024, 80: 163 * 1024}


def compile_kernel(kernel, constants, data="bf16", arch=90, num_warps=4, num_stages=2):
    """Compile to a cubin; returns the bytes of shared memory it needs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
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
    return compiled.metadata.shared


def variants(everything: bool = False):
    """(name, kernel, constants, data dtype, arch, num_warps, num_stages) for the launch forms:
    every similarity x separation in bf16 on sm_90, one of each for the other dtypes and sm_80
    (``everything``: all of them, about 3 minutes)."""
    from . import _common, dense, sparse, stats

    biggest = _common.TUNED[-1]  # the autotuner's config with the most registers and memory
    tuned = dict(biggest.kwargs)

    def tiles(similarity, data):  # as retrieve.launch_config chooses them on a GPU
        block_b, block_d = (16, 4) if similarity == 2 else (64, 64)
        return dict(BLOCK_B=block_b, BLOCK_D=block_d, DOT_F32=data == "fp32", PRECISION="ieee")

    for arch in (90, 80):
        for data in ("bf16", "fp16", "fp32"):
            for sep in (dense.SOFTMAX, dense.POLYNOMIAL, dense.ENTMAX_WITH_TAU):
                for sim in (0, 1, 2):
                    representative = arch == 90 and data == "bf16" or sep == dense.SOFTMAX and (
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
                   dict(tiles(sim, data), SIM=sim, SEP=dense.SOFTMAX, Q_KIND=1, SAME_KV=True,
                        BLOCK_DV=256, **tuned), data, 90, biggest.num_warps, biggest.num_stages)
    for sep in (dense.SOFTMAX, dense.POLYNOMIAL, dense.ENTMAX_WITH_TAU):
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


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    failures = 0
    for name, kernel, constants, data, arch, warps, stages in variants("--all" in sys.argv):
        start = time.perf_counter()
        try:
            shared = compile_kernel(kernel, constants, data, arch, warps, stages)
            result = {"variant": name, "ok": True, "shared_bytes": shared}
        except Exception as error:  # report every failing variant, not just the first
            failures += 1
            result = {"variant": name, "ok": False, "error": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
