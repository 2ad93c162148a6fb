"""Multi-process training on the CPU: seconds per epoch of ``dmlkit train`` on ``synthetic`` with one process
and with ``--nproc-per-node 2`` (gloo), the same global batches; and whether they trained the same model.

    python benchmarks/distributed_cpu.py --epochs 3 --out /tmp/dist_bench

On a machine with 2 cores the two processes share the cores the one process had, so no speed-up is expected:
the numbers show the cost of the distributed code path (gathers, DDP's all-reduce, the sharded evaluation).
The first epoch is left out of the mean (start-up). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dmlkit.cli import main as dmlkit


def train(out: Path, name: str, epochs: int, nproc: int) -> dict[str, float]:
    argv = ["train", "--name", name, "--output-dir", str(out), "--overwrite", "--epochs", str(epochs),
            "--backbone", "small_cnn", "--embedding-size", "64", "--batch-size", "64",
            "--samples-per-class", "4", "--val-fraction", "0.1", "--deterministic", "--freeze-bn",
            "--no-progress", "--device", "cpu", "--num-workers", "0",
            "--metrics", "recall@1,map@r"]  # fmt: skip
    if nproc > 1:
        argv += ["--nproc-per-node", str(nproc)]
    started = time.perf_counter()
    assert dmlkit(argv) == 0, name
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / name / "history.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    results = json.loads((out / name / "results.json").read_text())
    return {
        "epoch_s": statistics.fmean(r["epoch_time_s"] for r in steady),
        "images_per_s": statistics.fmean(r["images_per_s"] for r in steady),
        "wall_s": wall,
        "test map@r": results["test_after"]["map@r"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/dist_bench"))
    args = parser.parse_args()
    one = train(args.out, "one", args.epochs, 1)  # torch's threads: one per core
    two = train(args.out, "two", args.epochs, 2)  # torchrun: one thread per process (OMP_NUM_THREADS=1)
    weights = [torch.load(args.out / n / "last.pt", weights_only=True)["model"] for n in ("one", "two")]
    differs = max(float((weights[0][k].float() - weights[1][k].float()).abs().max()) for k in weights[0])
    print("| processes | s / epoch | images / s | wall (s, with start-up and evaluation) | test MAP@R |")
    print("|---|---:|---:|---:|---:|")
    for label, row in (("1", one), ("2 (gloo)", two)):
        print(f"| {label} | {row['epoch_s']:.2f} | {row['images_per_s']:.0f} | {row['wall_s']:.1f} | "
              f"{row['test map@r']:.4f} |")  # fmt: skip
    print(f"\nratio 2 / 1 processes, s per epoch: {two['epoch_s'] / one['epoch_s']:.2f}; largest weight "
          f"difference after {args.epochs} epochs: {differs:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
