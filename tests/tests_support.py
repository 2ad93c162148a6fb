"""Command-line equivalents of the tiny test configuration (see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

#: The synthetic dataset of the tiny configuration (tests/conftest.py ``tiny_config``).
TINY_DATA = {"num_classes": 16, "samples_per_class": 8, "image_size": 16, "test_fraction": 0.5}


def tiny_argv(output_dir: Path, name: str = "tiny", epochs: int = 3) -> list[str]:
    return [
        "--name", name, "--output-dir", str(output_dir), "--dataset-args", json.dumps(TINY_DATA),
        "--val-fraction", "0.25", "--embedding-size", "16", "--batch-size", "16", "--samples-per-class", "4",
        "--epochs", str(epochs), "--deterministic", "--no-progress", "--metrics", "recall@1,map@r",
        "--select-metric", "map@r",
    ]  # fmt: skip
