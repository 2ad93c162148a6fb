"""The run directory: one folder per training run, and every file the run writes there.

========================  =================================================================
``config.yaml``           the fully resolved configuration (re-runnable with ``--config``)
``history.jsonl``         one line per epoch
``last.pt``               the complete training state after the last epoch (or an interruption)
``best.pt``               the model of the epoch with the best validation ``select_metric``
``results.json``          test metrics before training and of ``best.pt``
``train.log``             the log
========================  =================================================================
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from dmlkit.config import TrainConfig, dump_yaml
from dmlkit.errors import ConfigError
from dmlkit.train import checkpoint as ckpt


class RunDirectory:
    """A run's folder; :meth:`create` starts a new run, :meth:`existing` continues one."""

    CONFIG = "config.yaml"
    HISTORY = "history.jsonl"
    LAST = "last.pt"
    BEST = "best.pt"
    RESULTS = "results.json"
    LOG = "train.log"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, config: TrainConfig) -> RunDirectory:
        """``<output_dir>/<name>`` (name: a timestamp by default); refuses a folder that holds a run."""
        run = config.run
        name = run.name or (
            f"{config.data.dataset.name}-{config.objective.loss.name}-{datetime.now():%Y%m%d-%H%M%S}"
        )
        directory = cls(Path(run.output_dir) / name)
        if directory.has_checkpoint:
            raise ConfigError(
                f"run directory {directory.path} already holds a run; resume it with --resume "
                f"{directory.path} or choose another --name"
            )
        directory.path.mkdir(parents=True, exist_ok=True)
        return directory

    @classmethod
    def existing(cls, path: str | Path) -> RunDirectory:
        """A run to continue: the folder must hold ``last.pt``."""
        directory = cls(path)
        if not directory.has_checkpoint:
            raise ConfigError(f"--resume {directory.path}: no {cls.LAST} there to resume from")
        return directory

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def has_checkpoint(self) -> bool:
        return self.file(self.LAST).exists()

    def write_config(self, config: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, self.file(self.CONFIG))

    def save(self, state: dict[str, Any], name: str = LAST) -> Path:
        """Write a checkpoint atomically (see :func:`dmlkit.train.checkpoint.save_atomic`)."""
        path = self.file(name)
        ckpt.save_atomic(state, path)
        return path

    def load(self, name: str = LAST, map_location: Any = "cpu") -> dict[str, Any]:
        return ckpt.load(self.file(name), map_location=map_location)

    def write_results(self, results: dict[str, Any]) -> None:
        self.file(self.RESULTS).write_text(json.dumps(results, indent=2))

    def __str__(self) -> str:
        return str(self.path)
