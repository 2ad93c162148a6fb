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


class RunLogFile(logging.Handler):
    """The run's ``train.log``, opened only when the run starts (:meth:`open`): records logged before are
    kept in memory and written first, so a run that fails or is interrupted during set-up writes no file
    (and a refused resume leaves the run's log untouched)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._pending: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._pending.append(record)
        else:
            self._file.handle(record)

    def open(self, path: Path) -> None:
        """Append to ``path`` from now on, starting with the records kept so far."""
        self._file = logging.FileHandler(path)
        self._file.setFormatter(self.formatter)
        for record in self._pending:
            self._file.handle(record)
        self._pending.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._pending.clear()
        super().close()


def setup_run_logging() -> RunLogFile:
    """Send the ``dmlkit`` logger to the console at INFO and to a :class:`RunLogFile` (returned; the caller
    opens it in the run directory and removes it when the run ends)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the CLI's root handler would print every line twice
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        console = _StdoutHandler()  # progress bars use stderr; the report goes to stdout
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    handler = RunLogFile()
    logger.addHandler(handler)
    return handler


class RunLogger:
    """Appends one JSON line per epoch to ``history.jsonl`` and mirrors scalars to optional loggers."""

    def __init__(self, config: TrainConfig, run_dir: Path, *, enabled: bool = True) -> None:
        self.history_path = run_dir / "history.jsonl"
        self.enabled = enabled  # False on the ranks of a multi-process run other than rank 0: nothing written
        log = config.log
        self.per_step = enabled and (log.tensorboard or log.wandb)  # per-iteration scalars go to these only
        self.tb = None
        self.wandb_run = None
        if not enabled:
            return
        if log.tensorboard:
            self.tb = _import_logger("tensorboard").SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if log.wandb:
            self.wandb_run = _import_logger("wandb").init(
                project=log.wandb_project,
                name=config.run.name,
                config=config.model_dump(mode="json"),
                dir=str(run_dir),
                resume="allow",
            )

    @staticmethod
    def check_available(config: TrainConfig) -> None:
        """Raise ``ConfigError`` now (before data loading) if a configured logger's package is missing."""
        for name in ("tensorboard", "wandb"):
            if getattr(config.log, name):
                _import_logger(name)

    def log_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
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
        if not self.enabled or not self.history_path.exists():
            return
        rows = [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("epoch", 0) <= epoch]
        self.history_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _import_logger(name: str) -> Any:
    """The module of an optional logger (``tensorboard``: its ``SummaryWriter`` module; ``wandb``); a
    missing package is a ``ConfigError`` naming the flag and the install command."""
    try:
        if name == "tensorboard":
            import torch.utils.tensorboard as module
        else:
            import wandb as module
    except ImportError as exc:
        raise ConfigError(f"--{name} needs the {name} package: pip install 'dmlkit[{name}]'") from exc
    return module
