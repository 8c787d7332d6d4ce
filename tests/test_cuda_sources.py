"""Every CUDA source compiles with nvcc for sm_90 and sm_80, on machines without a GPU too
(compile only). The .cu files include no torch headers (csrc/README.md), so plain nvcc builds
them; the torch binding beside them (retrieve_cuda.cpp) is syntax-checked against the installed
torch's headers. Both read the codes header that setup.py generates from hen_fast/codes.py; the
tests generate it the same way."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).parents[1] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
BINDINGS = sorted(CUDA_DIR.glob("*.cpp"))
# What torch's CUDAExtension adds to nvcc: the kernels must not rely on implicit half/bfloat16
# conversions or operators.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def codes_include_dir(directory: Path) -> Path:
    """Writes hen_fast/codes.h (as setup.py does) under ``directory``; returns the include dir."""
    from hen_fast import codes

    header = directory / "generated" / "hen_fast" / "codes.h"
    header.parent.mkdir(parents=True)
    header.write_text(codes.c_header())
    return directory / "generated"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.skipif(not SOURCES, reason="no CUDA sources yet")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_for_hopper_and_ampere(source, tmp_path):
    done = run(
        [
            "nvcc",
            "-c",
            str(source),
            "-o",
            str(tmp_path / "out.o"),
            "-std=c++17",
            "-O3",
            f"-I{codes_include_dir(tmp_path)}",
            *TORCH_NVCC_DEFINES,
            "-gencode",
            "arch=compute_90,code=sm_90",
            "-gencode",
            "arch=compute_80,code=sm_80",
            "-Xcompiler",
            "-Wall",
        ]
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-4000:]


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's headers: $CUDA_HOME, $CUDA_PATH, beside nvcc, or /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    roots += [Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.slow
@pytest.mark.skipif(cuda_include_dir() is None, reason="nvcc and the CUDA headers are missing")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("binding", BINDINGS, ids=lambda p: p.name)
def test_binding_compiles_against_torch_headers(binding, tmp_path):
    """A CPU-only torch wheel ships the c10/cuda headers but not the one header its CUDA build
    generates (c10/cuda/impl/cuda_cmake_macros.h); the check writes that one-line header."""
    from torch.utils.cpp_extension import include_paths

    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*include_paths(), str(cuda_include_dir())]
    if not (Path(includes[0]) / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch wheel ships no c10/cuda headers")
    if not (Path(includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        includes.append(str(tmp_path))
    command = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-DHEN_FAST_WITH_CUDA"]
    command += [f"-I{codes_include_dir(tmp_path)}"]
    for include in includes:
        command += ["-isystem", include]
    done = run([*command, str(binding)])
    assert done.returncode == 0, done.stderr[-4000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-4000:]


def test_sources_include_no_torch_headers():
    """The .cu files and their headers stay torch-free, so plain nvcc compiles them."""
    for path in [*SOURCES, *CUDA_DIR.glob("*.cuh"), *CUDA_DIR.glob("*.h")]:
        text = path.read_text()
        for header in ("<torch/", "<ATen/", "<c10/"):
            assert header not in text, f"{path.name} includes {header}"
