"""Build script: metadata lives in pyproject.toml; this file declares the compiled kernels.

They build against the torch already installed (``pip install --no-build-isolation``): a
CppExtension from csrc/common and csrc/cpu, plus csrc/cuda when torch has CUDA and nvcc is found.
The similarity/separation codes reach the kernels as a header generated here from
hen_fast/codes.py (build/generated/hen_fast/codes.h, never committed).

Environment:
    HEN_FAST_BUILD_EXT=0         install without compiled kernels (the torch and triton backends
                                 still work; importing hen_fast never needs the extension)
    HEN_FAST_BUILD_CUDA=0        a CPU-only extension even when torch has CUDA and nvcc is found
    HEN_FAST_CUDA_ARCHS="80;90"  GPU architectures for the CUDA kernels
    HEN_FAST_WERROR=1            warnings are errors (CI); torch's own headers are included as
                                 system headers, so only hen_fast's sources are held to it
    MAX_JOBS                     parallel compile jobs (default: bounded by cores and memory)
"""

import glob
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
GENERATED = ROOT / "build" / "generated"


def write_codes_header() -> Path:
    """Writes hen_fast/codes.h from hen_fast/codes.py (loaded by path: importing hen_fast here
    would need its dependencies); rewritten only when it changed, so builds stay incremental."""
    spec = importlib.util.spec_from_file_location("_hen_fast_codes", ROOT / "hen_fast" / "codes.py")
    codes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codes)
    header = GENERATED / "hen_fast" / "codes.h"
    text = codes.c_header()
    if not header.exists() or header.read_text() != text:
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text(text)
    return GENERATED


def extensions():
    if os.environ.get("HEN_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
        include_paths,
    )

    # Each compile job of a torch extension takes about 2 GB of memory.
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = 8
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, int(memory_gb // 2)))))
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("HEN_FAST_BUILD_CUDA", "1") != "0"
    )
    include_dirs = [str(write_codes_header())]
    # -fopenmp: at::parallel_for in these sources runs on torch's OpenMP threads. Without it the
    # header falls back to one serial call with a parallel guard set, so the kernels and every
    # ATen op inside them ran on one core. libgomp resolves to the copy torch already loaded.
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    link = ["-fopenmp"]
    nvcc = ["-O3", "-std=c++17"]
    if os.environ.get("HEN_FAST_WERROR") == "1":
        # torch's headers as system headers (gcc then ignores their -I duplicates), so that only
        # warnings in hen_fast's own sources fail the build.
        system = [f"-isystem{path}" for path in include_paths("cuda" if with_cuda else "cpu")]
        cxx += ["-Wall", "-Werror", *system]
        # The .cu files include no torch headers (csrc/README.md): nothing to exempt.
        nvcc += ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]
    sources = sorted(glob.glob("csrc/common/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        archs = os.environ.get("HEN_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        # No --use_fast_math: powf and exp2f stay accurate (weights must match the float64
        # oracle to ~1e-6).
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
        # The .cu kernels and the torch binding beside them (csrc/cuda/retrieve_cuda.cpp).
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        extension = CUDAExtension(
            "hen_fast._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DHEN_FAST_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        extension = CppExtension(
            "hen_fast._C", sources, include_dirs=include_dirs, extra_compile_args=cxx,
            extra_link_args=link,
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
