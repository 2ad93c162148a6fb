"""Fixtures shared by the whole suite: tiny, fast training configurations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dmlkit.config import TrainConfig, make_config
from tests_support import TINY_DATA


def tiny_config_dict(output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A run of a few seconds: 6 training classes × 8 images at 16×16, 3 batches per epoch."""
    config: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "dataset": "synthetic",
        "dataset_args": dict(TINY_DATA),
        "val_fraction": 0.25,
        "embedding_size": 16,
        "batch_size": 16,
        "samples_per_class": 4,
        "epochs": 3,
        "deterministic": True,
        "progress": False,
        "metrics": ["recall@1", "map@r"],
        "select_metric": "map@r",
        "eval_batch_size": 64,
    }
    config.update(overrides)
    return config


@pytest.fixture
def tiny_config(tmp_path: Path):
    def make(**overrides: Any) -> TrainConfig:
        return make_config(tiny_config_dict(tmp_path / "runs", **overrides))

    return make
