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
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmlkit import data as data_lib
from dmlkit import distances, foreign, losses, memory, metrics, miners, models, samplers
from dmlkit.data.datasets.unlabelled import is_labelled
from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message
from dmlkit.losses.self_supervised import TwoViewLoss
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
    """Where the run goes, how repeatable it is, and how fast it runs."""

    key: ClassVar[str] = "run"

    name: str | None = _field(None, "run name: outputs go to <output-dir>/<name> (default: a timestamp)")
    output_dir: str = _field("runs", "folder holding run directories")
    seed: int = _field(0, "seed of every random choice (weights, sampling, augmentation)")
    deterministic: bool = _field(False, "use deterministic kernels (slower; bitwise repeatable on CPU)")
    device: str = _field("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    progress: bool = _field(True, "show a progress bar")
    channels_last: bool = _field(
        False,
        "channels-last memory format for the model and the training batches (faster convolutions on "
        "tensor-core GPUs, with --amp)",
    )
    compile: bool = _field(
        False,
        "torch.compile the model for training (validation and test run it uncompiled; checkpoints hold the "
        "plain model's weights)",
    )
    sync_bn: bool = _field(
        False,
        "with several processes (torchrun, --nproc-per-node): BatchNorm statistics over the global batch "
        "(SyncBatchNorm) instead of each process's part",
    )


class DataSection(Section):
    """The dataset, its class-disjoint validation split, and how batches are drawn from it."""

    key: ClassVar[str] = "data"

    dataset: ComponentSpec = _component(
        "synthetic", "dataset name (see `dmlkit list datasets`)", "extra keyword arguments of the dataset"
    )
    data_root: str | None = _field(
        None, "dataset folder or file (not needed by 'synthetic'; stored absolute)"
    )
    ssl: bool = _field(
        False,
        "self-supervised training: two augmented views of every training image, each image its own "
        "class (positives by index; training labels unused); with any pair loss (ntxent: SimCLR) or "
        "self_supervised / vicreg; the unlabelled dataset needs it; sampler default random (docs/ssl.md)",
    )
    val_fraction: float = _field(
        0.2,
        "fraction of training classes held out (class-disjoint) for validation; a dataset with a validation "
        "split of its own (an OML CSV with validation and test rows) uses that instead; 0: no validation",
        ge=0.0,
        lt=1.0,
    )
    train_classes: float = _field(
        1.0,
        "fraction of the training classes (after the validation split) that training uses: the first "
        "round(fraction × C) in class order (the extended-class model upgrade trains the old model on 0.5)",
        gt=0.0,
        le=1.0,
    )
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = _field(
        0,
        "DataLoader worker processes; auto: one per core this process may use (os.sched_getaffinity) "
        "less one for the training loop, at most 32",
    )
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
    augment: ComponentSpec | None = _component(
        None,
        "augmentation recipe: photo, base, big, red, adv, randaugment, test, glyph (docs/pipeline.md); "
        "none: the dataset's, photo for image files, glyph for glyphs",
        "hyperparameters of the augmentation recipe, e.g. '{scale: [0.2, 1.0]}' or '{num_ops: 2}'",
    )
    image_size: int | None = _field(
        None,
        "input size in pixels (a square; the dataset's image_size argument); none: the recipe's (big: 256), "
        "else the backbone's, else the dataset's",
        gt=0,
    )
    mean: list[float] | None = _field(
        None, "normalisation mean per channel, e.g. 0.5,0.5,0.5; none: the backbone's, else the dataset's"
    )
    std: list[float] | None = _field(
        None, "normalisation std per channel; none: the backbone's, else the dataset's"
    )
    interpolation: str | None = _field(
        None,
        "resize interpolation of photo recipes: bilinear, bicubic or nearest; none: the backbone's, else "
        "bilinear",
    )
    crop_pct: float | None = _field(
        None,
        "evaluation crop ratio: resize the shorter side to image_size / crop_pct, then centre-crop; none: "
        "the backbone's, else the recipe's (0.875; photo 1/1.14, big 1)",
        gt=0.0,
        le=1.0,
    )
    cache_size: int | None = _field(
        None,
        "decode every image once before training into a cache at this shorter side (uint8, shared by the "
        "workers; costs channels·h·w bytes per image); none: decode on every load",
        ge=1,
    )
    cache_dir: str | None = _field(
        None,
        "keep the decoded-image cache in a memory-mapped file in this folder (reused by later runs "
        "over the same files) instead of in shared memory",
    )
    gpu_decode: Literal["auto", "on", "off"] = _field(
        "auto",
        "training batches decoded (nvJPEG), cropped and normalised on the GPU: auto (when the device is "
        "CUDA, the dataset reads image files and the recipe is photo, base or big), on (required), off",
    )

    @field_validator("data_root", "cache_dir")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        return absolute_path(value)

    @model_validator(mode="before")
    @classmethod
    def _self_supervised_defaults(cls, data: Any) -> Any:
        # Defaults that follow from the other fields, applied only where the field is not given (a given
        # value is checked in ``check``): with ``ssl`` a batch is random images, since every image is its
        # own class (a P×K class sampler has no K images of one); an unlabelled dataset has no validation.
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        if out.get("ssl") is True and "sampler" not in out:
            out["sampler"] = {"name": "random"}
        dataset = out.get("dataset")
        name = dataset.get("name") if isinstance(dataset, Mapping) else getattr(dataset, "name", dataset)
        if isinstance(name, str) and not is_labelled(name) and "val_fraction" not in out:
            out["val_fraction"] = 0.0
        return out

    @field_validator("gpu_decode", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        # YAML reads a bare on / off as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("interpolation")
    @classmethod
    def _known_interpolation(cls, value: str | None) -> str | None:
        if value is not None and value not in data_lib.augment.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(data_lib.augment.INTERPOLATIONS)}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _statistics(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) not in (1, 3):
            raise ValueError(f"needs 1 or 3 values (one per channel), got {len(value)}")
        return value

    def _check_self_supervised(self) -> None:
        """An unlabelled dataset needs ``ssl`` and has no validation; ``ssl`` needs a sampler of single
        images and the CPU pipeline (which draws the two views)."""
        name = self.dataset.name
        labelled = is_labelled(name)
        if not labelled and not self.ssl:
            raise ConfigError(
                f"dataset '{name}' has no labels: train on it self-supervised (--ssl), or give a labelled "
                "dataset (folder, csv, ...)"
            )
        if not labelled and self.val_fraction > 0:
            raise ConfigError(
                f"val_fraction {self.val_fraction}: dataset '{name}' has no labels to validate with (leave "
                "val_fraction out: it is 0 for this dataset)"
            )
        if not self.ssl:
            return
        if self.sampler_takes_k:
            raise ConfigError(
                f"sampler '{self.sampler.name}' draws P classes × K images per batch, but with ssl every "
                "image is its own class, its positive its other augmented view: use sampler random (the "
                "default with ssl)"
            )
        if self.gpu_decode == "on":
            raise ConfigError(
                "gpu_decode on: ssl draws the two views of each image on the CPU pipeline (use auto or off)"
            )

    @property
    def workers(self) -> int:
        """``num_workers`` as a count (``auto`` resolved: :func:`dmlkit.data.base.auto_workers`)."""
        return data_lib.auto_workers() if self.num_workers == "auto" else int(self.num_workers)

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

    #: Fields that are keyword arguments of the datasets that read image files (``file_dataset_options``).
    FILE_OPTIONS: ClassVar[tuple[str, ...]] = ("skip_unreadable", "verify_images", "max_image_pixels")
    #: Fields passed to the dataset builder when set: the file options and ``image_size``.
    DATASET_OPTIONS: ClassVar[tuple[str, ...]] = (*FILE_OPTIONS, "image_size")

    def file_options(self) -> dict[str, Any]:
        """The :data:`DATASET_OPTIONS` set away from their defaults."""
        fields = type(self).model_fields
        return {
            key: getattr(self, key)
            for key in self.DATASET_OPTIONS
            if getattr(self, key) != fields[key].default
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
                what = "takes no image_size" if key == "image_size" else "reads no image files"
                raise ConfigError(f"{key}: dataset '{self.dataset.name}' {what}")
        if self.augment is not None:  # its name, keywords and values, before any data is loaded
            data_lib.augment.build(self.augment.name, **self.augment.args)
        if self.gpu_decode == "on" and not torch.cuda.is_available():
            raise ConfigError(
                "gpu_decode on needs a CUDA device; none is available (auto or off decode on the CPU)"
            )
        self._check_self_supervised()
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
    backbone_args: dict[str, Any] = _field(
        dict,
        "keyword arguments of the backbone's constructor, e.g. '{widths: [16, 32, 64, 64]}' (small_cnn) or "
        "'{drop_path_rate: 0.1}' (timm); recorded in the checkpoint's model config",
    )
    pretrained_weights: str | None = _field(
        None,
        "backbone weights: a local state-dict file (stored absolute) or 'package:<name>', the file of an "
        "installed weight package (see `dmlkit list weights`); key names are mapped automatically",
    )
    allow_partial_weights: bool = _field(
        False, "load pretrained weights that fit the backbone only partly instead of refusing them"
    )
    embedding_size: int = _field(64, "embedding dimension, the head's output (0: no head)", ge=0)
    pooling: str = _field(
        "avg",
        "global pooling: avg, max, gem (of a map, or of the patch tokens without class/register tokens), "
        "cls (the class token), cls+avg (both, concatenated)",
    )
    head: ComponentSpec = _component(
        "linear",
        "embedding head: linear, mlp or none (the pooled features; see `dmlkit list heads`)",
        "head options, e.g. '{bn: true}' (linear), '{hidden_size: 1024, bn: false}' (mlp)",
    )
    normalize: bool = _field(True, "L2-normalise embeddings")
    freeze_bn: bool = _field(False, "keep BatchNorm layers in eval mode with frozen affine parameters")
    trainable_blocks: int | None = _field(
        None, "train only the last K blocks (stages) of the backbone (0: frozen backbone; none: all)", ge=0
    )

    @field_validator("pretrained_weights")
    @classmethod
    def _absolute_weights(cls, value: str | None) -> str | None:
        # a shortcut names a package, not a file: kept as written
        return value if models.weights.is_shortcut(value) else absolute_path(value)

    @field_validator("head", mode="before")
    @classmethod
    def _none_head(cls, value: Any) -> Any:
        # ``--head none`` arrives as a missing name (the flag parser reads "none" as None)
        if value is None:
            return {"name": models.heads.NO_HEAD}
        if isinstance(value, Mapping) and value.get("name") is None:
            return {**value, "name": models.heads.NO_HEAD}
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_head_no_size(cls, data: Any) -> Any:
        # ``--head none`` alone means embedding_size 0 (the default 64 would contradict it); a size given
        # explicitly is checked against the head in ``check``
        if not isinstance(data, Mapping) or "embedding_size" in data or "head" not in data:
            return data
        head = data["head"]
        name = head.get("name") if isinstance(head, Mapping) else getattr(head, "name", head)
        return {**data, "embedding_size": 0} if name in (None, models.heads.NO_HEAD) else data

    @model_validator(mode="after")
    def _weights_fit_backbone(self) -> ModelSection:
        # the backbone is never guessed from a shortcut: a mismatch, or a shortcut without --backbone, is
        # an error saying which backbone to pass
        models.weights.check_fits(self.pretrained_weights, self.backbone, "backbone" in self.model_fields_set)
        return self

    def check(self, config: TrainConfig) -> None:
        models.backbones.REGISTRY.get(self.backbone)
        pooling = models.pooling.REGISTRY.get(self.pooling)
        # known without building: small_cnn and torchvision's feature extractors give maps (timm models
        # are checked when built)
        maps_only = self.backbone == "small_cnn" or self.backbone.startswith("torchvision:")
        if getattr(pooling, "needs_class_token", False) and maps_only:
            raise ConfigError(
                f"pooling '{self.pooling}' needs a backbone with a class token (a timm ViT, DeiT or DINOv2), "
                f"not {self.backbone}"
            )
        models.heads.check(self.head.name, self.embedding_size, self.head.args)
        self._check_backbone_args()
        if models.weights.is_shortcut(self.pretrained_weights):
            models.weights.resolve(self.pretrained_weights)  # type: ignore[arg-type]  # installed?

    def _check_backbone_args(self) -> None:
        """Keys the model builder sets itself are refused; a built-in backbone checks the others by name
        and type now (a timm or torchvision model checks them when it is built)."""
        fields = type(self).model_fields
        own = {"in_channels", "image_size", *(key for key in fields if key != "backbone_args")}
        taken = sorted(own & set(self.backbone_args))
        if taken:
            raise ConfigError(f"backbone_args may not set {', '.join(taken)}: use their own options")
        if models.backbones.REGISTRY.family_of(self.backbone) is None:
            models.backbones.REGISTRY.check_kwargs(self.backbone, self.backbone_args)

    def model_kwargs(self) -> dict[str, Any]:
        """The :func:`dmlkit.models.build_model` keywords this section sets (the caller adds
        ``in_channels`` and ``image_size``, which come from the data; ``freeze_bn`` is applied after)."""
        return {
            "backbone": self.backbone,
            "embedding_size": self.embedding_size,
            "pooling": self.pooling,
            "head": self.head.name,
            "head_args": dict(self.head.args),
            "normalize": self.normalize,
            "pretrained_weights": self.pretrained_weights,
            "allow_partial_weights": self.allow_partial_weights,
            "trainable_blocks": self.trainable_blocks,
            **self.backbone_args,
        }


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
        loss, miner = self.loss, self.miner
        # Another library's loss or miner (``pml:ContrastiveLoss``, ``package.module:Class``;
        # :mod:`dmlkit.foreign`): its class and keyword names now, its values when it is built. What dmlkit
        # knows only of its own components (tuple kinds, accepting a reference set, the schedule's knob) is
        # checked only between dmlkit's: a dmlkit miner feeds a foreign loss PML-format tuples.
        foreign_loss = foreign.is_foreign(loss.name)
        tuple_kinds: frozenset[str] = frozenset()
        if foreign_loss:
            foreign.check(loss.name, loss.args, "loss")
        else:
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
        if miner is not None and foreign.is_foreign(miner.name):
            foreign.check(miner.name, miner.args, "miner")
            if self.miner_schedule is not None:
                raise ConfigError(
                    f"miner_schedule: the schedule anneals a dmlkit miner's hardness knob; '{miner.name}' is "
                    "another library's miner"
                )
        elif miner is not None:
            miners.REGISTRY.check_kwargs(miner.name, miner.args)
            if not foreign_loss:
                miners.check_fits(losses.REGISTRY.get(loss.name), tuple_kinds, miner.name)
            if self.miner_schedule is not None:
                miners.check_schedule(miner.name, self.miner_schedule)
        if not foreign_loss:
            self._check_self_supervised(config.data.ssl)

    def _check_self_supervised(self, ssl: bool) -> None:
        """A two-view loss needs ``ssl`` batches; ``ssl`` batches have no classes for a loss (or a member of
        ``multiple``) that needs a class count (proxies, class weights)."""
        named = [self.loss.name]
        if self.loss.name == "multiple":  # its members decide (their configuration was checked above)
            named = [spec["name"] for spec in losses.combine.check_members(self.loss.args["losses"])]
        for name in named:
            cls = losses.REGISTRY.get(name)
            if not ssl and isinstance(cls, type) and issubclass(cls, TwoViewLoss):
                raise ConfigError(
                    f"loss '{name}' compares two augmented views of each image: train it with ssl (--ssl), "
                    "whose batches hold both views"
                )
            needs = sorted(getattr(cls, "needs", ()))
            if ssl and needs:
                raise ConfigError(
                    f"loss '{name}' needs {', '.join(needs)} (class proxies or weights), but with ssl "
                    "every image is its own class: use a pair loss (ntxent, supcon, contrastive, ...) or a "
                    "two-view loss (self_supervised, vicreg)"
                )


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
    """Optimizer and its parameter groups, learning-rate schedule, gradient accumulation, backbone freezing,
    precision and step safety."""

    key: ClassVar[str] = "optim"

    epochs: int = _field(30, "training epochs", ge=0)
    optimizer: str = _field("adam", "optimizer: " + ", ".join(optim.OPTIMIZERS.available()))
    optimizer_args: dict[str, Any] = _field(
        dict,
        "the optimizer's own hyperparameters, e.g. '{betas: [0.9, 0.99]}' ("
        + optim.own_options(optim.OPTIMIZERS)
        + ")",
    )
    lr: float = _field(1e-3, "learning rate of the model (of the backbone, with head_lr)", gt=0)
    head_lr: float | None = _field(
        None, "learning rate of the embedding head, pooling + head, like Roth et al.'s fc_lr (default: lr)"
    )
    loss_lr: float | None = _field(None, "learning rate of the loss's own parameters (default: lr)")
    weight_decay: float = _field(0.0, "weight decay", ge=0)
    momentum: float = _field(0.9, "SGD momentum (rmsprop takes its own: optimizer_args momentum)", ge=0, lt=1)
    scheduler: str = _field(
        "warmup_cosine",
        "learning-rate schedule, stepped every optimizer update (plateau: every validation): "
        + ", ".join(optim.SCHEDULERS.available()),
    )
    scheduler_args: dict[str, Any] = _field(
        dict,
        "the schedule's own hyperparameters, e.g. '{patience: 3}' ("
        + optim.own_options(optim.SCHEDULERS)
        + ")",
    )
    warmup_epochs: float = _field(
        1.0, "linear warm-up length in epochs (warmup_cosine, plateau; 0: none)", ge=0
    )
    warmup_start_factor: float = _field(0.01, "lr factor at the start of warm-up", gt=0, le=1)
    min_lr_factor: float = _field(
        0.0,
        "lr factor reached at the end of the cosine (warmup_cosine), floor of the drops (plateau)",
        ge=0,
        le=1,
    )
    step_size: int = _field(10, "epochs between lr drops (step)", gt=0)
    milestones: list[int] = _field(list, "epochs at which lr drops (multistep)")
    gamma: float = _field(0.1, "lr drop factor (step, multistep, plateau)", gt=0)
    accumulate: int = _field(
        1,
        "gradient accumulation: one optimizer update per N batches, with the mean of their gradients (the "
        "loss and the miner see one batch at a time)",
        ge=1,
    )
    freeze_backbone_epochs: int = _field(
        0,
        "train only the pooling and head for the first N epochs (the backbone gets no gradients and runs in "
        "eval mode, BatchNorm statistics fixed), then the backbone too",
        ge=0,
    )
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

    @field_validator("loss_lr", "head_lr", "grad_clip")
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

    @field_validator("optimizer_args", "scheduler_args")
    @classmethod
    def _finite_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        return require_finite(value, "")  # type: ignore[no-any-return]

    def check(self, config: TrainConfig) -> None:
        optim.OPTIMIZERS.check_kwargs(self.optimizer, self.optimizer_args)
        optim.SCHEDULERS.check_kwargs(self.scheduler, self.scheduler_args)
        # A drop the run never reaches is an option silently dropped (a 4-epoch run with the default
        # step_size 10 trains at a constant lr): refused, like any other option that would do nothing.
        if self.scheduler == "step" and self.step_size >= self.epochs:
            raise ConfigError(
                f"scheduler 'step' drops the lr every step_size={self.step_size} epochs, but the run has "
                f"epochs={self.epochs}: it would never drop; set step_size below epochs"
            )
        late = [m for m in self.milestones if m >= self.epochs]
        if self.scheduler == "multistep" and late:
            raise ConfigError(
                f"scheduler 'multistep': milestones {late} are not below epochs={self.epochs}, so the run "
                "never reaches them"
            )
        if self.scheduler in optim.VALIDATION_SCHEDULES and config.data.val_fraction == 0:
            raise ConfigError(
                f"scheduler '{self.scheduler}' steps on validation, but val_fraction is 0 (no validation "
                "split)"
            )


class EvalSection(Section):
    """Validation (which selects best.pt and may stop training early) and the final test: metrics, distance
    and search backend."""

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
    test_before: bool = _field(
        True,
        "test the untrained model before training (the 'before' column of the test table); --no-test-before "
        "saves one pass over the test split per run (e.g. in a sweep)",
    )
    early_stop_patience: int | None = _field(
        None,
        "stop training once the validation select_metric has not improved for this many validations "
        "(Berton et al.: 3); the test then uses best.pt; none: off",
        ge=1,
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
        if self.early_stop_patience is not None and config.data.val_fraction == 0:
            raise ConfigError(
                f"early_stop_patience {self.early_stop_patience} needs validation, but val_fraction is 0"
            )


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
#: - ``data.gpu_decode``, ``data.cache_dir``: where images are decoded and cached, not which items, crops
#:   or flips a batch gets (the crop boxes are drawn from the same per-item seeds on either path);
#: - ``optim.epochs``: the loop runs to the new count and the lr schedule is recomputed for the new length
#:   from the current iteration on (the saved state holds only the iteration counter);
#: - ``optim.grad_clip``, ``optim.max_nonfinite_steps``: read at every step;
#: - ``optim.amp``: read at every step; the grad scaler starts fresh when switching to fp16;
#: - ``eval.val_every``, ``eval.eval_batch_size``: when and in what batches validation runs, not what it
#:   measures (``plateau`` and early stopping count validations, not epochs);
#: - ``run.channels_last``, ``run.compile``: memory layout and compilation of the same computation (bitwise
#:   repeatability across the change is not promised, as with ``deterministic``); checkpoints hold the plain
#:   model's weights either way;
#: - ``eval.early_stop_patience``: read at every validation against the saved count of validations without
#:   improvement, so resuming a run that stopped early with a larger patience (or none) continues it.
#:
#: Not here: anything that shapes the model, the data, the split, the sampler, the objective, the optimizer
#: state (``lr``, ``head_lr``, ``weight_decay``, ``optimizer_args``, ...: the saved optimizer restores its
#: own), the schedule (``scheduler``, ``scheduler_args``), what an update is (``accumulate``), which epochs
#: train the backbone (``freeze_backbone_epochs``), the seed, or what the saved best value was measured with
#: (metrics, distance, search backend, ``select_metric``).
RESUMABLE: frozenset[str] = frozenset(
    {
        "run.device",
        "run.progress",
        "run.deterministic",
        "data.num_workers",
        "data.gpu_decode",
        "data.cache_dir",
        "optim.epochs",
        "optim.grad_clip",
        "optim.max_nonfinite_steps",
        "optim.amp",
        "eval.val_every",
        "eval.eval_batch_size",
        "eval.early_stop_patience",
        "run.channels_last",
        "run.compile",
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
