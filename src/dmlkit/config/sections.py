"""The sections of a training configuration, each a small pydantic model.

``TrainConfig`` = ``run`` + ``data`` + ``model`` + ``objective`` + ``memory`` + ``optim`` + ``eval`` +
``log``. A section validates its own values; its :meth:`Section.check` asks the registries of the packages it
configures whether the names and keyword arguments exist (before any data is loaded). Every named
component (dataset, sampler, loss, miner) is a :class:`ComponentSpec` ``(name, args)``.

Every leaf field is also a command-line flag of the same name (``embedding_size`` → ``--embedding-size``);
a component gives two flags, ``--loss`` (its name) and ``--loss-args`` (its arguments). Field names are the
flag names, so a key means the same in a YAML section, on the command line and in a log.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmlkit import data as data_lib
from dmlkit import distances, losses, memory, metrics, miners, models, samplers
from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message
from dmlkit.train import optim


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    """A field with its help text; a callable default is a factory (a fresh mutable value per config)."""
    if callable(default):
        return Field(default_factory=default, description=help, **kwargs)
    return Field(default, description=help, **kwargs)


def _component(name: str | None, help: str, args_help: str) -> Any:
    """A component field: its default (``name`` with no arguments, or None) and the help of both flags."""
    default = (lambda: ComponentSpec(name=name)) if name is not None else None
    return _field(default, help, json_schema_extra={"args_help": args_help})


def _check_choice(kind: str, value: str, choices: list[str]) -> str:
    if value not in choices:
        raise UnknownNameError(unknown_name_message(kind, value, choices))
    return value


def require_finite(value: Any, where: str) -> Any:
    """``value`` unchanged; raises ``ValueError`` naming the key (``where.key[0]``...) and the value if a
    float anywhere inside it (mappings and lists are walked) is infinite or NaN.

    Typed float fields refuse ``inf``/``nan`` through ``allow_inf_nan=False``; this covers the values pydantic
    cannot type, the keyword arguments of components (``loss_args``, ...) and mapping-valued options.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}={value!r} is not a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            require_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for position, item in enumerate(value):
            require_finite(item, f"{where}[{position}]")
    return value


def canonical_metric(name: str) -> str:
    """The one spelling of a metric name used everywhere (config, history rows, results): stripped,
    lower-case (``"MAP@R "`` → ``"map@r"``)."""
    return name.strip().lower()


