"""Cost of the build-time image check (``--verify-images``) on a folder or CSV of real photos.

    python benchmarks/verify_images.py --csv ../shared/data/clothing/images.csv --rounds 3

Times :func:`dmlkit.data.images.verify_images` in each mode (``header``: parse headers; ``full``: decode
every image; ``auto``: headers, then a full decode under the pixel budget), alternating modes round by
round, and reports the median seconds and the images' total pixels (what ``auto`` compares with its budget).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from dmlkit.data import images

MODES = ("header", "full", "auto")


def _paths(table: Path, column: str, extension: str) -> list[str]:
    with table.open(newline="", encoding="utf-8-sig") as handle:
        rows = [row[column] for row in csv.DictReader(handle)]
    base = table.parent / "images" if (table.parent / "images").is_dir() else table.parent
    return [str(base / (row if Path(row).suffix else row + extension)) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--column", default="image")
    parser.add_argument("--extension", default=".jpg")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    paths = _paths(args.csv, args.column, args.extension)
    _, pixels = images._check_all(paths, False, 3, images.DEFAULT_MAX_IMAGE_PIXELS)
    print(
        f"{len(paths)} images, {pixels.sum() / 1e9:.2f}·10⁹ pixels (auto budget: "
        f"{images.FULL_VERIFY_PIXEL_BUDGET / 1e9:.0f}·10⁹)"
    )
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            started = time.perf_counter()
            images.verify_images(paths, True, str(args.csv), mode=mode)  # the CSV lists a few missing files
            times[mode].append(time.perf_counter() - started)
    print("| mode | seconds (median) | per image, ms |")
    print("|---|---|---|")
    for mode in MODES:
        seconds = statistics.median(times[mode])
        print(f"| {mode} | {seconds:.2f} | {seconds / len(paths) * 1000:.2f} |")


if __name__ == "__main__":
    main()
