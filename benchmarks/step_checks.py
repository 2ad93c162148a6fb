"""Cost of the training step's safety checks (issue 12): non-finite embeddings and loss (one device sync),
and the total gradient norm (also without ``--grad-clip``).

    python benchmarks/step_checks.py --threads 1

Each configuration times ``Trainer._step`` on the same batch, alternating rounds with the checks on (the
shipped step) and off (the two check functions replaced by ones that only read the loss), and reports the
median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any
from unittest import mock

import torch

from dmlkit.config import make_config
from dmlkit.train import loop
from dmlkit.train.loop import Trainer
from dmlkit.train.step import Batch

CASES: dict[str, dict[str, Any]] = {
    "small_cnn 32 px, B=128": {
        "backbone": "small_cnn",
        "dataset_args": {"num_classes": 64, "samples_per_class": 8, "image_size": 32},
        "batch_size": 128,
    },
    "resnet18 64 px, B=64": {
        "backbone": "torchvision:resnet18",
        "dataset_args": {"num_classes": 32, "samples_per_class": 8, "image_size": 64},
        "batch_size": 64,
    },
}


def _trainer(case: dict[str, Any], folder: str) -> tuple[Trainer, Batch]:
    config = make_config(
        {**case, "output_dir": folder, "name": "bench", "val_fraction": 0, "progress": False, "epochs": 1000}
    )
    trainer = Trainer(config)
    trainer._setup()
    images, labels, indices = next(iter(trainer.loader))
    return trainer, Batch(images, labels.long(), indices.long())


def _unchecked_loss(out: Any) -> tuple[float, int]:
    return float(out.loss.detach()), 0


def _time_steps(trainer: Trainer, batch: Batch, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        trainer._step(batch)
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| step ({args.threads} thread(s)) | checks on, ms | checks off, ms | on / off |")
    print("|---|---|---|---|")
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            trainer, batch = _trainer(case, folder)
            _time_steps(trainer, batch, 2)  # warm-up
            on, off = [], []
            for _ in range(args.rounds):
                on.append(_time_steps(trainer, batch, args.steps))
                with (
                    mock.patch.object(loop, "_loss_and_bad_rows", _unchecked_loss),
                    mock.patch.object(Trainer, "_gradient_norm", lambda self: None),
                ):
                    off.append(_time_steps(trainer, batch, args.steps))
            on_ms, off_ms = statistics.median(on), statistics.median(off)
            print(f"| {name} | {on_ms:.1f} | {off_ms:.1f} | {on_ms / off_ms:.3f} |")


if __name__ == "__main__":
    main()
