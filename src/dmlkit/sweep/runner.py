"""Running a sweep on Optuna: one trial per configuration, each seed an ordinary ``dmlkit train`` run
directory made by a subprocess (or a ``torchrun`` job), so a crash costs one run, never the sweep.

Layout of a study folder::

    <study>/spec.yaml                 the spec as run (``dmlkit sweep report`` reads it)
    <study>/journal.log               Optuna's JournalStorage (the study's state; or an RDB --storage)
    <study>/runs/<config id>/seed<k>/ the run directories
    <study>/runs/<config id>/seed<k>.log   the run's output

Re-running the command continues the study: a run whose ``results.json`` exists is never trained again, a run
with a ``last.pt`` resumes from it, and trials left running by a killed sweep are marked failed and their
configurations queued again (so they resume). A failed run fails its trial, with the last line of its error.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dmlkit.config.loading import dump_yaml
from dmlkit.errors import ConfigError, DmlkitError
from dmlkit.sweep.spec import SweepSpec, config_id

log = logging.getLogger(__name__)

JOURNAL = "journal.log"
SPEC = "spec.yaml"


def optuna_module() -> Any:
    """Optuna, the sweep engine (an optional dependency)."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("dmlkit sweep needs Optuna: pip install 'dmlkit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_of(study_dir: Path, url: str | None) -> Any:
    """The study's storage: an RDB ``url`` (several machines), else the journal file in ``study_dir`` (safe
    for several local workers and on a shared file system)."""
    optuna = optuna_module()
    if url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / JOURNAL)))


def _sampler(spec: SweepSpec, seed: int) -> Any:
    optuna = optuna_module()
    if spec.sampler in ("random", "grid", "one_at_a_time"):  # a finite design: every trial from the queue
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(spec: SweepSpec, study_dir: Path) -> Any:
    """The study (created, or loaded to continue it)."""
    optuna = optuna_module()
    return optuna.create_study(
        study_name=spec.name,
        storage=storage_of(study_dir, spec.storage),
        sampler=_sampler(spec, spec.seeds[0]),
        direction=spec.objective.direction,
        load_if_exists=True,
    )


def suggest(trial: Any, spec: SweepSpec) -> tuple[dict[str, Any], dict[str, str]]:
    """The trial's factor values and their labels: a queued point's (a finite design's: read as given,
    not suggested, since Optuna fixes a categorical parameter's choices for the whole study and a
    spec may gain a level), else the sampler's."""
    fixed = queued_point(trial)
    if fixed is not None and all(key in fixed for key in spec.factors):
        labels = {key: str(fixed[key]) for key in spec.factors}
        unknown = [
            f"{key}={label}" for key, label in labels.items() if label not in (spec.factors[key].levels or {})
        ]
        if unknown:
            raise DmlkitError(
                f"queued configuration with a level the spec no longer has: {', '.join(unknown)}"
            )
        return {key: (spec.factors[key].levels or {})[label] for key, label in labels.items()}, labels
    values: dict[str, Any] = {}
    labels = {}
    for key, factor in spec.factors.items():
        if factor.levels is not None:
            label = trial.suggest_categorical(key, list(factor.levels))
            values[key], labels[key] = factor.levels[label], label
            continue
        if factor.int is not None:
            step = int(factor.step or 1)
            value: Any = trial.suggest_int(key, *factor.int, step=step, log=factor.log)
        elif factor.log_uniform is not None:
            value = trial.suggest_float(key, *factor.log_uniform, log=True)
        else:
            assert factor.uniform is not None
            value = trial.suggest_float(key, *factor.uniform, step=factor.step)
        values[key], labels[key] = value, f"{value:.4g}" if isinstance(value, float) else str(value)
    return values, labels