def absolute_path(path: str | None) -> str | None:
    """``~`` expanded and made absolute against the current folder, so that a run's stored configuration
    means the same file from any folder (``dmlkit eval``, ``--resume``)."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


class ComponentSpec(BaseModel):
    """A component chosen by name with its keyword arguments; the owning package's registry validates both.

    In YAML either ``{name: arcface, args: {margin: 28.6}}`` or just the name (``arcface``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("args")
    @classmethod
    def _finite_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        return require_finite(value, "")  # type: ignore[no-any-return]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    # allow_inf_nan=False: ``--lr inf`` or ``grad_clip: .nan`` is refused at config time, naming the key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    #: Section name in YAML and in error messages.
    key: ClassVar[str] = ""

    def check(self, config: TrainConfig) -> None:
        """Check names and keyword arguments against their registries (no data is loaded)."""


class RunSection(Section):
    """Where the run goes and how repeatable it is."""

    key: ClassVar[str] = "run"

    name: str | None = _field(None, "run name: outputs go to <output-dir>/<name> (default: a timestamp)")
    output_dir: str = _field("runs", "folder holding run directories")
    seed: int = _field(0, "seed of every random choice (weights, sampling, augmentation)")
    deterministic: bool = _field(False, "use deterministic kernels (slower; bitwise repeatable on CPU)")
    device: str = _field("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    progress: bool = _field(True, "show a progress bar")


class DataSection(Section):
    """The dataset, its class-disjoint validation split, and how batches are drawn from it."""

    key: ClassVar[str] = "data"

    dataset: ComponentSpec = _component(
        "synthetic", "dataset name (see `dmlkit list datasets`)", "extra keyword arguments of the dataset"
    )
    data_root: str | None = _field(
        None, "dataset folder or file (not needed by 'synthetic'; stored absolute)"
    )
    val_fraction: float = _field(
        0.2, "fraction of training classes held out (class-disjoint) for validation", ge=0.0, lt=1.0
    )
    num_workers: int = _field(0, "DataLoader worker processes", ge=0)
    skip_unreadable: bool = _field(
        False,
        "drop images that fail the build-time check (reporting how many) and replace ones that fail while "
        "training by another image of their class, instead of failing",
    )
    verify_images: data_lib.images.VerifyMode = _field(
        "auto",
        "build-time check of image files: 'header' (parse headers), 'full' (decode every image, in threads) "
        "or 'auto' (full when the images total at most 4·10⁹ pixels, else header)",
    )
    max_image_pixels: int | None = _field(
        data_lib.images.DEFAULT_MAX_IMAGE_PIXELS,
        "refuse images with more pixels than this (decompression-bomb guard; Pillow's limit by default; "
        "none: no limit)",
        ge=1,
    )
    sampler: ComponentSpec = _component(
        "m_per_class",
        "batch sampler name (see `dmlkit list samplers`)",
        "extra keyword arguments of the sampler",
    )
    batch_size: int = _field(128, "images per batch", gt=0)
    samples_per_class: int = _field(4, "images per class in a batch (K of P×K)", gt=0)

    @field_validator("data_root")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        return absolute_path(value)

    @model_validator(mode="after")
    def _check_batch_shape(self) -> DataSection:
        if self.sampler_takes_k and self.batch_size % self.samples_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by samples_per_class "
                f"({self.samples_per_class})"
            )
        return self

    @property
    def sampler_takes_k(self) -> bool:
        """Whether the sampler builds P×K batches (takes ``samples_per_class``)."""
        registry = samplers.REGISTRY
        name = self.sampler.name
        return name in registry and "samples_per_class" in registry.parameters(name)

    #: Fields that are keyword arguments of the datasets that read image files (``folder``, ``csv``).
    FILE_OPTIONS: ClassVar[tuple[str, ...]] = ("skip_unreadable", "verify_images", "max_image_pixels")

    def file_options(self) -> dict[str, Any]:
        """The :data:`FILE_OPTIONS` set away from their defaults."""
        fields = type(self).model_fields
        return {
            key: getattr(self, key) for key in self.FILE_OPTIONS if getattr(self, key) != fields[key].default
        }

    @model_validator(mode="after")
    def _file_options_given_once(self) -> DataSection:
        # ``--verify-images header`` with ``--dataset-args '{verify_images: full}'``: refuse, not pick one
        for key, value in self.file_options().items():
            if key in self.dataset.args and self.dataset.args[key] != value:
                given = self.dataset.args[key]
                raise ValueError(f"{key} is {value!r} but dataset_args sets {key}: {given!r}; give it once")
        return self

    def dataset_kwargs(self) -> dict[str, Any]:
        """The dataset's keyword arguments with the :data:`FILE_OPTIONS` set away from their defaults folded
        in, for a dataset that takes them (:meth:`check` refuses them for one that does not)."""
        accepted = data_lib.REGISTRY.parameters(self.dataset.name)
        return {**self.dataset.args, **{k: v for k, v in self.file_options().items() if k in accepted}}

    def check(self, config: TrainConfig) -> None:
        data_lib.REGISTRY.check_kwargs(self.dataset.name, self.dataset.args, provided_by_caller=("root",))
        accepted = data_lib.REGISTRY.parameters(self.dataset.name)
        for key in self.file_options():
            if key not in accepted:
                raise ConfigError(f"{key}: dataset '{self.dataset.name}' reads no image files")
        # The values too (a mapping): the registry checks their types before any data is loaded.
        sampler_extra = {"samples_per_class": self.samples_per_class} if self.sampler_takes_k else {}
        samplers.REGISTRY.check_kwargs(
            self.sampler.name,
            {**self.sampler.args, **sampler_extra},
            provided_by_caller=("labels", "batch_size", "seed", "rank", "world_size"),
        )


class ModelSection(Section):
    """Backbone → pooling → head → (normalised) embedding."""

    key: ClassVar[str] = "model"

    backbone: str = _field("small_cnn", "'small_cnn', 'timm:<name>' or 'torchvision:<name>'")
    pretrained_weights: str | None = _field(None, "local state-dict file for the backbone (stored absolute)")
    embedding_size: int = _field(64, "embedding dimension (0: pooled backbone features)", ge=0)
    pooling: str = _field("avg", "global pooling: avg, max or gem")
    normalize: bool = _field(True, "L2-normalise embeddings")
    freeze_bn: bool = _field(False, "keep BatchNorm layers in eval mode with frozen affine parameters")

    @field_validator("pretrained_weights")
    @classmethod
    def _absolute_weights(cls, value: str | None) -> str | None:
        return absolute_path(value)

    def check(self, config: TrainConfig) -> None:
        models.backbones.REGISTRY.get(self.backbone)
        models.pooling.REGISTRY.get(self.pooling)


class ObjectiveSection(Section):
    """The loss, the miner that feeds it, and progressive hard mining."""

    key: ClassVar[str] = "objective"

    loss: ComponentSpec = _component(
        "multisimilarity",
        "loss name (see `dmlkit list losses`)",
        "loss hyperparameters, e.g. '{alpha: 2, beta: 50}'",
    )
    miner: ComponentSpec | None = _component(
        None, "miner name, or none (see `dmlkit list miners`)", "miner hyperparameters"
    )
    miner_schedule: str | dict[str, Any] | None = _field(
        None,
        "progressive hard mining: anneal the miner's hardness knob per iteration, e.g. "
        "'linear:start=0.5,end=0.1,from=0.1,until=0.8' (kinds linear, cosine, step; see docs/miners.md)",
    )

    @field_validator("miner", mode="before")
    @classmethod
    def _no_miner(cls, value: Any) -> Any:
        # ``--miner none`` with ``--miner-args``: arguments for nothing are an error, not silently dropped.
        if isinstance(value, dict) and value.get("name") is None:
            if value.get("args"):
                raise ValueError(f"miner_args {value['args']} given but no miner is set")
            return None
        return value

    @model_validator(mode="after")
    def _schedule_needs_miner(self) -> ObjectiveSection:
        if self.miner_schedule is not None and self.miner is None:
            raise ValueError(f"miner_schedule '{self.miner_schedule}' given but no miner is set")
        return self

    def check(self, config: TrainConfig) -> None:
        loss = self.loss
        losses.REGISTRY.check_kwargs(
            loss.name, loss.args, provided_by_caller=("num_classes", "embedding_size")
        )
        tuple_kinds, accepts_ref = losses.capabilities(loss.name, loss.args)
        memory_size = config.memory.xbm_size
        if memory_size is not None and not accepts_ref:
            takes_ref = [n for n in losses.available() if losses.REGISTRY.get(n).accepts_ref]
            raise ConfigError(
                f"loss '{loss.name}' cannot take a reference set, so it cannot use a cross-batch memory "
                f"(xbm_size={memory_size}); losses that can: {', '.join(takes_ref)}"
            )
        if self.miner is not None:
            miners.REGISTRY.check_kwargs(self.miner.name, self.miner.args)
            miners.check_fits(losses.REGISTRY.get(loss.name), tuple_kinds, self.miner.name)
            if self.miner_schedule is not None:
                miners.check_schedule(self.miner.name, self.miner_schedule)


class MemorySection(Section):
    """Cross-batch memory (XBM): past embeddings as an extra reference set."""

    key: ClassVar[str] = "memory"

    xbm_size: int | float | None = _field(
        None,
        "cross-batch memory size: a count (e.g. 8192) or a ratio of the training set (e.g. 1.0); none: off",
    )
    xbm_start: int = _field(0, "iterations before the memory is filled and used (XBM paper: 1000)", ge=0)
    xbm_weight: float = _field(1.0, "weight of the memory loss added to the in-batch loss", ge=0)
    xbm_dtype: Literal["float32", "float16", "bfloat16"] = _field(
        "float32", "storage dtype of the memory embeddings"
    )

    @field_validator("xbm_size", mode="before")
    @classmethod
    def _count_or_ratio(cls, value: Any) -> Any:
        # "1.0" on the command line is a ratio, "1000" a count: decided by the text, not by int coercion.
        return None if value is None else memory.parse_size(value)


class OptimSection(Section):
    """Optimizer, learning-rate schedule (stepped every iteration), precision and step safety."""

    key: ClassVar[str] = "optim"

    epochs: int = _field(30, "training epochs", ge=0)
    optimizer: str = _field("adam", "optimizer: " + ", ".join(optim.OPTIMIZERS.available()))
    lr: float = _field(1e-3, "learning rate of the model", gt=0)
    loss_lr: float | None = _field(None, "learning rate of the loss's own parameters (default: lr)")
    weight_decay: float = _field(0.0, "weight decay", ge=0)
    momentum: float = _field(0.9, "SGD momentum", ge=0, lt=1)
    scheduler: str = _field(
        "warmup_cosine",
        "learning-rate schedule, stepped every iteration: " + ", ".join(optim.SCHEDULERS.available()),
    )
    warmup_epochs: float = _field(1.0, "linear warm-up length in epochs (warmup_cosine)", ge=0)
    warmup_start_factor: float = _field(0.01, "lr factor at the start of warm-up", gt=0, le=1)
    min_lr_factor: float = _field(0.0, "lr factor reached at the end of the cosine", ge=0, le=1)
    step_size: int = _field(10, "epochs between lr drops (step)", gt=0)
    milestones: list[int] = _field(list, "epochs at which lr drops (multistep)")
    gamma: float = _field(0.1, "lr drop factor (step, multistep)", gt=0)
    grad_clip: float | None = _field(None, "clip the gradient norm to this value")
    amp: Literal["none", "bf16", "fp16"] = _field(
        "none", "mixed precision: bf16 (cpu or cuda) or fp16 with grad scaling (cuda)"
    )
    max_nonfinite_steps: int = _field(
        10,
        "abort after this many skipped steps in a row (a step with non-finite embeddings, loss or gradient "
        "is skipped)",
        gt=0,
    )

    @field_validator("loss_lr", "grad_clip")
    @classmethod
    def _positive_or_none(cls, value: float | None, info: Any) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"{info.field_name} must be positive or none, got {value}")
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return _check_choice("optimizer", value, optim.OPTIMIZERS.available())

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return _check_choice("scheduler", value, optim.SCHEDULERS.available())


