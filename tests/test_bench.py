"""``hen-fast bench`` on tiny shapes (--smoke): it writes valid JSON with the measured limits and a
record per case for every backend, finite positive ratios and fractions of the limit, a table per
case, and the PNG when matplotlib is installed; without the optional packages it says what it
leaves out. No test asserts a time: the smoke run's times mean nothing."""

import ast
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import hen_fast
from hen_fast import bench, cli
from hen_fast.bench import cases, machine

ROOT = Path(__file__).resolve().parents[1]


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def check_result(path: Path, printed: str, timed_backends: set[str]) -> dict:
    """The JSON's limits and records are complete and sane, and the table printed every case."""
    result = json.loads(path.read_text())
    limits = result["limits"]
    assert positive(limits["bandwidth_bytes_per_s"])
    assert limits["matmul_flops_per_s"]
    assert all(positive(rate) for rate in limits["matmul_flops_per_s"].values())
    assert result["versions"]["hen_fast"] == hen_fast.__version__
    assert result["records"] and result["skipped"] == []
    for record in result["records"]:
        label = cases.Case(
            *(record[k] for k in ("B", "M", "d", "dtype", "similarity", "separation"))
        )
        assert label.label() in printed
        times = {**record["hen_fast"], **record["baselines"]}
        for name in timed_backends:
            assert positive(record["hen_fast"][name]), (label, name, record["hen_fast"][name])
        assert record["baselines"], label
        timed = {name for name, ms in times.items() if isinstance(ms, float)}
        assert set(record["fraction_of_limit"]) == timed
        assert all(positive(f) for f in record["fraction_of_limit"].values())
        assert set(record["ratios"]) == timed & set(record["baselines"])
        assert all(positive(r) for r in record["ratios"].values())
        assert positive(record["t_min_ms"]) and record["bound"] in ("bandwidth", "compute")
    assert printed.count("  contender ") == len(result["records"])
    assert f"{len(result['records'])} cases timed" in printed
    return result


