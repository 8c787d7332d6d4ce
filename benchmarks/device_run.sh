#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension for sm_90, check correctness (a bank
# past 2^31 elements, then the GPU test suite), then time the GPU sweep. Logs and JSON land in
# $OUT. Usage there: bash benchmarks/device_run.sh [pytest files...]
# (pytest gets SIGINT at its time limit, so it still prints which tests failed: the first H200
# run was killed by a plain timeout and said nothing.)
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
stamp() { echo "== $(date +%T) $*"; }
stamp start; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"
stamp build
HEN_FAST_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 python3 setup.py build_ext --inplace \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo BUILD FAILED; }
python3 -c "
from hen_fast.backends import cpu, cuda
print('cpu kernels', cpu.load_extension(), cpu.load_error(), '| cuda kernels', cuda.is_available())"
stamp gpu_check
timeout ${CHECK_S:-150} python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log" | tail -20
stamp tests
TESTS=${*:-tests/test_conformance.py tests/test_cuda.py tests/test_triton.py tests/test_backward.py tests/test_separation_loss.py tests/test_retrieve.py tests/test_extremes.py}
timeout -s INT ${TEST_S:-300} python3 -m pytest -q -n 16 -p no:cacheprovider -rf --maxfail=40 $TESTS \
  >"$OUT/tests.log" 2>&1; echo "pytest rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -45
stamp bench
# hen_fast.bench prints a table per case (times, baseline / hen_fast, fraction of the limits).
timeout ${BENCH_S:-120} python3 benchmarks/bench_retrieve_gpu.py --minutes ${BENCH_MIN:-1.2} \
  --B 1 16 4096 --M 1e6 1e7 --d 256 --dtypes bfloat16 --similarities dot l2 \
  --out "$OUT/bench.json" >"$OUT/bench.log" 2>&1; echo "bench rc $?"; tail -150 "$OUT/bench.log"
stamp end
