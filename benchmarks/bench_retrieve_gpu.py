"""GPU benchmark of ``retrieve`` (Triton and CUDA backends) beside baselines, against the roofline.

    python benchmarks/bench_retrieve_gpu.py                    # the full sweep, on a CUDA GPU
    python benchmarks/bench_retrieve_gpu.py --B 1 16 --M 1e6 --d 256 --dtypes bfloat16
    python benchmarks/bench_retrieve_gpu.py --smoke     # tiny shapes on the CPU (interpreter)

For every (B, M, d, dtype, similarity, separation) it times hen_fast's triton backend, its cuda
backend (``cuda_ms``, when the extension was built with CUDA: the measurements a dispatch rule
between the two is to come from) and, in the same run, torch eager on materialised scores (or
"OOM"), torch.compile of it, scaled_dot_product_attention (dot, and l2 through augmented inputs)
and the entmax package for the sparse separations. The ceilings
are measured in the same run: a large device-to-device copy (bandwidth) and a large bf16 matmul
(tensor-core rate). Each record's roofline fraction is ``T_min / T`` with
``T_min = max(bytes / bandwidth, flops / matmul rate)``, ``bytes = (M (d + dv) + B (d + dv)) b``
(keys and values read once; one read when they are the same tensor), ``flops = 2 B M (d + dv)``.
Writes ``benchmarks/results/<device>-<date>.json`` and a PNG of time against M.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

SEPARATIONS = [("softmax", 1.5), ("sparsemax", 2.0), ("entmax", 1.5), ("polynomial", 1.5)]
SIMILARITIES = ("dot", "l2", "manhattan")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def timer(smoke: bool):
    """Milliseconds per call: triton.testing.do_bench on a GPU, a plain clock in smoke mode."""
    if smoke:

        def measure(fn):
            fn()
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)

        return measure
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=10, rep=50)


def ceilings(device: str, measure) -> dict:
    """Measured copy bandwidth (bytes/s) and bf16 matmul rate (flop/s) on this device."""
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
        "copy_bytes_per_s": 2 * 4 * n / (copy_ms * 1e-3),
        "matmul_flops_per_s": 2 * size**3 / (matmul_ms * 1e-3),
        "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
    }


def eager(queries, keys, values, beta, similarity, separation, alpha, degree):
    """The plain materialised computation: the torch-eager and torch.compile baseline."""
    if similarity == "dot":
        scores = queries @ keys.T
    elif similarity == "l2":
        scores = -(torch.cdist(queries, keys) ** 2)
    else:
        scores = -torch.cdist(queries, keys, p=1)
    z = beta * scores.float()
    if separation == "softmax":
        weights = torch.softmax(z, dim=-1)
    elif separation == "polynomial":
        weights = torch.relu(z) ** degree
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-30)
    else:
        import entmax

        weights = entmax.sparsemax(z, -1) if alpha == 2.0 else entmax.entmax15(z, -1)
    return weights.to(values.dtype) @ values


def sdpa(queries, keys, values, beta, similarity):
    """scaled_dot_product_attention; l2 as [2x, -1] . [k, ||k||^2] = 2 x.k - ||k||^2."""
    import torch.nn.functional as F

    if similarity == "l2":
        queries = torch.cat([2 * queries, -torch.ones_like(queries[:, :1])], dim=1)
        keys = torch.cat([keys, keys.float().pow(2).sum(1, keepdim=True).to(keys.dtype)], dim=1)
    return F.scaled_dot_product_attention(
        queries[None, None], keys[None, None], values[None, None], scale=beta
    )[0, 0]


def run_case(
    measure, device, B, M, d, dtype, similarity, separation, alpha, smoke, compiled, cuda_ready
):
    import hen_fast

    generator = torch.Generator(device=device).manual_seed(0)
    keys = torch.randn(M, d, device=device, dtype=dtype, generator=generator)
    queries = keys[:B].float() + 0.1 * torch.randn(B, d, device=device, generator=generator)
    queries = queries.to(dtype)
    beta, degree = d**-0.5, 10
    args = dict(
        beta=beta,
        similarity=similarity,
        separation=separation,
        alpha=alpha,
        degree=degree,
        check_finite=False,
    )
    ms = measure(lambda: hen_fast.retrieve(queries, keys, backend="triton", **args))
    # The hand-written CUDA kernels beside Triton, on the same inputs (None where not built).
    cuda_ms = None
    if cuda_ready and d <= 2048:
        cuda_ms = measure(lambda: hen_fast.retrieve(queries, keys, backend="cuda", **args))
    baselines = {"torch_eager": None, "torch_compile": None, "sdpa": None, "entmax": None}
    sparse = separation in ("sparsemax", "entmax")
    plain_alpha = 2.0 if separation == "sparsemax" else alpha

    def attempt(fn):
        try:
            return measure(fn)
        except torch.OutOfMemoryError:
            return "OOM"
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()

    plain = lambda: eager(queries, keys, keys, beta, similarity, separation, plain_alpha, degree)  # noqa: E731
    baselines["entmax" if sparse else "torch_eager"] = attempt(plain)
    if not sparse and not smoke:
        key = (similarity, separation)
        if key not in compiled:
            compiled[key] = torch.compile(eager, dynamic=False)
        baselines["torch_compile"] = attempt(
            lambda: compiled[key](
                queries, keys, keys, beta, similarity, separation, plain_alpha, degree
            )
        )
    if separation == "softmax" and similarity in ("dot", "l2"):
        baselines["sdpa"] = attempt(lambda: sdpa(queries, keys, keys, beta, similarity))
    element = torch.finfo(dtype).bits // 8
    moved = (M * d + B * 2 * d) * element  # keys are the values: one read of the bank
    flops = 2 * B * M * (d + d)
    return {
        "op": "retrieve",
        "similarity": similarity,
        "separation": separation,
        "alpha": alpha if separation == "entmax" else None,
        "B": B,
        "M": M,
        "d": d,
        "dv": d,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": 1,
        "backend": "triton",
        "ms": ms,
        "gbps": moved / (ms * 1e-3) / 1e9,
        "cuda_ms": cuda_ms,
        "cuda_gbps": None if cuda_ms is None else moved / (cuda_ms * 1e-3) / 1e9,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "bytes": moved,
        "flops": flops,
        "baselines": baselines,
    }


def roofline(record: dict, limits: dict, key: str = "ms") -> float | None:
    """T_min / T for the time under ``key`` ("ms": triton, "cuda_ms": the cuda backend)."""
    if record[key] is None:
        return None
    t_min = max(
        record["bytes"] / limits["copy_bytes_per_s"], record["flops"] / limits["matmul_flops_per_s"]
    )
    return t_min / (record[key] * 1e-3)


def fits(device, B, M, d, dtype) -> bool:
    if device != "cuda":
        return True
    need = M * d * (torch.finfo(dtype).bits // 8) + 2 * B * d * 4
    return need < 0.6 * torch.cuda.get_device_properties(0).total_memory


def plot(records, path: Path) -> None:
    """Time against M for dot/softmax, one panel per dtype at the middle d: hen_fast solid, the
    fastest baseline of the same B dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in records if r["similarity"] == "dot" and r["separation"] == "softmax"]
    if not chosen:
        return
    dims = sorted({r["d"] for r in chosen})
    d = dims[len(dims) // 2]
    dtypes = sorted({r["dtype"] for r in chosen})
    figure, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 4), squeeze=False)
    for axis, dtype in zip(axes[0], dtypes):
        for color, B in enumerate(sorted({r["B"] for r in chosen})):
            rows = sorted(
                (r for r in chosen if r["B"] == B and r["d"] == d and r["dtype"] == dtype),
                key=lambda r: r["M"],
            )
            ms = [r["M"] for r in rows]
            axis.plot(ms, [r["ms"] for r in rows], "o-", color=f"C{color}", label=f"B={B}")
            best = [
                min(
                    (v for v in r["baselines"].values() if isinstance(v, float)),
                    default=float("nan"),
                )
                for r in rows
            ]
            axis.plot(ms, best, "x--", color=f"C{color}")
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="memories M",
            ylabel="ms",
            title=f"dot/softmax d={d} {dtype}\nsolid hen_fast, dashed best baseline",
        )
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--M", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--similarities", nargs="+", default=list(SIMILARITIES))
    parser.add_argument("--separations", nargs="+", default=[s for s, _ in SEPARATIONS])
    parser.add_argument(
        "--minutes",
        type=float,
        default=8.0,
        help="stop starting new cases after this long (results so far are kept)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU through TRITON_INTERPRET=1, to test the script",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.B, args.M, args.d, args.dtypes = [1, 5], [300], [16], ["float32"]
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA device: use --smoke to test the script on the CPU", file=sys.stderr)
        return 2
    import triton
    from tqdm import tqdm

    import hen_fast

    measure = timer(args.smoke)
    cuda_ready = device == "cuda" and hen_fast.backends.cuda.is_available()
    limits = ceilings(device, measure)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu-{platform.machine()}"
    date = datetime.date.today().isoformat()
    if args.out is None and args.smoke:
        import tempfile

        args.out = Path(tempfile.mkdtemp()) / "smoke.json"
    out = args.out or Path(__file__).parent / "results" / f"{name.replace(' ', '_')}-{date}.json"
    cases = [
        (B, int(M), d, DTYPES[dtype], similarity, separation, alpha)
        for dtype in args.dtypes
        for d in args.d
        for M in args.M
        for B in args.B
        for similarity in args.similarities
        for separation, alpha in SEPARATIONS
        if separation in args.separations and (separation != "polynomial" or similarity == "dot")
    ]
    deadline = time.monotonic() + 60 * args.minutes
    records, skipped, compiled = [], 0, {}
    for case in tqdm(cases, desc="cases", disable=None):
        if time.monotonic() > deadline or not fits(device, *case[:4]):
            skipped += 1
            continue
        record = run_case(
            measure, device, *case, smoke=args.smoke, compiled=compiled, cuda_ready=cuda_ready
        )
        record["roofline_fraction"] = roofline(record, limits)
        record["cuda_roofline_fraction"] = roofline(record, limits, "cuda_ms")
        records.append(record)
    result = {
        "device": name,
        "date": date,
        "smoke": args.smoke,
        "skipped_cases": skipped,
        "versions": {
            "hen_fast": hen_fast.__version__,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "ceilings": limits,
        "records": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=lambda v: None if math.isnan(v) else v))
    plot(records, out.with_suffix(".png"))
    print(f"{len(records)} cases ({skipped} skipped) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
