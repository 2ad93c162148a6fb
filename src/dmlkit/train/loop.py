"""The training loop: data → sampler → model → objective → optimizer, with validation and resume.

Later features plug in as entries (losses, miners, samplers, datasets, metrics) or inside the
:class:`~dmlkit.train.objective.Objective`; this loop does not change for them.
"""

from __future__ import annotations

import json
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
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dmlkit import data as data_lib
from dmlkit import models, samplers
from dmlkit.config import TrainConfig, dump_yaml
from dmlkit.errors import ConfigError, NonFiniteLossError
from dmlkit.inference import autocast, evaluate_model, resolve_device
from dmlkit.train import checkpoint as ckpt
from dmlkit.train.logging import LOGGER_NAME, RunLogger, setup_file_logging
from dmlkit.train.objective import Objective, build_objective
from dmlkit.train.optim import build_optimizer, build_scheduler

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


def dataset_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The dataset's keyword arguments, with ``skip_unreadable`` folded in for datasets that read files."""
    kwargs = dict(config.dataset_args)
    if config.skip_unreadable:
        kwargs["skip_unreadable"] = True
    return kwargs


def super_labels_of(dataset: Any, spec: dict[str, Any] | None) -> np.ndarray:
    """Per-item super-class codes for hierarchical sampling.

    ``spec`` maps class names to super-class names; without it, class names of the form
    ``"super/class"`` (Omniglot's ``alphabet/character``, nested folders) give the part before the first
    ``/``.
    """
    names = list(dataset.class_names)
    if spec is not None:
        missing = [n for n in names if n not in spec]
        if missing:
            raise ConfigError(f"sampler_args.super_labels has no super-class for class(es) {missing[:5]}")
        supers = [str(spec[n]) for n in names]
    elif all("/" in n for n in names):
        supers = [n.split("/", 1)[0] for n in names]
    else:
        raise ConfigError(
            "the hierarchical sampler needs super-classes: give sampler_args {super_labels: {class name: "
            "super-class}} or use class names of the form 'super/class'"
        )
    _, super_codes = np.unique(np.asarray(supers), return_inverse=True)
    return super_codes.astype(np.int64)[np.asarray(dataset.labels)]


