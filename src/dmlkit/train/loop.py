"""The training loop: data → sampler → training step → optimizer, with validation, selection and resume.

Everything a feature changes lives elsewhere: the data (:mod:`dmlkit.train.data`), the run's files
(:mod:`dmlkit.train.run_dir`), what a batch contributes to the loss (:mod:`dmlkit.train.step`, replaceable
with ``Trainer(step=...)``), the objective (:mod:`dmlkit.train.objective`), the optimizer and schedule
(:mod:`dmlkit.train.optim`). This loop only orders them.

An optimizer *update* follows every ``accumulate`` batches (an accumulation *window*; windows never cross an
epoch's end, so the last one of an epoch may be shorter): each batch's loss is computed on that batch alone
(miner and loss included) and back-propagated divided by the window's size, so the update uses the mean of
the window's gradients. ``global_step`` counts updates; the schedule steps once per update.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dmlkit import distributed, metrics, models, samplers
from dmlkit.config import TrainConfig
from dmlkit.data import FileImageDataset
from dmlkit.errors import ConfigError, NonFiniteLossError
from dmlkit.inference import evaluate_model, resolve_device
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.data import RunData, run_data, train_loader
from dmlkit.train.logging import LOGGER_NAME, RunLogFile, RunLogger, setup_run_logging
from dmlkit.train.objective import build_objective
from dmlkit.train.optim import build_optimizer, build_scheduler, group_lrs, split_model_parameters
from dmlkit.train.run_dir import RunDirectory
from dmlkit.train.stats import EpochStats
from dmlkit.train.step import Batch, EmbeddingStep, StepFactory, StepOutput, TrainingStep

log = logging.getLogger(LOGGER_NAME)

StepHook = Callable[["Trainer", int], None]


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced.

    ``started`` is False when the run was interrupted during set-up (data, model, the test before training,
    loading the resumed state): nothing was written then. ``selection`` says how ``best.pt`` was chosen
    (also in ``results.json``): ``{"method": "validation", "metric", "epoch", "value"}`` or
    ``{"method": "last_epoch", "epoch", "reason"}``, with ``"unselectable_epochs"`` listing validated epochs
    whose selection value was not finite. ``early_stop`` (also in ``results.json``), when training stopped
    before ``epochs`` because validation had not improved for ``early_stop_patience`` validations:
    ``{"epoch", "patience", "best_epoch", "metric"}`` (``epoch``: the last trained epoch).
    """

    run_dir: Path
    interrupted: bool = False
    best_epoch: int | None = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0
    started: bool = True
    selection: dict[str, Any] = field(default_factory=dict)
    early_stop: dict[str, Any] | None = None

    def table(self) -> str:
        """Test metrics before and after training, one metric per row; without a test before training
        (``eval.test_before: false``) the "after" column alone, not a column of nan."""
        names = list(self.after or self.before)
        width = max([len(n) for n in names] + [6])
        columns = [("before", self.before)] if self.before else []
        columns += [("after", self.after)]
        header = f"{'metric':<{width}}" + "".join(f"  {title:>8}" for title, _ in columns)
        lines = [header, "-" * len(header)]
        for name in names:
            values = "".join(f"  {values.get(name, float('nan')):>8.4f}" for _, values in columns)
            lines.append(f"{name:<{width}}{values}")
        return "\n".join(lines)


@dataclass
class StopRequest:
    """What SIGINT/SIGTERM do (see :func:`graceful_interrupt`): while ``graceful`` is False (the run's
    set-up, when nothing is saved yet) they raise ``KeyboardInterrupt`` at once; afterwards they set
    ``event``, and the loop saves a resumable checkpoint after the current step."""

    event: threading.Event = field(default_factory=threading.Event)
    graceful: bool = False