def queued_point(trial: Any) -> dict[str, Any] | None:
    """The level labels a trial (a live ``Trial`` or a ``FrozenTrial``) was queued with
    (``enqueue_trial``), or None for a sampled trial."""
    if isinstance(trial, optuna_module().trial.FrozenTrial):
        return trial.system_attrs.get("fixed_params")
    return trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")


def run_one(spec: SweepSpec, study_dir: Path, values: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Train (or resume, or reuse) the run of ``values`` and ``seed``; its record: folder, validation
    metrics of the selected epoch, test metrics, throughput and wall time. ``DmlkitError`` with the last
    line of the run's output when it fails."""
    folder = study_dir / "runs" / config_id(values)
    run_dir = folder / f"seed{seed}"
    if not (run_dir / "results.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if (run_dir / "last.pt").is_file():
            argv = ["train", "--resume", str(run_dir)]
        else:
            config = spec.config(
                values, seed, {"output_dir": str(folder), "name": f"seed{seed}", "progress": False}
            )
            config_file = folder / f"seed{seed}.yaml"
            dump_yaml(config, config_file)
            argv = ["train", "--config", str(config_file), "--overwrite"]
        if spec.nproc_per_node > 1:
            argv += ["--nproc-per-node", str(spec.nproc_per_node)]
        output = folder / f"seed{seed}.log"
        command = [sys.executable, "-m", "dmlkit", *argv]
        code = (
            submit(spec, folder, command, output)
            if spec.executor == "submitit"
            else run_command(command, output)
        )
        if code != 0 or not (run_dir / "results.json").is_file():
            raise DmlkitError(f"{run_dir}: exit {code}: {last_error_line(output)}")
    return record(run_dir)


def run_command(command: list[str], output: Path) -> int:
    """Run ``command`` with its output appended to ``output``; its exit status."""
    with output.open("a") as handle:
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode


def submit(spec: SweepSpec, folder: Path, command: list[str], output: Path) -> int:
    """Run ``command`` as a job of ``submitit``'s AutoExecutor (a Slurm job where Slurm is available, else a
    local process; ``executor_args`` are its parameters, e.g. ``{slurm_partition: gpu, gpus_per_node: 4,
    timeout_min: 600}``) and wait for it; without submitit installed, locally, with a warning."""
    try:
        import submitit
    except ImportError:
        log.warning("executor submitit: submitit is not installed (pip install submitit); running locally")
        return run_command(command, output)
    executor = submitit.AutoExecutor(folder=str(folder / "submitit"))
    executor.update_parameters(**spec.executor_args)
    return int(executor.submit(run_command, command, output).result())


def last_error_line(output: Path) -> str:
    """The last non-empty line of a run's output (its error)."""
    lines = [line.strip() for line in output.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def record(run_dir: Path) -> dict[str, Any]:
    """What the report needs of a finished run."""
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    best = results.get("best_epoch")
    chosen = next((r for r in rows if r.get("epoch") == best), rows[-1] if rows else {})
    val = {k.removeprefix("val/"): v for k, v in chosen.items() if k.startswith("val/")}
    speeds = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    return {
        "run_dir": str(run_dir),
        "val": val,
        "test": dict(results.get("test_after", {})),
        "best_epoch": best,
        "images_per_s": statistics.fmean(speeds) if speeds else None,
        "wall_s": results.get("wall_time_s"),
    }


def objective_value(spec: SweepSpec, runs: Mapping[str, Mapping[str, Any]]) -> float:
    """The mean over the seeds of the objective metric (the selected epoch's validation value, or test)."""
    metric, split = spec.objective.metric, spec.objective.split
    values = []
    for seed, run in runs.items():
        value = run[split].get(metric)
        if value is None:
            raise DmlkitError(
                f"run of seed {seed} ({run['run_dir']}) reports no {split} {metric}: add it to the base "
                "config's eval metrics" + (" and keep a validation split" if split == "val" else "")
            )
        values.append(float(value))
    return statistics.fmean(values)


#: What a trial records of the process that runs it (a killed sweep is recognised by it).
WORKER = f"{socket.gethostname()}:{os.getpid()}"
INTERRUPTED = "interrupted (the sweep was stopped)"


def _alive(worker: str) -> bool:
    """Whether the sweep process ``host:pid`` still runs (always assumed for another host's)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_interrupted(study: Any) -> int:
    """Trials left running by a sweep process of this machine that no longer runs: mark them failed
    (``interrupted``) and queue their configurations again, so their runs resume from ``last.pt``.
    Another machine's running trials are left alone. Returns how many were queued."""
    optuna = optuna_module()
    stale = [
        trial
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not _alive(str(trial.user_attrs.get("worker", "")))
    ]
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "error", INTERRUPTED)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        point = queued_point(trial) or trial.params
        if point:
            study.enqueue_trial(point, skip_if_exists=False)
    return len(stale)


def done_configurations(study: Any) -> set[str]:
    """The configuration ids of the done trials (a configuration tried twice, e.g. by TPE, counts once)."""
    return {str(trial.user_attrs.get("config_id")) for trial in done_trials(study)}


def done_trials(study: Any) -> list[Any]:
    """Trials that count towards ``max_trials``: complete, or failed by their own runs (not interrupted)."""
    optuna = optuna_module()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [
        t for t in study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("error") != INTERRUPTED
    ]


def run_sweep(spec: SweepSpec, study_dir: Path, workers: int = 1) -> Any:
    """Validate every configuration, then run trials until ``max_trials`` configurations are done (complete
    or failed), ``workers`` trials at a time (threads, each waiting on its run's process); returns the
    study."""
    spec.validate_all()
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / SPEC).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    study = open_study(spec, study_dir)
    again = requeue_interrupted(study)
    if again:
        log.warning("%d trial(s) of an interrupted sweep are queued again (their runs resume)", again)
    design = spec.design()
    if design is not None:
        # A finite design (grid, one-at-a-time) is queued point by point, each once: a continued sweep
        # finds the done, failed and waiting ones in the study (any state) and queues only the others, so
        # a spec given another level runs that level's configurations alone. (Optuna's GridSampler would
        # count the old trials under the old grid only, and run the new grid from scratch.)
        for point in design:
            study.enqueue_trial(point, skip_if_exists=True)
        optuna = optuna_module()
        remaining = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    else:
        remaining = int(spec.max_trials or 0) - len(done_configurations(study))

    def objective(trial: Any) -> float:
        if design is not None and queued_point(trial) is None:
            # The queue is empty (another process took its last points): sampling would repeat one.
            study.stop()
            raise optuna_module().TrialPruned("every configuration of the design is done or running")
        trial.set_user_attr("worker", WORKER)
        values, labels = suggest(trial, spec)
        trial.set_user_attr("labels", labels)
        trial.set_user_attr("config_id", config_id(values))
        runs: dict[str, Any] = {}
        try:
            for seed in spec.seeds:
                runs[str(seed)] = run_one(spec, study_dir, values, seed)
        except DmlkitError as exc:
            trial.set_user_attr("error", str(exc).splitlines()[-1])
            raise
        finally:
            trial.set_user_attr("runs", runs)
        return objective_value(spec, runs)

    def enough(study: Any, trial: Any) -> None:
        if design is None and len(done_configurations(study)) >= int(spec.max_trials or 0):
            study.stop()

    if remaining > 0:
        study.optimize(
            objective, n_trials=remaining, n_jobs=workers, catch=(DmlkitError,), callbacks=[enough]
        )
    return study


__all__ = [
    "JOURNAL",
    "SPEC",
    "done_configurations",
    "done_trials",
    "last_error_line",
    "objective_value",
    "open_study",
    "optuna_module",
    "queued_point",
    "record",
    "requeue_interrupted",
    "run_command",
    "run_one",
    "run_sweep",
    "storage_of",
    "submit",
    "suggest",
]
