"""Build script: metadata lives in pyproject.toml; this file declares the compiled kernels.

They build against the torch already installed (``pip install --no-build-isolation``): a
CppExtension from csrc/cpu, plus csrc/cuda when torch has CUDA and nvcc is found.

Environment:
    HEN_FAST_BUILD_EXT=0         install without compiled kernels (the torch and triton backends
                                 still work; importing hen_fast never needs the extension)
    HEN_FAST_CUDA_ARCHS="80;90"  GPU architectures for the CUDA kernels
    MAX_JOBS                     parallel compile jobs (default: bounded by cores and memory)
"""

import glob
import os

from setuptools import setup


def extensions():
    if os.environ.get("HEN_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # Each compile job of a torch extension takes about 2 GB of memory.
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = 8
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, int(memory_gb // 2)))))
    cxx = ["-O3", "-fopenmp-simd", "-std=c++17"]
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("HEN_FAST_BUILD_CUDA", "1") != "0"
    )
    if with_cuda:
        archs = os.environ.get("HEN_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        # No --use_fast_math: powf and exp2f stay accurate (weights must match the float64
        # oracle to ~1e-6).
        nvcc = ["-O3", "-std=c++17"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()
        ]
        # The .cu kernels and the torch binding beside them (csrc/cuda/retrieve_cuda.cpp).
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        extension = CUDAExtension(
            "hen_fast._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DHEN_FAST_WITH_CUDA"], "nvcc": nvcc},
        )
    else:
        extension = CppExtension("hen_fast._C", sources, extra_compile_args=cxx)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
