#!/usr/bin/env bash
# CI stage: the CUDA build of hen_fast._C, on a machine without a GPU.
#
# Installs the CUDA torch 2.13.0 wheel in a fresh venv (pip --isolated: this machine's pip config
# and PIP_* variables pin the CPU wheels), builds the extension out of tree with the installed
# nvcc for sm_80 and sm_90 with warnings as errors, loads hen_fast._C, requires a CUDA kernel for
# every forward op, and runs the CPU tests against that build. The checkout's own build
# (hen_fast/_C*.so) is left alone. On failure, the loader's message is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hen_fast_cuda_ci.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The toolkit: $CUDA_HOME, /usr/local/cuda, or the one around the nvcc on PATH (which may be a
# wrapper script, so the toolkit is found from the nvcc it runs).
if [[ -z ${CUDA_HOME:-} ]]; then
    if [[ -x /usr/local/cuda/bin/nvcc ]]; then
        CUDA_HOME=/usr/local/cuda
    else
        NVCC=$(command -v nvcc) || { echo "cuda_build: nvcc not found" >&2; exit 1; }
        CUDA_HOME=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
                    sed -n 's/^#\$ TOP=//p' | head -n 1)
        CUDA_HOME=$(readlink -f "${CUDA_HOME:-$(dirname "$NVCC")/..}")
    fi
fi
export CUDA_HOME
[[ -x $CUDA_HOME/bin/nvcc ]] || { echo "cuda_build: no nvcc in $CUDA_HOME/bin" >&2; exit 1; }
export PATH="$WORK/venv/bin:$CUDA_HOME/bin:$PATH"  # the venv's python, pip and ninja first
PIP=(python -m pip --isolated --cert /etc/ssl/certs/ca-certificates.crt
     --disable-pip-version-check --quiet)

python3 -m venv "$WORK/venv"
"${PIP[@]}" install torch==2.13.0 setuptools ninja numpy pytest
python -c 'import torch; assert torch.version.cuda, f"not a CUDA wheel: {torch.__version__}"'

# Out of tree: a copy of the tracked (and untracked, not ignored) sources.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src"
cd "$WORK/src"
HEN_FAST_WERROR=1 HEN_FAST_CUDA_ARCHS="80;90" python setup.py --quiet build_ext --inplace

# Load it here (no GPU): every forward op needs its CUDA kernel.
python - <<'PY'
import os
import sys
import warnings

import torch

warnings.simplefilter("error", RuntimeWarning)  # a failed load or registration stops here
try:
    from hen_fast.backends import cpu, cuda
    loaded = cpu.load_extension()
except RuntimeWarning as message:
    sys.exit(f"cuda_build: the loader reports: {message}")
assert cpu.__file__.startswith(os.getcwd()), f"not the copy's hen_fast: {cpu.__file__}"
missing = [
    op for op in cpu.FORWARD_OPS
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
]
if not loaded or missing or not cuda.has_cuda_kernel():
    sys.exit(f"cuda_build: no CUDA kernel for {missing}: {cpu.cuda_load_error()}")
print(f"cuda_build: hen_fast._C (torch {torch.__version__}) has CUDA kernels for {cpu.FORWARD_OPS}")
PY

# The CPU tests against this build (cwd first on sys.path: the copy, with its CUDA-built _C).
# Triton's interpreter tests in these files test no compiled code: the main run has them.
HEN_FAST_REQUIRE_EXT=1 python -m pytest -q -p no:cacheprovider -k "not triton" \
    tests/test_extension.py tests/test_cpu.py tests/test_backward.py tests/test_backends.py \
    tests/test_retrieve.py tests/test_conformance.py