def new_run_dir(config: TrainConfig) -> Path:
    name = config.name or f"{config.dataset}-{config.loss}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.output_dir) / name
    if (run_dir / "last.pt").exists():
        raise ConfigError(
            f"run directory {run_dir} already holds a run; resume it with --resume {run_dir} "
            "or choose another --name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs training, validation and the final test."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path | None = None,
        *,
        resume: bool = False,
        step_hooks: list[StepHook] | None = None,
    ) -> None:
        self.config = config
        self.resume = resume
        self.run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.step_hooks = list(step_hooks or [])
        self.device = resolve_device(config.device)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp 'fp16' needs a CUDA device; use --amp bf16 on CPU")
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # batches consumed in the current epoch
        self.best_value = -math.inf
        self.best_epoch: int | None = None
        self.before: dict[str, float] = {}
        self.nonfinite_in_row = 0
        self.epoch_totals = self._new_epoch_totals()
        self.stop_event: threading.Event | None = None

    # ----------------------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        config = self.config
        seed_everything(config.seed, config.deterministic)
        dump_yaml(config, self.run_dir / "config.yaml")
        self._log_handler = setup_file_logging(self.run_dir)
        self.logger = RunLogger(
            config, self.run_dir
        )  # before data loading: a missing logger package fails fast
        log.info("run directory: %s", self.run_dir)

        splits = data_lib.build(config.dataset, config.data_root, **dataset_kwargs(config))
        train_full = splits.train
        if config.val_fraction > 0:
            self.train_set, self.val_set = data_lib.class_disjoint_split(
                train_full, config.val_fraction, config.seed
            )
        else:
            self.train_set, self.val_set = train_full, None
        self.test_set = splits.test
        self.data_spec = data_lib.data_spec(splits)
        self.train_set.transform = splits.transform("train")
        self.train_set.augment_seed = config.seed
        for part in (self.val_set, self.test_set):
            if part is not None:
                part.transform = splits.transform("eval")
        num_classes = len(np.unique(self.train_set.labels))
        log.info(
            "data: %s — train %d images / %d classes, val %s, test %d images / %d classes",
            config.dataset,
            len(self.train_set),
            num_classes,
            f"{len(self.val_set)} images / {len(np.unique(self.val_set.labels))} classes"
            if self.val_set
            else "none",
            len(self.test_set),
            len(np.unique(self.test_set.labels)),
        )

        self.model = models.build_model(
            backbone=config.backbone,
            embedding_size=config.embedding_size,
            pooling=config.pooling,
            normalize=config.normalize,
            pretrained_weights=config.pretrained_weights,
            in_channels=self.data_spec["channels"],
            image_size=self.data_spec["image_size"],
        ).to(self.device)
        if config.freeze_bn:
            models.freeze_batchnorm(self.model)  # before the optimizer sees the parameters
        embedding_size = self.model.embedding_size
        self.objective: Objective = build_objective(
            config, num_classes, embedding_size, len(self.train_set)
        ).to(self.device)

        sampler_kwargs = dict(config.sampler_args)
        sampler_params = samplers.REGISTRY.parameters(config.sampler)
        if "samples_per_class" in sampler_params:
            sampler_kwargs.setdefault("samples_per_class", config.samples_per_class)
        if "super_labels" in sampler_params:
            sampler_kwargs["super_labels"] = super_labels_of(
                self.train_set, sampler_kwargs.get("super_labels")
            )
        self.sampler = samplers.build(
            config.sampler,
            labels=self.train_set.labels,
            batch_size=config.batch_size,
            seed=config.seed,
            **sampler_kwargs,
        )
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split has {len(self.train_set)} images: too few for one batch of "
                f"{config.batch_size}"
            )
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.optimizer = build_optimizer(config, self.model, self.objective)
        self.scheduler = build_scheduler(config, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sampler_state = self.sampler.state_dict()
        sampler_state.update(epoch=self.epoch, batches_yielded=self.batches_done)
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "model": self.model.state_dict(),
            "model_config": dict(self.model.config),
            "data_spec": dict(self.data_spec),
            "config": self.config.model_dump(mode="json"),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "sampler": sampler_state,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "before": dict(self.before),
            "epoch_totals": self.epoch_totals,
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["objective"])
        self.sampler.load_state_dict(state["sampler"])
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.global_step = int(state["global_step"])
        self.best_value = float(state["best_value"])
        self.best_epoch = state["best_epoch"]
        self.before = dict(state["before"])
        self.epoch_totals = state["epoch_totals"]
        ckpt.set_rng_state(state["rng"])

    def save(self, name: str = "last.pt") -> Path:
        path = self.run_dir / name
        ckpt.save_atomic(self.state_dict(), path)
        return path

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset: Any, description: str) -> dict[str, float]:
        results = evaluate_model(
            self.model,
            dataset,
            self.config.metrics,
            batch_size=self.config.eval_batch_size,
            device=self.device,
            amp=self.config.amp,
            num_workers=self.config.num_workers,
            progress=self.config.progress,
            seed=self.config.seed,
            description=description,
            distance=self.config.eval_distance,
            backend=self.config.eval_backend,
        )
        return {name: float(results.metrics[name]) for name in self.config.metrics}

    # ----------------------------------------------------------------------------------------- training
    def run(self) -> TrainResult:
        """Train (or continue) to ``config.epochs``, then test the best checkpoint once."""
        start_time = time.perf_counter()
        try:
            self._setup()
            if self.resume:
                state = ckpt.load(self.run_dir / "last.pt", map_location=self.device)
                self.load_state_dict(state)
                self.logger.truncate_after(self.epoch)
                log.info(
                    "resumed from %s at epoch %d, batch %d (step %d)",
                    self.run_dir / "last.pt",
                    self.epoch,
                    self.batches_done,
                    self.global_step,
                )
            else:
                self.before = self.evaluate(self.test_set, "test (before)")
                log.info("test before training: %s", _fmt(self.before))
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
            after = self._final_test()
            result = TrainResult(
                self.run_dir,
                best_epoch=self.best_epoch,
                before=self.before,
                after=after,
                wall_time=time.perf_counter() - start_time,
            )
            (self.run_dir / "results.json").write_text(
                json.dumps(
                    {
                        "test_before": self.before,
                        "test_after": after,
                        "best_epoch": self.best_epoch,
                        "wall_time_s": result.wall_time,
                    },
                    indent=2,
                )
            )
            log.info(
                "\ntest split of '%s' (%d images, classes unseen in training), before training and with "
                "best.pt (epoch %s, selected on validation %s); wall time %.1f s; run directory %s\n%s",
                self.config.dataset,
                len(self.test_set),
                self.best_epoch,
                self.config.select_metric,
                result.wall_time,
                self.run_dir,
                result.table(),
            )
            return result
        finally:
            self._teardown()

    def _teardown(self) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(handler)
            handler.close()

    def _train_epochs(self) -> bool:
        """Run the remaining epochs; True when stopped by a signal."""
        config = self.config
        resuming_mid_epoch = self.resume and self.batches_done > 0
        while self.epoch < config.epochs:
            if not resuming_mid_epoch:
                self.sampler.set_epoch(self.epoch)
                self.batches_done = 0
                self.epoch_totals = self._new_epoch_totals()
            resuming_mid_epoch = False
            self.train_set.set_epoch(self.epoch)
            self.model.train()
            if config.freeze_bn:
                models.freeze_batchnorm(self.model)
            if self._train_one_epoch():
                return True
            row = self._end_of_epoch()
            self.epoch += 1
            self.batches_done = 0
            self.logger.log_epoch(row)
            self.save()
        return False

    def _new_epoch_totals(self) -> dict[str, Any]:
        return {"sums": {}, "counts": {}, "counted": 0, "images": 0, "skipped": 0, "seconds": 0.0}

    def _train_one_epoch(self) -> bool:
        """Train on the rest of the current epoch; True when stopped by a signal.

        Running sums live in ``self.epoch_totals`` (part of the checkpoint) so an epoch that was
        interrupted and resumed reports the same averages as an uninterrupted one.
        """
        config = self.config
        totals = self.epoch_totals
        started = time.perf_counter()
        seconds_before = totals["seconds"]
        remaining = self.steps_per_epoch - self.batches_done
        bar = tqdm(
            self.loader,
            total=remaining,
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
            disable=not config.progress,
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )
        for batch_images, labels, indices in bar:
            batch_images = batch_images.to(self.device, non_blocking=True)
            labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
            indices = torch.as_tensor(indices, dtype=torch.int64).to(self.device)
            loss_value, stats = self._step(batch_images, labels, indices)
            self.batches_done += 1
            totals["images"] += len(batch_images)
            totals["seconds"] = seconds_before + time.perf_counter() - started
            if loss_value is None:
                totals["skipped"] += 1
            else:
                totals["counted"] += 1
                sums, counts = totals["sums"], totals["counts"]
                for key, value in (("train_loss", loss_value), *stats.items()):
                    if math.isfinite(value):  # statistics absent or undefined at a step are not averaged in
                        sums[key] = sums.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
                if self.logger.per_step:
                    self.logger.log_scalars({"train/loss": loss_value, **stats}, step=self.global_step)
            rate = totals["images"] / max(totals["seconds"], 1e-9)
            bar.set_postfix(
                loss=f"{loss_value:.4f}" if loss_value is not None else "skip",
                img_s=f"{rate:.0f}",
                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
            )
            for hook in self.step_hooks:
                hook(self, self.global_step)
            if self.stop_event is not None and self.stop_event.is_set():
                bar.close()
                return True
        bar.close()
        self._epoch_stats = {key: value / totals["counts"][key] for key, value in totals["sums"].items()}
        self._epoch_stats.update(
            images_per_s=totals["images"] / max(totals["seconds"], 1e-9),
            epoch_time_s=totals["seconds"],
            skipped_steps=totals["skipped"],
        )
        return False

    def _step(
        self, batch_images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[float | None, dict[str, float]]:
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.set_progress(self.global_step / max(1, config.epochs * self.steps_per_epoch))
        with autocast(self.device, config.amp):
            embeddings = self.model(batch_images)
        if getattr(self.sampler, "needs_embeddings", False):  # coreset samplers choose batches from these
            self.sampler.update_embeddings(indices.cpu(), embeddings.detach().float().cpu())
        # The loss runs in float32: similarity exponentials overflow or lose precision in half precision.
        loss, stats = self.objective(embeddings.float(), labels, indices)
        value = float(loss.detach())
        if not math.isfinite(value):
            return self._skip_step(f"non-finite loss ({value})"), stats
        self.scaler.scale(loss).backward()
        if config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], config.grad_clip
            )
            if not torch.isfinite(norm) and not self.scaler.is_enabled():
                return self._skip_step(f"non-finite gradient norm ({float(norm)})"), stats
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        self.nonfinite_in_row = 0
        return value, stats

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
        if self.nonfinite_in_row >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} non-finite losses in a row at step {self.global_step} "
                f"(epoch {self.epoch + 1}); training aborted. The last good checkpoint is "
                f"{self.run_dir / 'last.pt'}. Try a lower --lr, --grad-clip, or --amp none."
            )
        return None

    def _end_of_epoch(self) -> dict[str, Any]:
        config = self.config
        epoch_number = self.epoch + 1
        row: dict[str, Any] = {
            "epoch": epoch_number,
            "step": self.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **self._epoch_stats,
        }
        if len(self.optimizer.param_groups) > 1:
            row["loss_lr"] = self.optimizer.param_groups[1]["lr"]
        is_last = epoch_number == config.epochs
        if self.val_set is not None and (epoch_number % config.val_every == 0 or is_last):
            val = self.evaluate(self.val_set, f"val (epoch {epoch_number})")
            row.update({f"val/{k}": v for k, v in val.items()})
            value = val[config.select_metric]
            if value > self.best_value:
                self.best_value, self.best_epoch = value, epoch_number
                self.save("best.pt")
            log.info(
                "epoch %d: loss %.4f, %.0f img/s, val %s%s",
                epoch_number,
                row.get("train_loss", float("nan")),
                row["images_per_s"],
                _fmt(val),
                " (best)" if self.best_epoch == epoch_number else "",
            )
        else:
            log.info(
                "epoch %d: loss %.4f, %.0f img/s",
                epoch_number,
                row.get("train_loss", float("nan")),
                row["images_per_s"],
            )
        return row

    def _final_test(self) -> dict[str, float]:
        best = self.run_dir / "best.pt"
        if self.val_set is None or not best.exists():
            # Without a validation split there is nothing to select with: the last epoch is the model.
            self.save("best.pt")
            self.best_epoch = self.epoch
        else:
            self.model.load_state_dict(ckpt.load(best, map_location=self.device)["model"])
        return self.evaluate(self.test_set, "test (best.pt)")


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())
