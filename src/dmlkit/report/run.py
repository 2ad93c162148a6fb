"""What a run directory holds, read for a report: the resolved configuration, the per-epoch history, the
test results and which checkpoints exist, with a note for everything missing.

Only ``config.yaml`` is required: every run writes it when it starts (see
:mod:`dmlkit.train.run_dir`), so a folder without it is no run directory. Everything else may be absent in
a run that is still going, was interrupted in its first epoch or failed, and the report says so instead of
failing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmlkit.errors import DataError
from dmlkit.train.run_dir import RunDirectory

#: The checkpoints a report can re-embed the test split with (``--checkpoint``), by their short name.
CHECKPOINTS: dict[str, str] = {"best": RunDirectory.BEST, "last": RunDirectory.LAST}


@dataclass
class RunRecord:
    """A run directory as read from disk.

    ``config``: ``config.yaml`` as a plain mapping (sections → keys; shown as written, not re-validated, so
    a report of an old run never fails on a renamed option). ``history``: the rows of ``history.jsonl``,
    non-finite values as ``None``. ``results``: ``results.json`` (``None`` until the run has finished).
    ``checkpoints``: short name (``best``, ``last``) → file, for those that exist. ``notes``: what is
    missing or odd, one sentence each, shown at the top of the report."""

    path: Path
    config: dict[str, Any]
    config_text: str
    history: list[dict[str, Any]]
    results: dict[str, Any] | None
    checkpoints: dict[str, Path]
    log_tail: list[str]
    notes: list[str] = field(default_factory=list)

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        """``config[section][key]``, or ``default`` when the file lacks it."""
        part = self.config.get(section)
        return part.get(key, default) if isinstance(part, dict) else default

    @property
    def name(self) -> str:
        return str(self.setting("run", "name") or self.path.name)

    @property
    def best_epoch(self) -> int | None:
        """The selected epoch: ``results.json``'s ``best_epoch`` (``None`` before the run finished)."""
        value = (self.results or {}).get("best_epoch")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_run(path: str | Path, *, log_lines: int = 40) -> RunRecord:
    """Read the run directory ``path`` (``DataError`` naming the path when it is no run directory, or a file
    of it is malformed); ``log_lines``: how many of ``train.log``'s last lines to keep."""
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"run directory {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give a run directory (the folder holding config.yaml)")
    config_path = folder / RunDirectory.CONFIG
    if not config_path.is_file():
        raise DataError(
            f"{folder} is not a dmlkit run directory: no {RunDirectory.CONFIG} there (every run writes it "
            "when it starts)"
        )
    config_text = _read_text(config_path)
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{config_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: expected a mapping of config sections, got {type(config).__name__}")
    notes: list[str] = []
    history = _read_history(folder / RunDirectory.HISTORY, notes)
    results = _read_results(folder / RunDirectory.RESULTS, notes)
    checkpoints = {short: folder / name for short, name in CHECKPOINTS.items() if (folder / name).is_file()}
    log_path = folder / RunDirectory.LOG
    log_tail = _read_text(log_path).splitlines()[-log_lines:] if log_path.is_file() else []
    record = RunRecord(folder, config, config_text, history, results, checkpoints, log_tail, notes)
    _note_missing(record)
    return record


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _read_history(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The rows of ``history.jsonl``. A malformed line is a ``DataError`` naming the file and line, except
    an unterminated last line: a run killed while writing it leaves one, and the report notes it."""
    if not path.is_file():
        return []
    text = _read_text(path)
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                notes.append(
                    f"{path.name}: its last line is incomplete (the run was killed while writing it)"
                )
                break
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append({key: _finite(value) for key, value in row.items()})
    return rows


def _finite(value: Any) -> Any:
    """Non-finite floats (``NaN`` written by an older dmlkit) as ``None``, like the history writer does."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _read_results(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        results = json.loads(_read_text(path))  # a NaN metric is written as NaN: Python's json reads it
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(results, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(results).__name__}")
    return results


def _note_missing(record: RunRecord) -> None:
    """Say what the report cannot show and why (the run's state, told by the files that exist)."""
    if not record.history:
        record.notes.append(
            f"no epoch has finished ({RunDirectory.HISTORY} is missing or empty): no training curves"
        )
    if record.results is None:
        record.notes.append(
            f"no {RunDirectory.RESULTS}: the run has not finished (it is still running, was interrupted or "
            "failed), so there is no test table before/after training"
        )
    elif not any(isinstance(record.results.get(key), dict) for key in ("test_before", "test_after")):
        record.notes.append(f"{RunDirectory.RESULTS} holds no test results (test_before / test_after)")
    if record.history and not any(key.startswith("val/") for row in record.history for key in row):
        record.notes.append("no validation metrics in the history (val_fraction 0): no validation curves")