def test_smoke_writes_json_table_and_png(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    assert cli.main(["bench", "--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    timed = {"auto", "torch"} | ({"cpu"} & set(hen_fast.available_backends()))
    result = check_result(out, printed, timed)
    assert result["kind"] == "cpu" and result["mode"] == "smoke"
    assert result["instruction_set"] == hen_fast.backends.cpu.instruction_set()
    swept = {(r["similarity"], r["separation"], r["dtype"]) for r in result["records"]}
    assert {("dot", "softmax", "float32"), ("l2", "sparsemax", "float32")} <= swept
    assert ("dot", "softmax", "bfloat16") in swept
    dense = next(r for r in result["records"] if r["separation"] == "softmax")
    assert positive(dense["baselines"]["torch_eager"])
    assert positive(dense["baselines"]["torch_compile"]) and dense["compile_s"] > 0
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 1000
        assert "PNG:" in printed


def test_without_optional_packages_it_says_what_is_left_out(tmp_path, capsys, monkeypatch):
    for module in ("matplotlib", "faiss", "entmax"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as when not installed
    out = tmp_path / "core.json"
    args = ["bench", "--smoke", "--B", "5", "--similarities", "dot", "--out", str(out)]
    assert cli.main([*args, "--separations", "softmax", "sparsemax"]) == 0
    printed = capsys.readouterr().out
    assert "no PNG: matplotlib not installed" in printed and not out.with_suffix(".png").exists()
    assert "faiss not installed: no FAISS column" in printed
    assert "entmax not installed" in printed
    result = json.loads(out.read_text())
    sparse = next(r for r in result["records"] if r["separation"] == "sparsemax")
    assert sparse["baselines"] == {"entmax": "not installed", "faiss": "not installed"}
    assert sparse["ratios"] == {}


def test_the_module_imports_only_the_core_at_module_level():
    allowed = {"torch", "tqdm", "numpy"} | set(sys.stdlib_module_names)
    for path in (ROOT / "hen_fast" / "bench").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            assert {name.split(".")[0] for name in names} <= allowed, (path.name, names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter smoke is for CPU machines")
def test_gpu_script_smoke_runs_triton_through_the_interpreter(tmp_path, capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored afterwards; the run sets it too
    script = benchmark_script("bench_retrieve_gpu")
    out = tmp_path / "gpu.json"
    args = ["--smoke", "--B", "3", "--similarities", "dot", "--out", str(out)]
    assert script.main([*args, "--separations", "softmax", "sparsemax"]) == 0
    result = check_result(out, capsys.readouterr().out, {"auto", "triton"})
    assert result["kind"] == "gpu" and len(result["records"]) == 2
    softmax = next(r for r in result["records"] if r["separation"] == "softmax")
    assert {"torch_eager", "torch_compile", "sdpa"} <= set(softmax["ratios"])


def test_budget_skips_and_counts_the_cases(tmp_path, capsys):
    out = tmp_path / "budget.json"
    assert cli.main(["bench", "--smoke", "--minutes", "1e-9", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    planned = len(cases.plan(bench.build_parser().parse_args(["--smoke"]), "cpu"))
    assert result["records"] == [] and result["skipped_counts"] == {"budget": planned}
    assert f"skipped: {planned} budget" in capsys.readouterr().out


def test_limit_measurements_are_positive():
    measure = machine.cpu_timer(0.0, min_runs=1)
    for limits in (machine.cpu_limits(measure, small=True), machine.gpu_limits("cpu", measure)):
        assert positive(limits["bandwidth_bytes_per_s"])
        assert all(positive(rate) for rate in limits["matmul_flops_per_s"].values())


def test_bytes_flops_and_the_rate_each_bank_dtype_uses():
    case = cases.Case(B=2, M=10, d=4, dtype="float32", similarity="dot", separation="softmax")
    assert case.bytes == 10 * 4 * 4 + 2 * (2 * 4) * 4  # bank once, queries and output
    assert case.flops == 2 * 2 * 10 * (4 + 4)
    limits = {"bandwidth_bytes_per_s": 1.0, "matmul_flops_per_s": {"float32": 2.0, "bfloat16": 8.0}}
    assert machine.matmul_rate(limits, "bfloat16") == 8.0
    assert machine.matmul_rate(limits, "float16") == machine.matmul_rate(limits, "float32") == 2.0
    assert cases.t_min_s(case, limits) == (224.0, "bandwidth")


def test_default_cpu_sweep_and_narrowing():
    parse = bench.build_parser().parse_args
    full = cases.plan(parse([]), "cpu")
    assert {c.M for c in full} >= {10**6, 10**7} and {c.d for c in full} == {128}
    assert {c.B for c in full} == {1, 4, 16, 64, 256, 1024, 4096}
    assert {c.separation for c in full} == {"softmax", "sparsemax"}
    assert {c.dtype for c in full} == {"float32", "bfloat16"}
    narrowed = cases.plan(
        parse(["--B", "1", "16", "--M", "1e6", "--separations", "softmax"]), "cpu"
    )
    expected = [(1, "dot"), (1, "l2"), (16, "dot"), (16, "l2")]
    assert sorted((c.B, c.similarity) for c in narrowed) == expected
    assert {(c.M, c.d, c.dtype) for c in narrowed} == {(10**6, 128, "float32")}
    gpu = cases.plan(parse([]), "gpu")
    assert not any(c.separation == "polynomial" and c.similarity != "dot" for c in gpu)


def test_bad_arguments_stop_before_any_work(tmp_path, capsys):
    out = tmp_path / "never.json"
    assert cli.main(["bench", "--smoke", "--B", "0", "--out", str(out)]) == 2
    assert "--B" in capsys.readouterr().err and not out.exists()


def benchmark_script(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crossover_script_times_every_path_and_records_the_cpu(tmp_path):
    """benchmarks/crossover_cpu.py --quick (the measurement behind the cpu backend's path rule):
    a row per case with a positive time for the one-pass path, the tiled path and the torch
    backend, and the CPU it ran on."""
    from hen_fast.backends import cpu

    if not cpu.load_extension():
        pytest.skip("the C++ kernel is not built")
    crossover = benchmark_script("crossover_cpu")
    out = tmp_path / "crossover.json"
    crossover.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["cpu"] == machine.machine_name("cpu")
    assert result["instruction_set"] == cpu.instruction_set()
    isa = cpu.instruction_sets()[-1].replace("amx", "avx512")
    assert [row["B"] for row in result["rows"]] == [1, 64]
    for row in result["rows"]:
        assert set(row["ms"]) == {f"onepass-{isa}", "tiled", "torch"}
        assert all(positive(ms) for ms in row["ms"].values()), row


def test_hen_recall_script_covers_every_cue_and_encoder(tmp_path, capsys):
    """benchmarks/hen_recall.py on a few held-out photos: a row per encoder and cue with an exact
    recall in [0, 1], the untiled patch models beside the tiled defaults, the table and plot."""
    hen_recall = benchmark_script("hen_recall")
    out = tmp_path / "recall.json"
    hen_recall.main(["--data", "photos", "--memories", "12", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["cpu"] == machine.machine_name("cpu") and out.with_suffix(".png").exists()
    encoders_seen = {row["encoder"] for row in result["rows"]}
    assert {"pixels", "patches-kl", "patches-kl untiled"} <= encoders_seen
    assert len(result["rows"]) == len(encoders_seen) * len(hen_recall.CUES)
    for row in result["rows"]:
        assert row["memories"] == 12 and 0 <= row["exact"] <= 1, row
    pixels_known = [r for r in result["rows"] if r["encoder"] == "pixels" and "known" in r["cue"]]
    assert all(r["exact"] == 1.0 for r in pixels_known)  # masked pixels match their memory
    assert "| photos | patches-kl |" in capsys.readouterr().out


def test_index_script_compares_indexed_and_scanned_calls(tmp_path, capsys):
    """benchmarks/index_cpu.py --quick: a row per case with both times, the fraction read, the
    agreement with the scan, the CPU it ran on, and the plot."""
    index_cpu = benchmark_script("index_cpu")
    out = tmp_path / "index.json"
    index_cpu.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["cpu"] == machine.machine_name("cpu") and out.with_suffix(".png").exists()
    assert {row["separation"] for row in result["rows"]} == {"sparsemax", "entmax", "softmax"}
    assert {row["data"] for row in result["rows"]} == {"clustered", "isotropic"}
    for row in result["rows"]:
        assert positive(row["indexed_ms"]) and positive(row["scan_ms"]), row
        assert 0 < row["fraction_read"] <= 1 and row["same_support"] and row["same_argmax"]
        assert row["max_abs_diff"] < 1e-4, row
    # --table: the README's table and the plot again, from the saved JSON
    out.with_suffix(".png").unlink()
    capsys.readouterr()
    index_cpu.main(["--table", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| data, M, clusters | B | beta | sparsemax | entmax | softmax |")
    assert len(lines) == 2 + 2 * 2 * 2  # (clustered, isotropic) x B (1, 4) x beta (30, 300)
    assert out.with_suffix(".png").exists()
