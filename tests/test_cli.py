"""The hen-fast command line: the demo (the main job), the HEN experiment subcommands on tiny
sizes, and the backend listing."""

import json
import subprocess
import sys

from PIL import Image

from hen_fast import cli


def table_rows(printed: str) -> list[list[str]]:
    return [
        line.split()
        for line in printed.splitlines()
        if line.split()[:1] in (["mnist"], ["patches"])
    ]


def test_demo_prints_the_table_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--memories", "40", "--out", str(out)]) == 0
    rows = table_rows(capsys.readouterr().out)
    methods = {(r[0], r[1], " ".join(r[2:-4])) for r in rows}
    for data in ("mnist", "patches"):
        assert (data, "occluded", "pixels") in methods
        assert (data, "occluded", "pixels + known") in methods
        assert (data, "noisy", "pixels") in methods
    for row in rows:
        exact, mse, ssim_error = (float(v) for v in row[-4:-1])
        assert 0 <= exact <= 100 and 0 <= mse <= 1 and 0 <= ssim_error <= 2
    # told which pixels are real, raw pixels recall every occluded digit of 40
    known = next(r for r in rows if r[:2] == ["mnist", "occluded"] and "known" in r)
    assert float(known[-4]) == 100.0
    with Image.open(out) as image:
        assert image.width > 10 * 28 and image.height > 2 * 6 * 28


def test_demo_rejects_bad_arguments(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--memories", "6000", "--out", ""]) == 2
    assert "--memories" in capsys.readouterr().err
    assert cli.main(["demo", "--noise", "-1", "--out", ""]) == 2
    assert "--noise" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_hen_table1_and_sweeps_write_json_and_png(tmp_path, capsys):
    out = str(tmp_path)
    tiny = ["--encoders", "identity", "--out", out]
    assert (
        cli.main(["hen-table1", "--sizes", "12", "24", "--betas", "1", "--kmn-betas", "1", *tiny])
        == 0
    )
    record = json.loads((tmp_path / "table1-mnist.json").read_text())
    methods = {(r["method"], r["similarity"], r["size"]) for r in record["rows"]}
    assert ("hen+known", "l2", 24) in methods and ("kmn", "exp-kernel", 12) in methods
    for row in record["rows"]:
        assert 0 <= row["exact"] <= 1 and row["mse"] >= 0
    assert cli.main(["hen-beta-sweep", "--size", "15", "--betas", "0.1", "10", *tiny]) == 0
    assert len(json.loads((tmp_path / "beta-sweep-mnist.json").read_text())["rows"]) == 4
    assert cli.main(["hen-separability", "--size", "15", *tiny]) == 0
    hist = json.loads((tmp_path / "separability-mnist.json").read_text())["histograms"]
    assert 0 <= hist["identity"]["overlap"] <= 1
    assert cli.main(["hen-rank", "--size", "15", "--steps", "2", "--betas", "1", *tiny]) == 0
    curve = json.loads((tmp_path / "rank-mnist.json").read_text())["curves"][0]
    assert len(curve["relative_rank"]) == 3 and curve["relative_rank"][0] == 1.0
    for name in ("table1-mnist", "beta-sweep-mnist", "separability-mnist", "rank-mnist"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.width > 100


def test_hen_hetero_writes_json_and_pngs(tmp_path, capsys):
    args = ["hen-hetero", "--sizes", "10", "20", "--encoders", "identity", "--betas", "40"]
    assert cli.main([*args, "--text", "pixel-hash", "minilm", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "hetero-mnist.json").read_text())
    hashed = [r for r in record["rows"] if r["text"] == "pixel-hash"]
    assert [r["size"] for r in hashed] == [10, 20]
    assert all(
        r["exact"] == 1.0 for r in hashed
    )  # distinct hashes: every caption recalls its image
    shared = record["shared_caption"][0]
    # one update from a shared caption: the mixture, nearer to the mean than to either image
    assert shared["mse_mean_1step"] < min(shared["mse_a_1step"], shared["mse_b_1step"])
    for name in ("hetero-mnist", "shared-caption-mnist"):
        assert (tmp_path / f"{name}.png").is_file()


def test_console_script_lists_backends():
    done = subprocess.run(
        [sys.executable, "-m", "hen_fast.cli", "backends"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split()[:2] == ["torch", "available"]


def test_hen_scaling_writes_json_and_png(tmp_path, capsys):
    import torch

    from hen_fast.experiments.scaling import meta_stable_fraction

    out = str(tmp_path)
    args = ["hen-scaling", "--sizes", "8", "20", "--encoders", "identity", "--kmn-size", "8"]
    assert cli.main([*args, "--out", out]) == 0
    record = json.loads((tmp_path / "scaling-mnist.json").read_text())
    methods = {(r["method"], r["size"]) for r in record["rows"]}
    assert methods == {("hen", 8), ("hen", 20), ("hen+known", 8), ("hen+known", 20), ("kmn", 8)}
    for row in record["rows"]:
        assert 0 <= row["exact"] <= 1 and 0 <= row["meta_stable"] <= 1
        assert 0 < row["relative_rank"] <= 1 and row["one_minus_ssim"] >= 0
    # told which pixels are real, raw pixels recall every occluded digit, each one memory
    known = [r for r in record["rows"] if r["method"] == "hen+known"]
    assert all(r["exact"] == 1.0 and r["meta_stable"] == 0.0 for r in known)
    with Image.open(tmp_path / "scaling-mnist.png") as image:
        assert image.width > 100
    assert cli.main(["hen-scaling", "--sizes", "9000", "--out", out]) == 2
    assert "--sizes" in capsys.readouterr().err
    memories = torch.eye(3)
    assert meta_stable_fraction(memories, memories) == 0.0
    mixtures = torch.stack([memories[:2].mean(0), memories[0] * 1.01])
    assert meta_stable_fraction(mixtures, memories) == 0.5
