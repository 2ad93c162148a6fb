"""The run directory: one folder per training run, and every file the run writes there.

========================  =================================================================
``config.yaml``           the fully resolved configuration (re-runnable with ``--config``)
``history.jsonl``         one line per epoch
``last.pt``               the complete training state after the last epoch (or an interruption)
``best.pt``               the model of the selected epoch (see ``results.json``'s ``selection``)
``results.json``          test metrics before training and of ``best.pt``, and how it was selected
``train.log``             the log
``tensorboard/``          with ``--tensorboard``; ``wandb/`` with ``--wandb``
========================  =================================================================

Nothing is written before the run has *started* (a new run: after its set-up and the test before training;
a resumed run: once its state is loaded). A run that fails or is interrupted during set-up therefore leaves
no folder behind, and a resume that is refused or fails leaves the run exactly as it was. A new run never
writes into a folder that holds another run's files unless ``overwrite`` is given; those files are then
removed when the new run starts, not before.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from dmlkit.config import TrainConfig, config_from_checkpoint, dump_yaml, load_yaml, make_config
from dmlkit.config.sections import RESUMABLE
from dmlkit.errors import ConfigError, DataError
from dmlkit.train import checkpoint as ckpt


class RunDirectory:
    """A run's folder: :meth:`for_new_run` checks where a new run goes, :meth:`existing` opens one to
    continue; :meth:`start` creates and fills it when the run starts."""

    CONFIG = "config.yaml"
    HISTORY = "history.jsonl"
    LAST = "last.pt"
    BEST = "best.pt"
    RESULTS = "results.json"
    LOG = "train.log"
    #: Everything a run writes in its folder (what ``overwrite`` removes); temporary checkpoint files
    #: (``.last.pt.*.tmp``, left by a killed write) count too.
    ARTIFACTS = (CONFIG, HISTORY, LAST, BEST, RESULTS, LOG, "tensorboard", "wandb")

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._state: dict[str, Any] | None = None  # last.pt, loaded once when resuming

    # ----------------------------------------------------------------------------------------- new runs
    @classmethod
    def for_new_run(
        cls, config: TrainConfig, path: str | Path | None = None, *, overwrite: bool = False
    ) -> RunDirectory:
        """Where a new run goes: ``path``, or ``<output_dir>/<name>`` (name: dataset, loss and a timestamp,
        made unique by a suffix). Checks it (:meth:`check_new`) and creates nothing."""
        if path is None:
            output_dir = Path(config.run.output_dir).expanduser()
            _check_folder_path(output_dir, "--output-dir")
            if config.run.name:
                path = output_dir / config.run.name
            else:
                # a foreign loss (``pml:ContrastiveLoss``) has a ':' no folder name should hold
                loss = re.sub(r"[^A-Za-z0-9_.-]", "_", config.objective.loss.name)
                run = f"{config.data.dataset.name}-{loss}"
                stem = f"{run}-{datetime.now():%Y%m%d-%H%M%S}"
                path = output_dir / stem
                suffix = 1
                while path.exists():  # two unnamed runs started in the same second
                    suffix += 1
                    path = output_dir / f"{stem}-{suffix}"
        directory = cls(path, overwrite=overwrite)
        directory.check_new()
        return directory

    def check_new(self) -> None:
        """Refuse a path that is a file, or a folder holding a run's files (unless ``overwrite``)."""
        _check_folder_path(self.path, "run directory")
        found = self.artifacts()
        if found and not self.overwrite:
            names = ", ".join(p.name for p in found)
            resume = (
                f"resume it with --resume {self.path}, "
                if self.has_checkpoint
                else f"it cannot be resumed (no {self.LAST}); "
            )
            raise ConfigError(
                f"run directory {self.path} already holds a run ({names}): {resume}replace it with "
                "--overwrite, or choose another --name"
            )

    def artifacts(self) -> list[Path]:
        """The run files present in the folder (see :attr:`ARTIFACTS`)."""
        if not self.path.is_dir():
            return []
        return sorted(
            entry
            for entry in self.path.iterdir()
            if entry.name in self.ARTIFACTS or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
        )

    def start(self, config: TrainConfig, *, resumed: bool) -> None:
        """The run has started: create the folder (a new run: after removing an old run's files when
        ``overwrite`` was given) and write ``config.yaml``."""
        if not resumed:
            self.check_new()  # again: the folder may have been filled while this run was set up
            for entry in self.artifacts():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    # ----------------------------------------------------------------------------------------- resume
    @classmethod
    def existing(cls, path: str | Path) -> RunDirectory:
        """A run to continue: the folder must hold ``last.pt``."""
        directory = cls(path)
        if directory.path.exists() and not directory.path.is_dir():
            raise ConfigError(f"--resume {directory.path}: not a folder (give the run directory)")
        if not directory.has_checkpoint:
            raise ConfigError(f"--resume {directory.path}: no {cls.LAST} there to resume from")
        return directory

    def resume_state(self) -> dict[str, Any]:
        """The state in ``last.pt`` (loaded on the CPU once, kept until :meth:`release_state`)."""
        if self._state is None:
            self._state = self.load()
        return self._state

    def release_state(self) -> None:
        self._state = None

    def stored_config(self) -> TrainConfig:
        """The configuration the run's state was trained with (``last.pt``'s, not ``config.yaml``'s:
        the state is what resuming continues)."""
        stored = self.resume_state().get("config")
        if not isinstance(stored, dict):
            raise DataError(f"{self.file(self.LAST)} holds no configuration to resume with")
        return config_from_checkpoint(stored, str(self.file(self.LAST)))

    def check_resume(self, config: TrainConfig) -> None:
        """Refuse a resume whose configuration changes an option outside :data:`RESUMABLE` (naming the
        option, the run's value and the one given); nothing is written before this check."""
        changes = differences(self.stored_config(), config)
        refused = [change for change in changes if change[0] not in RESUMABLE]
        if not refused:
            return
        described = "; ".join(
            f"{_flag(path)} ({path}) is {old!r} in the run, {new!r} was given" for path, old, new in refused
        )
        allowed = ", ".join(_flag(path) for path in sorted(RESUMABLE))
        raise ConfigError(
            f"--resume {self.path}: {described}. These cannot change when resuming (start a new run "
            f"instead); options that can: {allowed}"
        )

    def config_file_differences(self) -> list[tuple[str, Any, Any]]:
        """Where ``config.yaml`` differs from ``last.pt``'s configuration (a hand edit, or a file written
        by an older dmlkit before a refused resume); an unreadable file is one difference, ``("config.yaml",
        ...)``."""
        path = self.file(self.CONFIG)
        if not path.is_file():
            return []
        try:
            from_file = make_config(load_yaml(path), str(path))
        except (OSError, ConfigError) as exc:
            return [(self.CONFIG, "unreadable", str(exc).splitlines()[0])]
        return differences(self.stored_config(), from_file)

    # ----------------------------------------------------------------------------------------- files
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def has_checkpoint(self) -> bool:
        return self.file(self.LAST).is_file()

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


def differences(old: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(section.field, old value, new value)`` for every field that differs (values as in YAML)."""
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    return [
        (f"{section}.{name}", before[section].get(name), value)
        for section, fields in after.items()
        for name, value in fields.items()
        if before[section].get(name) != value
    ]


def _flag(path: str) -> str:
    return "--" + path.split(".", 1)[-1].replace("_", "-")


def _check_folder_path(path: Path, what: str) -> None:
    """A folder to create or use: neither it nor an existing parent may be a file."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                culprit = "is a file" if candidate == path else f"is inside {candidate}, which is a file"
                raise ConfigError(f"{what} {path} {culprit}; give a folder")
            return
