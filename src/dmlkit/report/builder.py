"""``write_report``: read a run directory, re-embed its test split (unless told not to), draw its curves
and write the page."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from dmlkit.errors import ConfigError, DataError
from dmlkit.files import write_text_atomic
from dmlkit.inference import resolve_device
from dmlkit.report.figures import curves, render_png, require_matplotlib
from dmlkit.report.page import PerClass, render
from dmlkit.report.run import CHECKPOINTS, RunRecord, read_run
from dmlkit.report.test_split import TestSplitView, evaluate_test_split
from dmlkit.train.run_dir import RunDirectory

#: The page's file name in the run directory (the default ``out``).
REPORT_FILE = "report.html"


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    worst: int = 8,
    top: int = 5,
    examples: bool = True,
    checkpoint: str | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    max_classes: int = 100,
) -> Path:
    """Write the report of the run in ``run_dir`` to ``out`` (default ``run_dir/report.html``); returns
    its path.

    ``examples``: re-embed the test split with the ``checkpoint`` (``"best"``, ``"last"``; ``None``:
    ``best.pt``, else ``last.pt``) for the per-class table and the grid of the ``worst`` worst queries
    with their ``top`` results; ``False``: the per-class table comes from ``results.json``'s ``per_class``
    when it holds one (the shape ``dmlkit eval --per-class --json`` prints), and the grid is left out.
    ``max_classes``: rows of the per-class table (the worst classes). Options are checked before anything
    is loaded: ``ConfigError`` for a bad one, ``DataError`` for a folder that is no run directory or a
    checkpoint asked for that the run lacks."""
    for name, value in (
        ("worst", worst),
        ("top", top),
        ("max_classes", max_classes),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if checkpoint is not None and checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    require_matplotlib()
    resolved = resolve_device(device) if isinstance(device, str) else device
    run = read_run(run_dir)
    target = Path(out) if out is not None else run.path / REPORT_FILE
    _check_target(target)
    notes = list(run.notes)
    view: TestSplitView | None = None
    per_class: PerClass | None = None
    if examples:
        chosen = _checkpoint(run, checkpoint, notes)
        if chosen is not None:
            view = evaluate_test_split(
                chosen, worst=worst, top=top, device=resolved, batch_size=batch_size,
                num_workers=num_workers, progress=progress,
            )  # fmt: skip
            per_class = PerClass(
                view.per_class, f"{chosen.name} re-embedded on the test split, as dmlkit eval --per-class"
            )
    else:
        per_class = _stored_per_class(run)
        notes.append(
            "--no-examples: the test split was not re-embedded, so there is no grid of worst queries"
            + ("" if per_class else f" and no per-class table ({RunDirectory.RESULTS} holds none)")
        )
    if view is not None and not view.per_class:
        notes.append("the run's metrics have no per-class values (only per-query retrieval metrics have)")
    figures = [(curve, render_png(curve, run.best_epoch)) for curve in curves(run.history)]
    page = render(
        run, figures, view=view, per_class=per_class, notes=notes, max_classes=max_classes,
        generated=f"{datetime.now():%Y-%m-%d %H:%M:%S}",
    )  # fmt: skip
    write_text_atomic(target, page)
    return target


def _checkpoint(run: RunRecord, asked: str | None, notes: list[str]) -> Path | None:
    """The checkpoint to re-embed with: the one asked for (``DataError`` naming the file when the run
    lacks it), else ``best.pt``, else ``last.pt`` (noted), else none (noted)."""
    if asked is not None:
        if asked not in run.checkpoints:
            raise DataError(
                f"--checkpoint {asked}: {run.path / CHECKPOINTS[asked]} does not exist"
                + (f" (the run has {', '.join(run.checkpoints)})" if run.checkpoints else "")
            )
        return run.checkpoints[asked]
    if "best" in run.checkpoints:
        return run.checkpoints["best"]
    if "last" in run.checkpoints:
        notes.append(
            f"no {RunDirectory.BEST} yet: the per-class table and the worst queries use {RunDirectory.LAST} "
            "(the weights of the last saved epoch)"
        )
        return run.checkpoints["last"]
    notes.append(
        f"no checkpoint ({RunDirectory.BEST} or {RunDirectory.LAST}): no per-class table and no worst queries"
    )
    return None


def _stored_per_class(run: RunRecord) -> PerClass | None:
    """``results.json``'s ``per_class`` (metric → class → value), checked; ``None`` when it has none."""
    stored: Any = (run.results or {}).get("per_class")
    if stored is None:
        return None
    where = f"{run.path / RunDirectory.RESULTS}: 'per_class'"
    if not isinstance(stored, dict) or not all(isinstance(values, dict) for values in stored.values()):
        raise DataError(f"{where} must map each metric to {{class: value}}")
    for metric, values in stored.items():
        for name, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise DataError(f"{where}: {metric} of class {name!r} is {value!r}, not a number")
    return PerClass(stored, f"from {RunDirectory.RESULTS}")


def _check_target(path: Path) -> None:
    """The page's path must be a file to (over)write whose existing parents are folders."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give the .html file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {path}: {parent} is a file, not a folder")
            break
