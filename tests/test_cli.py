"""The hen-fast command line: the demo (the main job) and the backend listing."""

import subprocess
import sys

from PIL import Image

from hen_fast import cli


def test_demo_prints_the_recall_table_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--memories", "60", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for similarity, separation, _ in cli.DEMO_CONFIGS:
        assert any(line.split()[:2] == [similarity, separation] for line in printed.splitlines())
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] == ["manhattan"]]
    exact, nearest = float(rows[0][3]), float(rows[0][4])
    assert 0 <= exact <= nearest <= 100
    with Image.open(out) as image:
        assert image.size[1] == (2 + len(cli.DEMO_CONFIGS)) * 28 * 2


def test_demo_random_mask_is_easier_than_occlusion(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nearest = {}
    for mask in ("half", "random"):
        assert cli.main(["demo", "--memories", "100", "--mask", mask, "--out", ""]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        nearest[mask] = next(float(r[4]) for r in rows if r[:2] == ["manhattan", "sparsemax"])
    assert nearest["random"] >= 90 > nearest["half"]
    assert not list(tmp_path.iterdir())  # --out '' writes nothing


def test_demo_rejects_too_many_memories(capsys):
    assert cli.main(["demo", "--memories", "6000", "--out", ""]) == 2
    assert "--memories" in capsys.readouterr().err


def test_console_script_lists_backends():
    done = subprocess.run(
        [sys.executable, "-m", "hen_fast.cli", "backends"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split()[:2] == ["torch", "available"]
