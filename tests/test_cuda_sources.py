"""Every CUDA source compiles with nvcc for sm_90, on machines without a GPU too (compile only).
The .cu files include no torch headers (csrc/README.md), so plain nvcc builds them."""

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.skipif(not SOURCES, reason="no CUDA sources yet")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_for_hopper(source, tmp_path):
    done = subprocess.run(
        [
            "nvcc",
            "-c",
            str(source),
            "-o",
            str(tmp_path / "out.o"),
            "-std=c++17",
            "-O3",
            "-gencode",
            "arch=compute_90,code=sm_90",
            "-Xcompiler",
            "-Wall",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