class EvalSection(Section):
    """Validation (which selects best.pt) and the final test: metrics, distance and search backend."""

    key: ClassVar[str] = "eval"

    val_every: int = _field(1, "validate every N epochs (selects best.pt)", gt=0)
    metrics: list[str] = _field(
        lambda: list(metrics.DEFAULT_METRICS), "metrics reported on validation and test"
    )
    select_metric: str = _field(
        "map@r",
        "validation metric that selects best.pt (its best value: the highest, the lowest for distances)",
    )
    eval_batch_size: int = _field(256, "batch size when computing embeddings", gt=0)
    eval_distance: str = _field(
        "cosine", "distance of the validation/test k-NN search (and of dists@* metrics)"
    )
    eval_backend: str = _field(
        "torch",
        "validation/test k-NN search: torch (exact), faiss-flat (exact), faiss-ivf / faiss-hnsw "
        "(approximate; need faiss)",
    )

    @field_validator("metrics")
    @classmethod
    def _metrics_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one metric is needed")
        return list(dict.fromkeys(canonical_metric(m) for m in value))

    @field_validator("select_metric")
    @classmethod
    def _canonical_select(cls, value: str) -> str:
        # Stored in its canonical spelling: the loop indexes the validation results with it.
        return canonical_metric(value)

    @field_validator("eval_distance")
    @classmethod
    def _known_distance(cls, value: str) -> str:
        return _check_choice("distance", value, distances.available(indexable=True))

    @field_validator("eval_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        return _check_choice("search backend", value, list(metrics.BACKENDS))

    @model_validator(mode="after")
    def _select_among_metrics(self) -> EvalSection:
        if self.select_metric not in self.metrics:
            raise ValueError(f"select_metric '{self.select_metric}' must be one of metrics {self.metrics}")
        return self

    def check(self, config: TrainConfig) -> None:
        metrics.check_options(self.metrics, self.eval_distance, self.eval_backend)


class LogSection(Section):
    """Where scalars go besides the run directory's history.jsonl."""

    key: ClassVar[str] = "log"

    tensorboard: bool = _field(False, "log to TensorBoard in the run directory (needs dmlkit[tensorboard])")
    wandb: bool = _field(False, "log to Weights & Biases (needs dmlkit[wandb])")
    wandb_project: str = _field("dmlkit", "W&B project")


class TrainConfig(BaseModel):
    """Everything ``dmlkit train`` does, in sections (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    optim: OptimSection = Field(default_factory=OptimSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    log: LogSection = Field(default_factory=LogSection)

    def sections(self) -> list[Section]:
        return [getattr(self, name) for name in type(self).model_fields]

    def check(self) -> None:
        """Every section's :meth:`Section.check` (names and arguments against their registries)."""
        for section in self.sections():
            section.check(self)


#: The options that may change when a run is resumed (``section.field``); every other change is refused
#: by name (:meth:`dmlkit.train.run_dir.RunDirectory.check_resume`). Each was chosen because the resumed run
#: really applies the new value and nothing saved depends on the old one:
#:
#: - ``run.device``: the state is loaded on the CPU and moved to the model's device;
#: - ``run.progress``, ``log.*``: output only;
#: - ``run.deterministic``: kernel choice only (bitwise repeatability is then lost, as the flag says);
#: - ``data.num_workers``: batches, their order and their augmentation do not depend on the workers;
#: - ``optim.epochs``: the loop runs to the new count and the lr schedule is recomputed for the new length
#:   from the current iteration on (the saved state holds only the iteration counter);
#: - ``optim.grad_clip``, ``optim.max_nonfinite_steps``: read at every step;
#: - ``optim.amp``: read at every step; the grad scaler starts fresh when switching to fp16;
#: - ``eval.val_every``, ``eval.eval_batch_size``: when and in what batches validation runs, not what it
#:   measures.
#:
#: Not here: anything that shapes the model, the data, the split, the sampler, the objective, the optimizer
#: state (``lr``, ``weight_decay``, ...: the saved optimizer restores its own), the seed, or what the saved
#: best value was measured with (metrics, distance, search backend, ``select_metric``).
RESUMABLE: frozenset[str] = frozenset(
    {
        "run.device",
        "run.progress",
        "run.deterministic",
        "data.num_workers",
        "optim.epochs",
        "optim.grad_clip",
        "optim.max_nonfinite_steps",
        "optim.amp",
        "eval.val_every",
        "eval.eval_batch_size",
        "log.tensorboard",
        "log.wandb",
        "log.wandb_project",
    }
)

#: Section name → its model, in YAML and ``--help`` order.
SECTIONS: dict[str, type[Section]] = {
    name: info.annotation  # type: ignore[misc]
    for name, info in TrainConfig.model_fields.items()
}
