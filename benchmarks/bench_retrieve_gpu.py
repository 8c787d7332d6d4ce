"""GPU benchmark of ``retrieve`` (Triton and CUDA backends) beside baselines, against the roofline.

    python benchmarks/bench_retrieve_gpu.py                    # the full sweep, on a CUDA GPU
    python benchmarks/bench_retrieve_gpu.py --B 1 16 --M 1e6 --d 256 --dtypes bfloat16
    python benchmarks/bench_retrieve_gpu.py --smoke     # tiny shapes on the CPU (interpreter)

The same as ``hen-fast bench --device gpu`` with this script's budget of 8 minutes: the code is
``hen_fast.bench`` (its docstring says what is timed and how). For every (B, M, d, dtype,
similarity, separation) it times hen_fast's auto, triton and cuda backends and, in the same run,
torch eager on materialised scores (or "OOM"), torch.compile of it, scaled_dot_product_attention
and the entmax package for the sparse separations, measures the copy bandwidth and the bf16 matmul
rate, and writes ``benchmarks/results/<device>-<date>.json`` and a PNG.
"""

from __future__ import annotations

import sys

from hen_fast import bench


def main(argv: list[str] | None = None) -> int:
    parser = bench.build_parser(description=__doc__.splitlines()[0])
    parser.set_defaults(device="gpu", minutes=8.0)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
