"""The training loop: data → sampler → training step → optimizer, with validation, selection and resume.

Everything a feature changes lives elsewhere: the data (:mod:`dmlkit.train.data`), the run's files
(:mod:`dmlkit.train.run_dir`), what a batch contributes to the loss (:mod:`dmlkit.train.step`, replaceable
with ``Trainer(step=...)``), the objective (:mod:`dmlkit.train.objective`), the optimizer and schedule
(:mod:`dmlkit.train.optim`). This loop only orders them.
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dmlkit import models, samplers
from dmlkit.config import TrainConfig
from dmlkit.errors import ConfigError, NonFiniteLossError
from dmlkit.inference import evaluate_model, resolve_device
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.data import RunData, run_data
from dmlkit.train.logging import LOGGER_NAME, RunLogger, setup_file_logging
from dmlkit.train.objective import build_objective
from dmlkit.train.optim import build_optimizer, build_scheduler
from dmlkit.train.run_dir import RunDirectory
from dmlkit.train.stats import EpochStats
from dmlkit.train.step import Batch, EmbeddingStep, StepFactory, TrainingStep

log = logging.getLogger(LOGGER_NAME)

StepHook = Callable[["Trainer", int], None]


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    run_dir: Path
    interrupted: bool = False
    best_epoch: int | None = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0

    def table(self) -> str:
        """Test metrics before and after training, one metric per row."""
        names = list(self.after or self.before)
        width = max([len(n) for n in names] + [6])
        lines = [f"{'metric':<{width}}  {'before':>8}  {'after':>8}", "-" * (width + 20)]
        for name in names:
            before = self.before.get(name, float("nan"))
            after = self.after.get(name, float("nan"))
            lines.append(f"{name:<{width}}  {before:>8.4f}  {after:>8.4f}")
        return "\n".join(lines)


@contextmanager
def graceful_interrupt() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set an event instead of killing the process; a second SIGINT aborts at once."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: Any) -> None:
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        event.set()
        log.warning("received %s: saving a resumable checkpoint after this step", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
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

    ``step``: a factory of the :class:`~dmlkit.train.step.TrainingStep` (default:
    :class:`~dmlkit.train.step.EmbeddingStep`); ``step_hooks``: called after every step with
    ``(trainer, global_step)``.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path | str | None = None,
        *,
        resume: bool = False,
        step_hooks: list[StepHook] | None = None,
        step: StepFactory | None = None,
    ) -> None:
        self.config = config
        self.resume = resume
        if run_dir is None:
            self.directory = RunDirectory.create(config)
        else:
            self.directory = RunDirectory.existing(run_dir) if resume else RunDirectory(run_dir)
        self.run_dir = self.directory.path
        self.step_hooks = list(step_hooks or [])
        self.step_factory: StepFactory = step or EmbeddingStep
        self.device = resolve_device(config.run.device)
        if config.optim.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp 'fp16' needs a CUDA device; use --amp bf16 on CPU")
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # batches consumed in the current epoch
        self.best_value = -math.inf
        self.best_epoch: int | None = None
        self.before: dict[str, float] = {}
        self.nonfinite_in_row = 0
        self.epoch_stats = EpochStats()
        self.stop_event: threading.Event | None = None
        self.logger: RunLogger | None = None  # set up in run(); torn down even after a failed set-up
        self._log_handler: logging.Handler | None = None

    # ----------------------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        config = self.config
        seed_everything(config.run.seed, config.run.deterministic)
        self.directory.write_config(config)
        self._log_handler = setup_file_logging(self.run_dir)
        # Before data loading: a missing logger package fails fast.
        self.logger = RunLogger(config, self.run_dir)
        log.info("run directory: %s", self.run_dir)

        self.data: RunData = run_data(config)
        self.train_set, self.val_set, self.test_set = self.data.train, self.data.val, self.data.test
        log.info("%s", self.data.describe(config.data.dataset.name))

        model_config = config.model
        self.model = models.build_model(
            backbone=model_config.backbone,
            embedding_size=model_config.embedding_size,
            pooling=model_config.pooling,
            normalize=model_config.normalize,
            pretrained_weights=model_config.pretrained_weights,
            in_channels=self.data.spec["channels"],
            image_size=self.data.spec["image_size"],
        ).to(self.device)
        if model_config.freeze_bn:
            models.freeze_batchnorm(self.model)  # before the optimizer sees the parameters
        self.objective = build_objective(
            config, self.data.num_classes, self.model.embedding_size, len(self.train_set)
        ).to(self.device)
        self.step: TrainingStep = self.step_factory(self.model, self.objective, self.device, config.optim.amp)
        if isinstance(self.step, torch.nn.Module):
            self.step.to(self.device)

        self.sampler = build_sampler(config, self.train_set)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split has {len(self.train_set)} images: too few for one batch of "
                f"{config.data.batch_size}"
            )
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            num_workers=config.data.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.run.seed),
        )
        self.optimizer = build_optimizer(
            config.optim, self.model, self.objective, self.step.extra_parameters()
        )
        self.scheduler = build_scheduler(config.optim, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.optim.amp == "fp16")

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
            "before": dict(self.before),
            "epoch_totals": self.epoch_stats.state_dict(),
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["objective"])
        self.step.load_state_dict(state.get("step", {}))
        self.sampler.load_state_dict(state["sampler"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.global_step = int(state["global_step"])
        self.best_value = float(state["best_value"])
        self.best_epoch = state["best_epoch"]
        self.before = dict(state["before"])
        self.epoch_stats = EpochStats.from_state(state["epoch_totals"])
        ckpt.set_rng_state(state["rng"])

    def save(self, name: str = RunDirectory.LAST) -> Path:
        return self.directory.save(self.state_dict(), name)

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset: Any, description: str) -> dict[str, float]:
        config = self.config
        results = evaluate_model(
            self.model,
            dataset,
            config.eval.metrics,
            batch_size=config.eval.eval_batch_size,
            device=self.device,
            amp=config.optim.amp,
            num_workers=config.data.num_workers,
            progress=config.run.progress,
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
        try:
            self._setup()
            self._start()
            with graceful_interrupt() as stop:
                self.stop_event = stop
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

    def _start(self) -> None:
        """Resume from ``last.pt``, or measure the untrained model on the test split."""
        if self.resume:
            self.load_state_dict(self.directory.load(map_location=self.device))
            self.logger.truncate_after(self.epoch)
            log.info(
                "resumed from %s at epoch %d, batch %d (step %d)",
                self.directory.file(RunDirectory.LAST),
                self.epoch,
                self.batches_done,
                self.global_step,
            )
        else:
            self.before = self.evaluate(self.test_set, "test (before)")
            log.info("test before training: %s", _fmt(self.before))

    def _finish(self, after: dict[str, float], wall_time: float) -> TrainResult:
        result = TrainResult(
            self.run_dir, best_epoch=self.best_epoch, before=self.before, after=after, wall_time=wall_time
        )
        self.directory.write_results(
            {
                "test_before": self.before,
                "test_after": after,
                "best_epoch": self.best_epoch,
                "wall_time_s": wall_time,
            }
        )
        log.info(
            "\ntest split of '%s' (%d images, classes unseen in training), before training and with "
            "best.pt (epoch %s, selected on validation %s); wall time %.1f s; run directory %s\n%s",
            self.config.data.dataset.name,
            len(self.test_set),
            self.best_epoch,
            self.config.eval.select_metric,
            wall_time,
            self.run_dir,
            result.table(),
        )
        return result

    def _teardown(self) -> None:
        if self.logger is not None:
            self.logger.close()
        handler = self._log_handler
        if handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(handler)
            handler.close()

    def _train_epochs(self) -> bool:
        """Run the remaining epochs; True when stopped by a signal."""
        resuming_mid_epoch = self.resume and self.batches_done > 0
        while self.epoch < self.config.optim.epochs:
            if not resuming_mid_epoch:
                self.sampler.set_epoch(self.epoch)
                self.batches_done = 0
                self.epoch_stats = EpochStats()
            resuming_mid_epoch = False
            self.train_set.set_epoch(self.epoch)
            self.model.train()
            if self.config.model.freeze_bn:
                models.freeze_batchnorm(self.model)
            if self._train_one_epoch():
                return True
            row = self._end_of_epoch()
            self.epoch += 1
            self.batches_done = 0
            self.logger.log_epoch(row)
            self.save()
        return False

    def _train_one_epoch(self) -> bool:
        """Train on the rest of the current epoch; True when stopped by a signal."""
        stats = self.epoch_stats
        started, seconds_before = time.perf_counter(), stats.seconds
        bar = tqdm(
            self.loader,
            total=self.steps_per_epoch - self.batches_done,
            desc=f"epoch {self.epoch + 1}/{self.config.optim.epochs}",
            disable=not self.config.run.progress,
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )
        for images, labels, indices in bar:
            batch = Batch(
                images.to(self.device, non_blocking=True),
                torch.as_tensor(labels, dtype=torch.int64).to(self.device),
                torch.as_tensor(indices, dtype=torch.int64).to(self.device),
            )
            loss_value, step_stats = self._step(batch)
            self.batches_done += 1
            stats.add_step(loss_value, step_stats, len(batch.images))
            stats.seconds = seconds_before + time.perf_counter() - started
            if loss_value is not None and self.logger.per_step:
                self.logger.log_scalars({"train/loss": loss_value, **step_stats}, step=self.global_step)
            bar.set_postfix(
                loss=f"{loss_value:.4f}" if loss_value is not None else "skip",
                img_s=f"{stats.images_per_second:.0f}",
                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
            )
            for hook in self.step_hooks:
                hook(self, self.global_step)
            if self.stop_event is not None and self.stop_event.is_set():
                bar.close()
                return True
        bar.close()
        return False

    def _step(self, batch: Batch) -> tuple[float | None, dict[str, float]]:
        """One optimisation step; ``(None, stats)`` when it was skipped."""
        optim = self.config.optim
        self.optimizer.zero_grad(set_to_none=True)
        self.step.set_progress(self.global_step / max(1, optim.epochs * self.steps_per_epoch))
        out = self.step(batch)
        if self.sampler.needs_embeddings:  # samplers that choose batches from the embeddings get them
            self.sampler.update_embeddings(out.indices.cpu(), out.embeddings.float().cpu())
        value = float(out.loss.detach())
        if not math.isfinite(value):
            return self._skip_step(f"non-finite loss ({value})"), out.stats
        self.scaler.scale(out.loss).backward()
        if optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], optim.grad_clip
            )
            if not torch.isfinite(norm) and not self.scaler.is_enabled():
                return self._skip_step(f"non-finite gradient norm ({float(norm)})"), out.stats
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        self.nonfinite_in_row = 0
        return value, out.stats

    def _skip_step(self, reason: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        log.warning(
            "step %d (epoch %d, batch %d): %s — step skipped (%d in a row)",
            self.global_step,
            self.epoch + 1,
            self.batches_done + 1,
            reason,
            self.nonfinite_in_row,
        )
        if self.nonfinite_in_row >= self.config.optim.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} non-finite losses in a row at step {self.global_step} "
                f"(epoch {self.epoch + 1}); training aborted. The last good checkpoint is "
                f"{self.directory.file(RunDirectory.LAST)}. Try a lower --lr, --grad-clip, or --amp none."
            )
        return None

    def _end_of_epoch(self) -> dict[str, Any]:
        config = self.config
        epoch_number = self.epoch + 1
        row: dict[str, Any] = {
            "epoch": epoch_number,
            "step": self.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **self.epoch_stats.summary(),
        }
        if len(self.optimizer.param_groups) > 1:
            row["loss_lr"] = self.optimizer.param_groups[1]["lr"]
        is_last = epoch_number == config.optim.epochs
        loss = row.get("train_loss", float("nan"))
        message = f"epoch {epoch_number}: loss {loss:.4f}, {row['images_per_s']:.0f} img/s"
        if self.val_set is not None and (epoch_number % config.eval.val_every == 0 or is_last):
            val = self.evaluate(self.val_set, f"val (epoch {epoch_number})")
            row.update({f"val/{k}": v for k, v in val.items()})
            value = val[config.eval.select_metric]
            if value > self.best_value:
                self.best_value, self.best_epoch = value, epoch_number
                self.save(RunDirectory.BEST)
            best = " (best)" if self.best_epoch == epoch_number else ""
            message = f"{message}, val {_fmt(val)}{best}"
        log.info("%s", message)
        return row

    def _final_test(self) -> dict[str, float]:
        best = self.directory.file(RunDirectory.BEST)
        if self.val_set is None or not best.exists():
            # Without a validation split there is nothing to select with: the last epoch is the model.
            self.save(RunDirectory.BEST)
            self.best_epoch = self.epoch
        else:
            self.model.load_state_dict(ckpt.load(best, map_location=self.device)["model"])
        return self.evaluate(self.test_set, "test (best.pt)")


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())