@contextmanager
def graceful_interrupt() -> Iterator[StopRequest]:
    """SIGINT/SIGTERM stop the run: at once during set-up, after the current step once training runs
    (``StopRequest.graceful``); a second SIGINT aborts at once."""
    stop = StopRequest()
    event = stop.event
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if not stop.graceful or (event.is_set() and signum == signal.SIGINT):
            raise KeyboardInterrupt
        event.set()
        log.warning("received %s: saving a resumable checkpoint after this step", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def build_sampler(config: TrainConfig, train_set: Any) -> samplers.BatchSampler:
    """The configured batch sampler over the training part (``samples_per_class`` and hierarchical
    super-classes filled in)."""
    spec = config.data.sampler
    kwargs = dict(spec.args)
    parameters = samplers.REGISTRY.parameters(spec.name)
    if "samples_per_class" in parameters:
        kwargs.setdefault("samples_per_class", config.data.samples_per_class)
    if "super_labels" in parameters:
        kwargs["super_labels"] = samplers.super_labels_of(train_set, kwargs.get("super_labels"))
    return samplers.build(
        spec.name, labels=train_set.labels, batch_size=config.data.batch_size, seed=config.run.seed, **kwargs
    )


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs training, validation and the final test.

    ``run_dir``: where a new run goes (default ``<output_dir>/<name>``; a folder holding another run's files
    is refused unless ``overwrite``, which removes them when the new run starts), or, with ``resume``, the
    run to continue (its ``last.pt``; ``config`` may differ from the run's only in
    :data:`dmlkit.config.sections.RESUMABLE` options). ``step``: a factory of the
    :class:`~dmlkit.train.step.TrainingStep` (default: :class:`~dmlkit.train.step.EmbeddingStep`);
    ``step_hooks``: called after every step with ``(trainer, global_step)``.

    Nothing is written before the run starts (see :mod:`dmlkit.train.run_dir`).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path | str | RunDirectory | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        step_hooks: list[StepHook] | None = None,
        step: StepFactory | None = None,
    ) -> None:
        self.config = config
        self.resume = resume
        self.directory = self._directory(config, run_dir, resume, overwrite)
        self.run_dir = self.directory.path
        self.step_hooks = list(step_hooks or [])
        self.step_factory: StepFactory = step or EmbeddingStep
        self.device = resolve_device(config.run.device)
        if config.optim.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp 'fp16' needs a CUDA device; use --amp bf16 on CPU")
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # batches consumed in the current epoch
        self.higher_is_better = metrics.higher_is_better(config.eval.select_metric)
        self.best_value = -math.inf if self.higher_is_better else math.inf
        self.best_epoch: int | None = None
        self.unselectable_epochs: list[int] = []  # validated epochs whose selection value was not finite
        self.no_selection: str | None = None  # why validation cannot select at all (set in _setup)
        self.selection: dict[str, Any] = {}
        self.before: dict[str, float] = {}
        self.nonfinite_in_row = 0
        self.window_skipped = 0  # batches of the current accumulation window left out (non-finite)
        self.validations_since_best = 0  # validations without a new best (early stopping)
        self.early_stop: dict[str, Any] | None = None  # set when training stops early
        self.epoch_stats = EpochStats()
        self.saved_at: tuple[int, int] | None = None  # (epoch, batch) of the state in last.pt
        self.stop_event: threading.Event | None = None
        self.dist = distributed.Distributed()  # this process among the ranks of a torchrun launch (in _setup)
        self.logger: RunLogger | None = None  # set up when the run starts; torn down even after a failure
        self._log_file: RunLogFile | None = None

    @staticmethod
    def _directory(
        config: TrainConfig, run_dir: Path | str | RunDirectory | None, resume: bool, overwrite: bool
    ) -> RunDirectory:
        """The run's folder, checked before anything is loaded or written."""
        if not resume:
            path = run_dir.path if isinstance(run_dir, RunDirectory) else run_dir
            return RunDirectory.for_new_run(config, path, overwrite=overwrite)
        if overwrite:
            raise ConfigError("--overwrite starts a new run; it cannot be combined with --resume")
        if run_dir is None:
            raise ConfigError("resuming needs the run directory to resume")
        directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.existing(run_dir)
        directory.check_resume(config)
        return directory

    # ----------------------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        config = self.config
        # a torchrun launch: the process group, this rank's device; only rank 0 logs below warnings
        self.dist = distributed.setup(self.device)
        self.device = self.dist.device(self.device)
        if not self.dist.is_main:
            log.setLevel(logging.WARNING)
        seed_everything(config.run.seed, config.run.deterministic)
        RunLogger.check_available(config)  # before data loading: a missing logger package fails fast
        log.info("run directory: %s", self.run_dir)

        self.data: RunData = run_data(config)
        self.train_set, self.val_set, self.test_set = self.data.train, self.data.val, self.data.test
        log.info("%s", self.data.describe(config.data.dataset.name))
        self._check_validation()

        model_config = config.model
        self.model = models.build_model(
            **model_config.model_kwargs(),
            in_channels=self.data.spec["channels"],
            image_size=self.data.spec["image_size"],
        ).to(self.device)
        if model_config.freeze_bn:
            models.freeze_batchnorm(self.model)  # before the optimizer sees the parameters
        if config.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.objective = build_objective(
            config, self.data.num_classes, self.model.embedding_size, len(self.train_set), self.device
        ).to(self.device)
        # The step trains through the DDP wrapper (several processes) and the compiled module; ``self.model``
        # stays the plain one, which shares their parameters: checkpoints hold its state dict (no
        # ``module.`` / ``_orig_mod.`` prefix) and evaluation runs it.
        train_model = self.dist.wrap(self.model, self.device, sync_bn=config.run.sync_bn)
        train_model = torch.compile(train_model) if config.run.compile else train_model
        self.step: TrainingStep = self.step_factory(
            train_model, self.objective, self.device, config.optim.amp
        )
        if isinstance(self.step, torch.nn.Module):
            self.step.to(self.device)
        # parameters DDP does not own start equal everywhere; their gradients are averaged at each update
        outside = [self.objective, *([self.step] if isinstance(self.step, torch.nn.Module) else [])]
        distributed.broadcast_parameters(outside)

        self.sampler = build_sampler(config, self.train_set)
        if self.dist.enabled:  # the global batch, formed once, each rank embedding its part
            self.sampler = samplers.ShardedBatchSampler(self.sampler, self.dist.rank, self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split has {len(self.train_set)} images: too few for one batch of "
                f"{config.data.batch_size}"
            )
        # the CPU pipeline in DataLoader workers, or the GPU pipeline (``gpu_decode``): see train.data
        self.loader = train_loader(self.data, self.sampler, config, self.device)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / config.optim.accumulate)
        self.optimizer = build_optimizer(
            config.optim, self.model, self.objective, self.step.extra_parameters()
        )
        # The backbone parameters that train once unfrozen: those trainable now (frozen BatchNorm and layers
        # the model leaves out stay frozen), read after the optimizer has taken them in.
        self.frozen_backbone: list[torch.nn.Parameter] = []
        if config.optim.freeze_backbone_epochs > 0:
            backbone, _ = split_model_parameters(self.model)
            self.frozen_backbone = [p for p in backbone if p.requires_grad]
        self.scheduler = build_scheduler(
            config.optim, self.optimizer, self.updates_per_epoch, self.higher_is_better
        )
        model_parameters = {id(p) for p in self.model.parameters()}
        self.outside_model = [p for p in self._optimized_parameters() if id(p) not in model_parameters]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.optim.amp == "fp16")

    def _check_validation(self) -> None:
        """Decide whether validation can select ``best.pt``: not without a validation split, nor with fewer
        than two classes in it (every retrieval metric is then 1.0 or undefined). Then the last epoch is
        the model, said here and in ``results.json``."""
        val = self.val_set
        if val is None:
            self.no_selection = "there is no validation split (val_fraction 0)"
            return
        classes = len(np.unique(val.labels))
        if classes >= 2:
            return
        self.no_selection = (
            f"the validation split holds {classes} class ({len(val)} images): too few to compare models"
        )
        self.val_set = None
        log.warning(
            "%s; validation is skipped and best.pt will be the last epoch (a larger --val-fraction holds "
            "out more of the %d training classes)%s",
            self.no_selection,
            self.data.num_classes + classes,
            self._unused_validation_options(),
        )

    def _unused_validation_options(self) -> str:
        """What a run without validation cannot do of what was asked (for the warning)."""
        config = self.config
        unused = []
        if config.eval.early_stop_patience is not None:
            unused.append("training never stops early (--early-stop-patience)")
        if config.optim.scheduler == "plateau":
            unused.append("the plateau schedule never lowers the lr")
        return "".join(f"; {text}" for text in unused)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sampler_state = self.sampler.state_dict()
        sampler_state.update(epoch=self.epoch, batches_yielded=self.batches_done)
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "model": self.model.state_dict(),
            "model_config": dict(self.model.config),
            "data_spec": dict(self.data.spec),
            "config": self.config.model_dump(mode="json"),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "step": self.step.state_dict(),
            "sampler": sampler_state,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "unselectable_epochs": list(self.unselectable_epochs),
            "validations_since_best": self.validations_since_best,
            "accumulation": self._accumulation_state(),
            "before": dict(self.before),
            "epoch_totals": self.epoch_stats.state_dict(),
            "rng": ckpt.rng_state(),
        }

    def _window_open(self) -> bool:
        """Whether the batches done so far end inside an accumulation window (its update is yet to come)."""
        return (
            self.batches_done % self.config.optim.accumulate != 0 and self.batches_done < self.steps_per_epoch
        )

    def _optimized_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _accumulation_state(self) -> dict[str, Any]:
        """Mid-window (an interruption between two updates): the gradients accumulated so far, in the
        optimizer's parameter order, and how many of the window's batches were skipped; so a resumed run
        finishes the window exactly. At a window's end: nothing."""
        if not self._window_open():
            return {}
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self._optimized_parameters()]
        return {"grads": grads, "skipped": self.window_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without fp16: a run switched to fp16 starts a fresh scaler
            self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["objective"])
        self.step.load_state_dict(state.get("step", {}))
        self.sampler.load_state_dict(state["sampler"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.global_step = int(state["global_step"])
        self.best_value = float(state["best_value"])
        self.best_epoch = state["best_epoch"]
        self.unselectable_epochs = list(state.get("unselectable_epochs", []))
        self.validations_since_best = int(state.get("validations_since_best", 0))
        self._load_accumulation(state.get("accumulation") or {})
        self.before = dict(state["before"])
        self.epoch_stats = EpochStats.from_state(state["epoch_totals"])
        ckpt.set_rng_state(state["rng"])

    def _load_accumulation(self, state: dict[str, Any]) -> None:
        self.window_skipped = int(state.get("skipped", 0))
        grads = state.get("grads")
        if grads is None:
            return
        for parameter, grad in zip(self._optimized_parameters(), grads, strict=True):
            parameter.grad = None if grad is None else grad.to(parameter.device)

    def save(self, name: str = RunDirectory.LAST) -> Path:
        """Write the state to ``name`` (rank 0 only: the other ranks hold the same state)."""
        path = (
            self.directory.save(self.state_dict(), name) if self.dist.is_main else self.directory.file(name)
        )
        if name == RunDirectory.LAST:
            self.saved_at = (self.epoch, self.batches_done)
        return path

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset: Any, description: str) -> dict[str, float]:
        config = self.config
        results = evaluate_model(
            self.model,
            dataset,
            config.eval.metrics,
            distributed=self.dist,
            batch_size=config.eval.eval_batch_size,
            device=self.device,
            amp=config.optim.amp,
            num_workers=config.data.workers,
            progress=config.run.progress and self.dist.is_main,
            seed=config.run.seed,
            description=description,
            distance=config.eval.eval_distance,
            backend=config.eval.eval_backend,
        )
        return {name: float(results.metrics[name]) for name in config.eval.metrics}

    # ----------------------------------------------------------------------------------------- training
    def run(self) -> TrainResult:
        """Train (or continue) to ``epochs``, then test the best checkpoint once."""
        start_time = time.perf_counter()
        self._log_file = setup_run_logging()
        try:
            with graceful_interrupt() as stop:
                self.stop_event = stop.event
                try:
                    self._setup()
                    self._start(stop)
                except KeyboardInterrupt:
                    if stop.graceful:  # a second Ctrl-C once the run had started: abort at once
                        raise
                    return self._interrupted_in_setup(time.perf_counter() - start_time)
                interrupted = self._train_epochs()
            if interrupted:
                path = self.save()
                log.warning(
                    "interrupted: resumable checkpoint saved to %s (resume with `dmlkit train --resume %s`)",
                    path,
                    self.run_dir,
                )
                return TrainResult(
                    self.run_dir,
                    interrupted=True,
                    before=self.before,
                    wall_time=time.perf_counter() - start_time,
                )
            return self._finish(self._final_test(), time.perf_counter() - start_time)
        finally:
            self._teardown()

    def _start(self, stop: StopRequest) -> None:
        """Resume from ``last.pt``, or measure the untrained model on the test split; then the run has
        started: signals now save a checkpoint, and the run directory is created and written."""
        if self.resume:
            self.load_state_dict(self.directory.resume_state())
            self.directory.release_state()
            self.saved_at = (self.epoch, self.batches_done)
            log.info(
                "resumed from %s at epoch %d, batch %d (step %d)",
                self.directory.file(RunDirectory.LAST),
                self.epoch,
                self.batches_done,
                self.global_step,
            )
        elif self.test_set is not None and self.config.eval.test_before:  # None: no labels (ssl)
            self.before = self.evaluate(self.test_set, "test (before)")
            log.info("test before training: %s", _fmt(self.before))
        stop.graceful = True
        main = self.dist.is_main
        if main:
            self.directory.start(self.config, resumed=self.resume)
            assert self._log_file is not None
            self._log_file.open(self.directory.file(RunDirectory.LOG))
        self.logger = RunLogger(self.config, self.run_dir, enabled=main)
        if self.resume:
            self.logger.truncate_after(self.epoch)

    def _interrupted_in_setup(self, wall_time: float) -> TrainResult:
        what = f"{self.run_dir} is unchanged" if self.resume else "no run directory was created"
        log.warning("interrupted before training started: nothing was saved (%s)", what)
        return TrainResult(self.run_dir, interrupted=True, started=False, wall_time=wall_time)

    def _finish(self, after: dict[str, float], wall_time: float) -> TrainResult:
        result = TrainResult(
            self.run_dir,
            best_epoch=self.best_epoch,
            before=self.before,
            after=after,
            wall_time=wall_time,
            selection=dict(self.selection),
            early_stop=dict(self.early_stop) if self.early_stop is not None else None,
        )
        results = {
            "test_before": self.before,
            "test_after": after,
            "protocol": self.data.protocols(),
            "best_epoch": self.best_epoch,
            "selection": self.selection,
            "early_stop": self.early_stop,
            "wall_time_s": wall_time,
            "processes": self.dist.world_size,
        }
        if self.dist.is_main:
            self.directory.write_results(results)
        if self.test_set is None:
            log.info(
                "best.pt: %s; no test split (the dataset has no labels); wall time %.1f s; run directory %s",
                _describe_selection(self.selection),
                wall_time,
                self.run_dir,
            )
            return result
        log.info(
            "\ntest split of '%s' (%d images, classes unseen in training), %swith best.pt (%s); wall time "
            "%.1f s; run directory %s\n%s",
            self.config.data.dataset.name,
            len(self.test_set),
            "before training and " if self.before else "",
            _describe_selection(self.selection),
            wall_time,
            self.run_dir,
            result.table(),
        )
        return result

    def _teardown(self) -> None:
        if self.dist.enabled:
            distributed.shutdown()
        if self.logger is not None:
            self.logger.close()
        handler = self._log_file
        if handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(handler)
            handler.close()

    def _train_epochs(self) -> bool:
        """Run the remaining epochs (or until early stopping); True when stopped by a signal."""
        resuming_mid_epoch = self.resume and self.batches_done > 0
        self.early_stop = None  # decided from the saved count and this run's patience (a resumed stop again)
        while self.epoch < self.config.optim.epochs and not self._stops_early():
            if not resuming_mid_epoch:
                self.sampler.set_epoch(self.epoch)
                self.batches_done = 0
                self.epoch_stats = EpochStats()
            resuming_mid_epoch = False
            self.train_set.set_epoch(self.epoch)
            self.model.train()
            if self.config.model.freeze_bn:
                models.freeze_batchnorm(self.model)
            self._freeze_backbone(self.epoch < self.config.optim.freeze_backbone_epochs)
            if self._train_one_epoch():
                return True
            row = self._end_of_epoch()
            self.epoch += 1
            self.batches_done = 0
            assert self.logger is not None
            self.logger.log_epoch(row)
            self.save()
        return False

    def _freeze_backbone(self, frozen: bool) -> None:
        """``freeze_backbone_epochs``: while ``frozen``, the backbone is a fixed feature extractor (no
        gradients, so no optimizer update or weight decay, and eval mode, so BatchNorm statistics and dropout
        do not change either); afterwards the parameters that trained before freezing train again. Derived
        from the epoch alone, so resuming needs no state."""
        if not self.frozen_backbone:
            return
        if self.frozen_backbone[0].requires_grad == frozen:
            log.info(
                "epoch %d: %s",
                self.epoch + 1,
                f"backbone frozen for the first {self.config.optim.freeze_backbone_epochs} epoch(s)"
                if frozen
                else "the backbone trains from now on",
            )
        for parameter in self.frozen_backbone:
            parameter.requires_grad_(not frozen)
        backbone = getattr(self.model, "backbone", None)
        if frozen and isinstance(backbone, torch.nn.Module):
            backbone.eval()

    def _stops_early(self) -> bool:
        """Whether validation has not improved for ``early_stop_patience`` validations (the patience given
        now: a resumed run with a larger one, or none, continues); records and logs the stop."""
        patience = self.config.eval.early_stop_patience
        if patience is None or self.validations_since_best < patience:
            return False
        metric = self.config.eval.select_metric
        self.early_stop = {
            "epoch": self.epoch,
            "patience": patience,
            "best_epoch": self.best_epoch,
            "metric": metric,
        }
        log.info(
            "early stop after epoch %d of %d: validation %s has not improved for %d validation(s) "
            "(--early-stop-patience %d); the best was epoch %s",
            self.epoch,
            self.config.optim.epochs,
            metric,
            self.validations_since_best,
            patience,
            self.best_epoch,
        )
        return True

    def _train_one_epoch(self) -> bool:
        """Train on the rest of the current epoch; True when stopped by a signal."""
        substituted = self._substituted()
        try:
            return self._train_batches()
        finally:  # also when interrupted: the count is part of the checkpointed epoch statistics
            self.epoch_stats.substituted += self._substituted() - substituted

    def _substituted(self) -> int:
        """Images of the training split replaced so far because they failed to load (``skip_unreadable``;
        counted in the DataLoader workers too)."""
        dataset = self.train_set
        return dataset.substituted if isinstance(dataset, FileImageDataset) else 0

    def _train_batches(self) -> bool:
        stats = self.epoch_stats
        started, seconds_before = time.perf_counter(), stats.seconds
        logger = self.logger
        assert logger is not None
        # tqdm is handed the loader's iterator, not the loader: tqdm.auto's class calls iter() on an iterable
        # in its constructor, and that first DataLoader iterator (with workers, already prefetching from the
        # stateful batch sampler) would be dropped, and with it the first batches of every epoch.
        bar = tqdm(
            iter(self.loader),
            total=self.steps_per_epoch - self.batches_done,
            desc=f"epoch {self.epoch + 1}/{self.config.optim.epochs}",
            disable=not (self.config.run.progress and self.dist.is_main),
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )
        memory_format = torch.channels_last if self.config.run.channels_last else torch.preserve_format
        for images, labels, indices in bar:
            if images.dim() != 4:  # channels-last is a layout of image batches (B × C × H × W) only
                memory_format = torch.preserve_format
            batch = Batch(
                images.to(self.device, non_blocking=True, memory_format=memory_format),
                torch.as_tensor(labels, dtype=torch.int64).to(self.device),
                torch.as_tensor(indices, dtype=torch.int64).to(self.device),
            )
            loss_value, step_stats = self._step(batch)
            self.batches_done += 1
            stats.add_step(loss_value, step_stats, len(batch.images) * self.dist.world_size)  # global images
            stats.seconds = seconds_before + time.perf_counter() - started
            if loss_value is not None and logger.per_step:
                logger.log_scalars({"train/loss": loss_value, **step_stats}, step=self.global_step)
            bar.set_postfix(
                loss=f"{loss_value:.4f}" if loss_value is not None else "skip",
                img_s=f"{stats.images_per_second:.0f}",
                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
            )
            for hook in self.step_hooks:
                hook(self, self.global_step)
            stop = self.stop_event is not None and self.stop_event.is_set()
            if self.dist.any(stop, self.device):  # every rank stops after the same step
                bar.close()
                return True
        bar.close()
        return False

    def _window(self) -> tuple[int, int]:
        """The current batch's position in its accumulation window and the window's size (``accumulate``
        batches; the last window of an epoch holds what is left)."""
        accumulate = self.config.optim.accumulate
        start = self.batches_done // accumulate * accumulate
        return self.batches_done - start, min(accumulate, self.steps_per_epoch - start)

    def _step(self, batch: Batch) -> tuple[float | None, dict[str, float]]:
        """One batch: forward, checks, backward of ``loss / window size``; after the window's last batch, the
        optimizer update. ``(None, stats)`` when the batch was skipped: non-finite embeddings or loss (a loss
        can be finite on non-finite embeddings: several losses mask NaN similarities away, so the embeddings
        are checked as well; the batch's gradient is left out and the window's update averages the others),
        or a non-finite gradient at the update (the whole window is skipped)."""
        optim = self.config.optim
        position, size = self._window()
        if position == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.window_skipped = 0
        self.step.set_progress(self.global_step / max(1, optim.epochs * self.updates_per_epoch))
        out = self.step(batch)
        value, bad_rows = _loss_and_bad_rows(out)
        reason = None
        if bad_rows:
            reason = f"non-finite embeddings ({bad_rows} of {len(out.embeddings)})"
        else:
            if self.sampler.needs_embeddings:  # samplers that choose batches from the embeddings get them
                self.sampler.update_embeddings(out.indices.cpu(), out.embeddings.float().cpu())
            if not math.isfinite(value):
                reason = f"non-finite loss ({value})"
        if reason is None:
            self.scaler.scale(out.loss / size if size > 1 else out.loss).backward()
        else:
            self.window_skipped += 1
            self._skip_step(reason, "step" if size == 1 else "batch")
        # the window's last batch updates, unless every batch of the window was skipped
        update_skipped = position + 1 == size and self.window_skipped < size and not self._update(size)
        return (value if reason is None and not update_skipped else None), out.stats

    def _update(self, size: int) -> bool:
        """The optimizer update at the end of a window of ``size`` batches; False when skipped (non-finite
        gradient)."""
        kept = size - self.window_skipped
        if kept < size:  # each kept batch was divided by ``size``: make it the mean over the kept ones
            for parameter in self._optimized_parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(size / kept)
        distributed.average_gradients(self.outside_model)  # DDP averaged the model's already
        norm = self._gradient_norm()
        if norm is not None and not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_step(f"non-finite gradient norm ({norm})", "step" if size == 1 else "update")
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        self.nonfinite_in_row = 0
        self.optimizer.zero_grad(set_to_none=True)  # frees the gradients until the next window's backward
        return True

    def _gradient_norm(self) -> float | None:
        """The total gradient norm (clipped to ``grad_clip`` if set); None under fp16, where the grad scaler
        itself skips a step whose gradients overflowed and lowers its scale."""
        clip = self.config.optim.grad_clip
        if self.scaler.is_enabled() and clip is None:
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        elif params:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        else:
            return None
        return None if self.scaler.is_enabled() else float(norm)

    def _skip_step(self, reason: str, what: str = "step") -> None:
        """Account a skipped ``what`` (a step; with accumulation, a batch or a window's update): warn, and
        abort when the model state is broken or after ``max_nonfinite_steps`` skips in a row."""
        self.nonfinite_in_row += 1
        log.warning(
            "step %d (epoch %d, batch %d): %s — %s skipped (%d in a row)",
            self.global_step,
            self.epoch + 1,
            self.batches_done + 1,
            reason,
            what,
            self.nonfinite_in_row,
        )
        where = f"step {self.global_step} (epoch {self.epoch + 1}, batch {self.batches_done + 1})"
        broken = self._nonfinite_state()  # e.g. BatchNorm statistics updated by the skipped forward pass
        if broken is not None:
            raise NonFiniteLossError(
                f"training diverged at {where}: {reason}, and {broken} is now non-finite (skipping the step "
                f"cannot undo that). {self._recovery()}"
            )
        limit = self.config.optim.max_nonfinite_steps
        if self.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"training diverged: {self.nonfinite_in_row} non-finite steps in a row "
                f"(--max-nonfinite-steps {limit}), the last at {where}: {reason}. {self._recovery()}"
            )
        return None

    def _nonfinite_state(self) -> str | None:
        """The first floating-point parameter or buffer of the model, the objective or the step that holds
        a non-finite value (``"model buffer 'bn.running_mean'"``), or None; one device sync for all."""
        owners: list[tuple[str, Any]] = [("model", self.model), ("objective", self.objective)]
        if isinstance(self.step, torch.nn.Module):
            owners.append(("step", self.step))
        tensors = [
            (f"{owner} {kind} '{name}'", tensor)
            for owner, module in owners
            for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers()))
            for name, tensor in named
            if tensor.is_floating_point()
        ]
        if not tensors:
            return None
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in tensors])
        if bool(finite.all()):
            return None
        return tensors[int((~finite).nonzero()[0, 0])][0]

    def _recovery(self) -> str:
        """What the user can do after an abort: the checkpoint that exists, or that none does yet."""
        last = self.directory.file(RunDirectory.LAST)
        if self.saved_at is None or not last.is_file():
            return (
                f"No checkpoint was saved yet ({self.run_dir} has no {RunDirectory.LAST}): start again "
                "with a lower --lr, a --grad-clip, or --amp none."
            )
        epoch, batch = self.saved_at
        where = f"epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
        return (
            f"The last good checkpoint is {last} (after {where}): resume it with `dmlkit train --resume "
            f"{self.run_dir}` and a --grad-clip or --amp none, or start again with a lower --lr."
        )

    def _end_of_epoch(self) -> dict[str, Any]:
        config = self.config
        epoch_number = self.epoch + 1
        broken = self._nonfinite_state()  # never validate, select or save a diverged model
        if broken is not None:
            raise NonFiniteLossError(
                f"training diverged: after epoch {epoch_number}, {broken} is non-finite. {self._recovery()}"
            )
        row: dict[str, Any] = {
            "epoch": epoch_number,
            "step": self.global_step,
            **group_lrs(self.optimizer),
            **self.epoch_stats.summary(),
        }
        if self.frozen_backbone:
            row["backbone_frozen"] = self.epoch < config.optim.freeze_backbone_epochs
        is_last = epoch_number == config.optim.epochs
        loss = row.get("train_loss", float("nan"))
        message = f"epoch {epoch_number}: loss {loss:.4f}, {row['images_per_s']:.0f} img/s"
        if self.epoch_stats.skipped:
            message = f"{message}, {self.epoch_stats.skipped} step(s) skipped (non-finite)"
        if config.data.skip_unreadable:
            row["substituted_images"] = self.epoch_stats.substituted
            if self.epoch_stats.substituted:
                message = f"{message}, {self.epoch_stats.substituted} unreadable image(s) replaced"
        if self.val_set is not None and (epoch_number % config.eval.val_every == 0 or is_last):
            val = self.evaluate(self.val_set, f"val (epoch {epoch_number})")
            row.update({f"val/{k}": v for k, v in val.items()})
            self._select(epoch_number, val[config.eval.select_metric])
            best = " (best)" if self.best_epoch == epoch_number else ""
            message = f"{message}, val {_fmt(val)}{best}"
            self._after_validation(epoch_number, val[config.eval.select_metric])
        row.update(group_lrs(self.optimizer))  # after validation: the lr the next epoch starts with
        log.info("%s", message)
        return row

    def _after_validation(self, epoch_number: int, value: float) -> None:
        """Count validations without a new best (early stopping) and step the schedule on the value."""
        self.validations_since_best = (
            0 if self.best_epoch == epoch_number else self.validations_since_best + 1
        )
        before = [group["lr"] for group in self.optimizer.param_groups]
        self.scheduler.on_validation(value)
        after = [group["lr"] for group in self.optimizer.param_groups]
        if after != before:
            log.info(
                "epoch %d: validation %s = %.4f; learning rate %.3g → %.3g",
                epoch_number,
                self.config.eval.select_metric,
                value,
                before[0],
                after[0],
            )

    def _select(self, epoch_number: int, value: float) -> None:
        """Keep ``best.pt`` at the best finite validation value (in the metric's own direction); an epoch
        whose value is not finite cannot be selected, and the log says so."""
        metric = self.config.eval.select_metric
        if not math.isfinite(value):
            self.unselectable_epochs.append(epoch_number)
            log.warning(
                "epoch %d: validation %s is %s, so this epoch cannot be selected as best.pt",
                epoch_number,
                metric,
                value,
            )
            return
        better = value > self.best_value if self.higher_is_better else value < self.best_value
        if better:
            self.best_value, self.best_epoch = value, epoch_number
            self.save(RunDirectory.BEST)

    def _final_test(self) -> dict[str, float]:
        self.dist.barrier()  # rank 0 has written best.pt before any rank reads it
        best = self.directory.file(RunDirectory.BEST)
        if self.best_epoch is not None and best.exists():
            self.model.load_state_dict(ckpt.load(best, map_location=self.device)["model"])
            self.selection = {
                "method": "validation",
                "metric": self.config.eval.select_metric,
                "epoch": self.best_epoch,
                "value": self.best_value,
            }
        else:
            reason = self._why_last_epoch()
            self.save(RunDirectory.BEST)  # nothing to select with: the last epoch is the model
            self.best_epoch = self.epoch
            self.selection = {"method": "last_epoch", "epoch": self.epoch, "reason": reason}
            log.info("best.pt is the last epoch (%d): %s", self.epoch, reason)  # warned when it became so
        if self.unselectable_epochs:
            self.selection["unselectable_epochs"] = list(self.unselectable_epochs)
        return {} if self.test_set is None else self.evaluate(self.test_set, "test (best.pt)")

    def _why_last_epoch(self) -> str:
        if self.no_selection is not None:
            return self.no_selection
        metric = self.config.eval.select_metric
        if self.best_epoch is not None:
            return f"{RunDirectory.BEST} of epoch {self.best_epoch} is missing"
        if self.unselectable_epochs:
            return f"validation {metric} was not finite in any validated epoch"
        return "no epoch was trained" if self.epoch == 0 else "no epoch was validated"


def _loss_and_bad_rows(out: StepOutput) -> tuple[float, int]:
    """The step's loss as a float and how many embedding rows hold a non-finite value (one device sync)."""
    embeddings = out.embeddings
    bad_rows = (~torch.isfinite(embeddings).reshape(len(embeddings), -1).all(dim=1)).sum()
    loss, bad = torch.stack([out.loss.detach().float().reshape(()), bad_rows.float()]).tolist()
    return loss, int(bad)


def _describe_selection(selection: dict[str, Any]) -> str:
    if selection.get("method") == "validation":
        return (
            f"epoch {selection['epoch']}, selected on validation {selection['metric']} = "
            f"{selection['value']:.4f}"
        )
    return f"epoch {selection.get('epoch')}, the last: {selection.get('reason', 'not selected')}"


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())
