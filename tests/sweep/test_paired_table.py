"""benchmarks/sweeps/paired.py: study 2's paired dmlkit-vs-PML table, checked against a hand computation."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sweeps" / "paired.py"


def _load():
    spec = importlib.util.spec_from_file_location("paired", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(level: str, maps: list[float], speeds: list[float]) -> list[dict]:
    return [
        {"trial": 0, "config": "c", "objective": level, "seed": seed, "test map@r": m, "images_per_s": v}
        for seed, (m, v) in enumerate(zip(maps, speeds, strict=True))
    ]


def test_the_table_holds_the_hand_computed_means_differences_and_verdicts(tmp_path):
    paired = _load()
    rows = (
        _rows("circle / dmlkit", [0.40, 0.42, 0.41], [1000.0, 1100.0, 1050.0])
        + _rows("circle / PML", [0.41, 0.42, 0.40], [900.0, 1000.0, 950.0])
        # dmlkit 0.03 below with a spread of 0.01: beyond the noise
        + _rows("arcface / dmlkit", [0.30, 0.31, 0.29], [1000.0, 1000.0, 1000.0])
        + _rows("arcface / PML", [0.33, 0.34, 0.32], [1000.0, 1000.0, 1000.0])
        # as accurate, but slower beyond the noise
        + _rows("supcon / dmlkit", [0.40, 0.40, 0.40], [800.0, 810.0, 790.0])
        + _rows("supcon / PML", [0.40, 0.40, 0.40], [1000.0, 1010.0, 990.0])
    )
    pairs = paired.read_pairs(_write(tmp_path / "trials.csv", rows), "objective", ("dmlkit", "PML"))
    lines = paired.paired_table(pairs, ["test map@r"], ("dmlkit", "PML"))
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    circle = table["circle"]
    assert circle[1] == "0.4100 ± 0.0100" and circle[2] == "0.4100 ± 0.0100"
    assert circle[3] == "1050 ± 50" and circle[4] == "950 ± 50"
    # paired differences −0.01, 0, +0.01: mean 0, std 0.01
    assert circle[5] == "+0.0000 ± 0.0100"
    assert float(circle[6]) == pytest.approx((1000 / 900 + 1100 / 1000 + 1050 / 950) / 3, abs=5e-4)
    assert circle[7].rstrip(" |") == "yes"
    assert table["arcface"][5] == "-0.0300 ± 0.0000"
    assert table["arcface"][7].rstrip(" |") == "**no**"
    assert table["supcon"][7].rstrip(" |") == "**no**"


def test_a_level_not_named_row_slash_side_is_refused_with_its_name(tmp_path):
    paired = _load()
    path = _write(tmp_path / "trials.csv", _rows("circle", [0.4], [1000.0]))
    with pytest.raises(SystemExit, match="level 'circle' is not"):
        paired.read_pairs(path, "objective", ("dmlkit", "PML"))
