"""``dmlkit index build`` throughput on real images: a first build, an up-to-date re-run, an incremental add.

    python benchmarks/index_build.py --checkpoint RUN/best.pt --images DIR [--limit N] [--add 0.1]

The first ``(1 − add)`` of the folder's images (sorted, at most ``--limit``) are copied as links into a
scratch gallery folder and indexed; the build is timed in this process (``dmlkit.cli.main``, imports and
model loading excluded from nothing but the interpreter's start: the checkpoint is loaded inside the timed
call, as the command does). Then the same command is re-run on the unchanged folder (nothing to embed), and
the remaining images are added and the command run again (only they are embedded). Prints images/s of each
step: embedding, atomic chunk writes and the faiss index together.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dmlkit.cli import main as dmlkit
from dmlkit.data.images import EMBED_EXTENSIONS


def images_of(folder: Path, limit: int | None) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EMBED_EXTENSIONS and p.is_file())
    return found[:limit] if limit else found


def link(paths: list[Path], source: Path, target: Path) -> None:
    for path in paths:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), destination)


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    code = dmlkit(argv)
    if code != 0:
        raise SystemExit(f"dmlkit {' '.join(argv)} exited {code}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--add", type=float, default=0.1, help="share of the images added incrementally")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = images_of(args.images, args.limit)
    first = paths[: round(len(paths) * (1 - args.add))]
    scratch = Path(tempfile.mkdtemp(prefix="index_bench_"))
    try:
        gallery, out = scratch / "gallery", scratch / "index"
        link(first, args.images, gallery)
        command = [
            "index",
            "build",
            "--checkpoint",
            args.checkpoint,
            "--images",
            str(gallery),
            "--out",
            str(out),
        ]
        command += ["--batch-size", str(args.batch_size), "--no-progress"]
        build = timed(command)
        again = timed(command)
        link(paths[len(first) :], args.images, gallery)
        added = timed(command)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rest = len(paths) - len(first)
    print()
    print("| step | images embedded | seconds | images/s |")
    print("|---|---:|---:|---:|")
    print(f"| first build | {len(first)} | {build:.1f} | {len(first) / build:.1f} |")
    print(f"| re-run, nothing new | 0 | {again:.1f} | – |")
    print(f"| add {rest} new images | {rest} | {added:.1f} | {rest / added:.1f} |")


if __name__ == "__main__":
    main()
