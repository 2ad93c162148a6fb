"""Run-directory logging: a log file, a JSONL history of per-epoch metrics, optional TensorBoard / W&B."""

from __future__ import annotations

import json
import logging
import math
import sys
import typing
from pathlib import Path
from typing import Any

from dmlkit.config import TrainConfig
from dmlkit.errors import ConfigError

LOGGER_NAME = "dmlkit"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (so redirection and capture keep working)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> typing.TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value: typing.TextIO) -> None:
        pass


def setup_file_logging(run_dir: Path) -> logging.Handler:
    """Send the ``dmlkit`` logger to ``run_dir/train.log`` (and to the console at INFO)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the CLI's root handler would print every line twice
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        console = _StdoutHandler()  # progress bars use stderr; the report goes to stdout
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return handler


class RunLogger:
    """Appends one JSON line per epoch to ``history.jsonl`` and mirrors scalars to optional loggers."""

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        self.history_path = run_dir / "history.jsonl"
        log = config.log
        self.per_step = log.tensorboard or log.wandb  # per-iteration scalars go to these only
        self.tb = None
        self.wandb_run = None
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "--tensorboard needs the tensorboard package: pip install 'dmlkit[tensorboard]'"
                ) from exc
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if log.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ConfigError("--wandb needs the wandb package: pip install 'dmlkit[wandb]'") from exc
            self.wandb_run = wandb.init(
                project=log.wandb_project,
                name=config.run.name,
                config=config.model_dump(mode="json"),
                dir=str(run_dir),
                resume="allow",
            )

    def log_epoch(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.history_path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        self.log_scalars(clean, step=int(row.get("step", 0)))

    def log_scalars(self, values: dict[str, Any], step: int) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop history rows of epochs that the resumed run will redo."""
        if not self.history_path.exists():
            return
        rows = [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("epoch", 0) <= epoch]
        self.history_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
