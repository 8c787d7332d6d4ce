"""The op contract of the compiled extension (csrc/common): every op has the schema declared in
csrc/common/ops.h, a CPU kernel, and a fake kernel with the schema's arguments; a kernel whose C++
type drifts from its op does not compile; and a registration that fails is reported once by the
loader and falls back to the torch backend instead of aborting the process."""

import ctypes
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hen_fast
from hen_fast.backends import cpu

CSRC = Path(__file__).parents[1] / "csrc"

if not cpu.load_extension():
    if os.environ.get("HEN_FAST_REQUIRE_EXT") == "1":
        raise RuntimeError(
            f"HEN_FAST_REQUIRE_EXT=1 but hen_fast._C did not load: {cpu.load_error()}"
        )
    pytest.skip("the C++ extension is not built", allow_module_level=True)


def declared_schemas() -> dict[str, torch._C.FunctionSchema]:
    """The schema strings of csrc/common/ops.h (adjacent C string literals), by op name."""
    text = (CSRC / "common" / "ops.h").read_text()
    schemas = {}
    for literals in re.findall(r'constexpr const char\* k\w+Schema =\s*((?:"[^"]*"\s*)+);', text):
        schema = torch._C.parse_schema("hen_fast::" + "".join(re.findall(r'"([^"]*)"', literals)))
        schemas[schema.name] = schema
    return schemas


def test_ops_are_the_declared_ones_with_cpu_kernels():
    declared = declared_schemas()
    assert set(declared) == {"hen_fast::retrieve_step", "hen_fast::retrieve_step_backward",
                             "hen_fast::sketch_filter"}
    assert set(cpu.FORWARD_OPS) <= set(declared)
    for name, schema in declared.items():
        packet = getattr(torch.ops.hen_fast, name.split("::")[1])
        assert packet.default._schema == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name


def test_fake_kernels_follow_the_schemas():
    """One fake kernel per declared op, taking the schema's arguments by name (opcheck in
    test_cpu.py and test_backward.py checks what they return)."""
    declared = declared_schemas()
    assert set(cpu.FAKE_KERNELS) == set(declared)
    for name, kernel in cpu.FAKE_KERNELS.items():
        arguments = [argument.name for argument in declared[name].arguments]
        assert list(inspect.signature(kernel).parameters) == arguments, name


def test_cuda_build_registers_cuda_kernels():
    """In a CUDA build (the library exports the CUDA registration), every forward op has a CUDA
    kernel, with or without a GPU here."""
    library = ctypes.CDLL(importlib.util.find_spec("hen_fast._C").origin)
    if not hasattr(library, "hen_fast_register_cuda_ops"):
        pytest.skip("a CPU-only build of hen_fast._C")
    assert cpu.cuda_load_error() is None
    for op in cpu.FORWARD_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


# Runs in a fresh process: a conflicting hen_fast::retrieve_step is defined before hen_fast loads
# its extension, so registering the extension's schema fails inside the C++ registration call.
CONFLICT = """
import json, warnings
import torch
torch.library.define("hen_fast::retrieve_step", "(Tensor x) -> Tensor")
import hen_fast
from hen_fast.backends import torch_backend
generator = torch.Generator().manual_seed(0)
queries = torch.randn(3, 8, generator=generator)
memories = torch.randn(50, 8, generator=generator)
kwargs = dict(beta=2.0, separation="sparsemax")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = hen_fast.retrieve(queries, memories, backend="auto", **kwargs)
    again = hen_fast.retrieve(queries, memories, backend="auto", **kwargs)
    try:
        hen_fast.retrieve(queries, memories, backend="cpu", **kwargs)
        named = None
    except hen_fast.BackendUnavailableError as error:
        named = str(error)
expected = torch_backend.retrieve(queries.double(), memories.double(), **kwargs)[0]
print(json.dumps({
    "warnings": [[w.category.__name__, str(w.message)] for w in caught],
    "error": (out.double() - expected).abs().max().item(),
    "same": torch.equal(out, again),
    "named": named,
}))
"""


def test_failed_registration_falls_back_without_aborting(tmp_path):
    package_root = str(Path(hen_fast.__file__).parents[1])  # this build of hen_fast, not cwd's
    path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, "-c", CONFLICT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])
    ours = [m for c, m in result["warnings"] if c == "RuntimeWarning" and "hen_fast._C" in m]
    assert len(ours) == 1, result["warnings"]
    # The loader's message carries the dispatcher's reason.
    assert "registering its ops failed" in ours[0] and "retrieve_step" in ours[0], ours[0]
    assert result["error"] < 1e-6 and result["same"]
    assert result["named"] is not None and "registering its ops failed" in result["named"]


def torch_compile_command() -> list[str] | None:
    """g++ -fsyntax-only with torch's headers as system headers, or None without g++."""
    from torch.utils.cpp_extension import include_paths

    if shutil.which("g++") is None:
        return None
    command = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{CSRC / 'common'}"]
    for include in include_paths("cpu"):
        command += ["-isystem", include]
    return command


ARGUMENTS = """const at::Tensor& x, const at::Tensor& keys,
    const std::optional<at::Tensor>& sq_norms,
    const at::Tensor& values, double beta, int64_t similarity, int64_t separation, double alpha,
    double degree, int64_t capacity, bool want_info"""


@pytest.mark.slow
@pytest.mark.skipif(torch_compile_command() is None, reason="g++ is not installed")
@pytest.mark.parametrize("outputs", [5, 4])
def test_a_kernel_that_drifts_from_its_op_does_not_compile(outputs, tmp_path):
    """A CUDA binding defined with another return type than its op's (the four outputs of an op
    that returns five) conflicts with its declaration in ops.h: a compile error."""
    source = tmp_path / "binding.cpp"
    tensors = ", ".join(["at::Tensor"] * outputs)
    source.write_text(
        '#define HEN_FAST_WITH_CUDA\n#include "ops.h"\nnamespace hen_fast {\n'
        f"std::tuple<{tensors}> retrieve_step_cuda({ARGUMENTS}) {{ return {{}}; }}\n}}\n"
    )
    done = subprocess.run(
        [*torch_compile_command(), str(source)], capture_output=True, text=True, timeout=600
    )
    if outputs == 5:
        assert done.returncode == 0, done.stderr[-4000:]
    else:
        assert done.returncode != 0
        assert "retrieve_step_cuda" in done.stderr, done.stderr[-4000:]
