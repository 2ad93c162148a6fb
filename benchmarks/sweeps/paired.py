"""Study 2's table: each loss run by dmlkit and by pytorch-metric-learning, paired seed by seed.

    python benchmarks/sweeps/paired.py sweeps/pml/report/trials.csv [--factor objective] [--metrics ...]

Reads the ``trials.csv`` of ``dmlkit sweep report`` for a study whose factor levels are named
``<row> / <side>`` (``contrastive / dmlkit``, ``contrastive / PML``: ``benchmarks/sweeps/pml.yaml``), and
prints a Markdown table: per row, each side's mean ± std over seeds of each metric and of images/s, the
paired difference dmlkit − PML (mean ± std over the seeds both sides ran), and whether dmlkit is at least
PML's within noise: for every metric and for images/s, dmlkit's mean is at least PML's mean less the larger of
the two sides' standard deviations over seeds (the run-to-run noise of that number).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path
from statistics import fmean, stdev


def _mean_std(values: list[float]) -> tuple[float, float]:
    return fmean(values), (stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], digits: int = 4) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def read_pairs(path: Path, factor: str, sides: tuple[str, str]) -> dict[str, dict[str, dict[int, dict]]]:
    """``{row: {side: {seed: csv row}}}`` from a ``trials.csv``, the factor's levels split at `` / ``."""
    table: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: {side: {} for side in sides})
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            if factor not in record:
                raise SystemExit(f"{path}: no column {factor!r} (columns: {', '.join(record)})")
            level = record[factor]
            row, sep, side = level.rpartition(" / ")
            if not sep or side not in sides:
                expected = " or ".join(f"'<row> / {side}'" for side in sides)
                raise SystemExit(f"{path}: level {level!r} is not {expected}")
            table[row][side][int(record["seed"])] = record
    return dict(table)


def paired_table(
    pairs: dict[str, dict[str, dict[int, dict]]], metrics: list[str], sides: tuple[str, str]
) -> list[str]:
    ours, theirs = sides
    columns = [*metrics, "images_per_s"]
    head = ["row"] + [f"{m} {side}" for m in columns for side in sides]
    head += [f"Δ {m} ({ours} − {theirs})" for m in metrics] + [f"images/s {ours}/{theirs}", "≥ within noise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, by_side in pairs.items():
        seeds = sorted(set(by_side[ours]) & set(by_side[theirs]))
        if not seeds:
            continue
        cells = [row]
        for metric in columns:
            for side in sides:
                values = [float(by_side[side][s][metric]) for s in seeds]
                cells.append(_cell(values, 0 if metric == "images_per_s" else 4))
        holds = True
        for metric in columns:
            ours_values = [float(by_side[ours][s][metric]) for s in seeds]
            theirs_values = [float(by_side[theirs][s][metric]) for s in seeds]
            noise = max(_mean_std(ours_values)[1], _mean_std(theirs_values)[1])
            holds &= fmean(ours_values) >= fmean(theirs_values) - noise
            if metric in metrics:
                mean, std = _mean_std([a - b for a, b in zip(ours_values, theirs_values, strict=True)])
                cells.append(f"{mean:+.4f} ± {std:.4f}")
        ratios = [
            float(by_side[ours][s]["images_per_s"]) / float(by_side[theirs][s]["images_per_s"]) for s in seeds
        ]
        cells.append(f"{fmean(ratios):.3f}")
        cells.append("yes" if holds else "**no**")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trials", type=Path, help="a study's report/trials.csv")
    parser.add_argument("--factor", default="objective", help="the factor whose levels are '<row> / <side>'")
    parser.add_argument("--sides", nargs=2, default=["dmlkit", "PML"], help="ours, then the reference")
    parser.add_argument("--metrics", nargs="+", default=["test recall@1", "test map@r"])
    args = parser.parse_args(argv)
    sides = (args.sides[0], args.sides[1])
    print("\n".join(paired_table(read_pairs(args.trials, args.factor, sides), args.metrics, sides)))


if __name__ == "__main__":
    main()
