"""The one typed training configuration: YAML file + command-line flags over pydantic defaults.

Precedence: field defaults < ``--config`` YAML < command-line flags. Every field is a flag
(``embedding_size`` → ``--embedding-size``). Unknown keys in YAML or on the command line are errors
that name the key and suggest the closest valid one; values are validated before any data is loaded,
including the names of losses, miners, samplers, datasets and metrics and their keyword arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmlkit.errors import ConfigError, UnknownNameError, unknown_name_message

DEFAULT_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")


def _field(default: Any, help: str, group: str, **kwargs: Any) -> Any:
    return Field(default, description=help, json_schema_extra={"group": group}, **kwargs)


class TrainConfig(BaseModel):
    """Everything ``dmlkit train`` does is decided by these fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # run
    name: str | None = _field(
        None, "run name: outputs go to <output-dir>/<name> (default: a timestamp)", "run"
    )
    output_dir: str = _field("runs", "folder holding run directories", "run")
    seed: int = _field(0, "seed of every random choice (weights, sampling, augmentation)", "run")
    deterministic: bool = _field(
        False, "use deterministic kernels (slower; bitwise repeatable on CPU)", "run"
    )
    device: str = _field("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...", "run")
    progress: bool = _field(True, "show a progress bar", "run")

    # data
    dataset: str = _field("synthetic", "dataset name (see `dmlkit datasets`)", "data")
    data_root: str | None = _field(None, "dataset folder or file (not needed by 'synthetic')", "data")
    dataset_args: dict[str, Any] = _field({}, "extra keyword arguments of the dataset", "data")
    val_fraction: float = _field(
        0.2, "fraction of training classes held out (class-disjoint) for validation", "data", ge=0.0, lt=1.0
    )
    num_workers: int = _field(0, "DataLoader worker processes", "data", ge=0)
    skip_unreadable: bool = _field(
        False, "drop unreadable images (reporting how many) instead of failing", "data"
    )

    # model
    backbone: str = _field("small_cnn", "'small_cnn', 'timm:<name>' or 'torchvision:<name>'", "model")
    pretrained_weights: str | None = _field(None, "local state-dict file for the backbone", "model")
    embedding_size: int = _field(64, "embedding dimension (0: pooled backbone features)", "model", ge=0)
    pooling: str = _field("avg", "global pooling: avg, max or gem", "model")
    normalize: bool = _field(True, "L2-normalise embeddings", "model")
    freeze_bn: bool = _field(
        False, "keep BatchNorm layers in eval mode with frozen affine parameters", "model"
    )

    # objective
    loss: str = _field("multisimilarity", "loss name (see `dmlkit losses`)", "objective")
    loss_args: dict[str, Any] = _field({}, "loss hyperparameters, e.g. '{alpha: 2, beta: 50}'", "objective")
    miner: str | None = _field(None, "miner name, or none", "objective")
    miner_args: dict[str, Any] = _field({}, "miner hyperparameters", "objective")
    miner_schedule: str | dict[str, Any] | None = _field(
        None,
        "progressive hard mining: anneal the miner's hardness knob per iteration, e.g. "
        "'linear:start=0.5,end=0.1,from=0.1,until=0.8' (kinds linear, cosine, step; see docs/miners.md)",
        "objective",
    )

    # cross-batch memory
    xbm_size: int | float | None = _field(
        None,
        "cross-batch memory size: a count (e.g. 8192) or a ratio of the training set (e.g. 1.0); none: off",
        "memory",
    )
    xbm_start: int = _field(
        0, "iterations before the memory is filled and used (XBM paper: 1000)", "memory", ge=0
    )
    xbm_weight: float = _field(1.0, "weight of the memory loss added to the in-batch loss", "memory", ge=0)
    xbm_dtype: Literal["float32", "float16", "bfloat16"] = _field(
        "float32", "storage dtype of the memory embeddings", "memory"
    )

    # batches
    sampler: str = _field("m_per_class", "batch sampler name", "batches")
    sampler_args: dict[str, Any] = _field({}, "extra keyword arguments of the sampler", "batches")
    batch_size: int = _field(128, "images per batch", "batches", gt=0)
    samples_per_class: int = _field(4, "images per class in a batch (K of P×K)", "batches", gt=0)

    # optimisation
    epochs: int = _field(30, "training epochs", "optimisation", ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = _field("adam", "optimizer", "optimisation")
    lr: float = _field(1e-3, "learning rate of the model", "optimisation", gt=0)
    loss_lr: float | None = _field(
        None, "learning rate of the loss's own parameters (default: lr)", "optimisation"
    )
    weight_decay: float = _field(0.0, "weight decay", "optimisation", ge=0)
    momentum: float = _field(0.9, "SGD momentum", "optimisation", ge=0, lt=1)
    scheduler: Literal["warmup_cosine", "step", "multistep", "constant"] = _field(
        "warmup_cosine", "learning-rate schedule (stepped every iteration)", "optimisation"
    )
    warmup_epochs: float = _field(
        1.0, "linear warm-up length in epochs (warmup_cosine)", "optimisation", ge=0
    )
    warmup_start_factor: float = _field(0.01, "lr factor at the start of warm-up", "optimisation", gt=0, le=1)
    min_lr_factor: float = _field(
        0.0, "lr factor reached at the end of the cosine", "optimisation", ge=0, le=1
    )
    step_size: int = _field(10, "epochs between lr drops (step)", "optimisation", gt=0)
    milestones: list[int] = _field([], "epochs at which lr drops (multistep)", "optimisation")
    gamma: float = _field(0.1, "lr drop factor (step, multistep)", "optimisation", gt=0)
    grad_clip: float | None = _field(None, "clip the gradient norm to this value", "optimisation")
    amp: Literal["none", "bf16", "fp16"] = _field(
        "none", "mixed precision: bf16 (cpu or cuda) or fp16 with grad scaling (cuda)", "optimisation"
    )
    max_nonfinite_steps: int = _field(
        10, "abort after this many non-finite losses in a row (each one is skipped)", "optimisation", gt=0
    )

    # evaluation
    val_every: int = _field(1, "validate every N epochs (selects best.pt)", "evaluation", gt=0)
    metrics: list[str] = _field(
        list(DEFAULT_METRICS), "metrics reported on validation and test", "evaluation"
    )
    select_metric: str = _field(
        "map@r", "validation metric that selects best.pt (higher is better)", "evaluation"
    )
    eval_batch_size: int = _field(256, "batch size when computing embeddings", "evaluation", gt=0)
    eval_distance: Literal["cosine", "euclidean", "squared_euclidean", "dot"] = _field(
        "cosine", "distance of the validation/test k-NN search (and of dists@* metrics)", "evaluation"
    )
    eval_backend: Literal["torch", "faiss-flat", "faiss-ivf", "faiss-hnsw"] = _field(
        "torch",
        "validation/test k-NN search: torch (exact), faiss-flat (exact), faiss-ivf / faiss-hnsw "
        "(approximate; need faiss)",
        "evaluation",
    )

    # logging
    tensorboard: bool = _field(
        False, "log to TensorBoard in the run directory (needs dmlkit[tensorboard])", "logging"
    )
    wandb: bool = _field(False, "log to Weights & Biases (needs dmlkit[wandb])", "logging")
    wandb_project: str = _field("dmlkit", "W&B project", "logging")

    @field_validator("loss_lr", "grad_clip")
    @classmethod
    def _positive_or_none(cls, value: float | None, info: Any) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"{info.field_name} must be positive or none, got {value}")
        return value

    @field_validator("xbm_size", mode="before")
    @classmethod
    def _count_or_ratio(cls, value: Any) -> Any:
        # "1.0" on the command line is a ratio, "1000" a count: decide by the text, not by int coercion.
        if isinstance(value, str) and value.strip().lower() not in ("none", "null"):
            text = value.strip()
            return int(text) if text.isdigit() else float(text)
        return value

    @field_validator("xbm_size")
    @classmethod
    def _positive_size(cls, value: int | float | None) -> int | float | None:
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise ValueError(f"xbm_size must be a positive count or ratio, got {value}")
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one metric is needed")
        return [m.strip().lower() for m in value]

    @model_validator(mode="after")
    def _check_batch_shape(self) -> TrainConfig:
        if _sampler_takes_k(self.sampler) and self.batch_size % self.samples_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by samples_per_class "
                f"({self.samples_per_class})"
            )
        if self.select_metric.lower() not in self.metrics:
            raise ValueError(f"select_metric '{self.select_metric}' must be one of metrics {self.metrics}")
        return self


def _sampler_takes_k(name: str) -> bool:
    """Whether the sampler builds P×K batches (takes ``samples_per_class``)."""
    from dmlkit import samplers

    return name in samplers.REGISTRY and "samples_per_class" in samplers.REGISTRY.parameters(name)


# ---------------------------------------------------------------------------------------------------------
# Loading, validation and dumping


def field_names() -> list[str]:
    return list(TrainConfig.model_fields)


def _check_keys(data: dict[str, Any], source: str) -> None:
    valid = field_names()
    for key in data:
        if key not in valid:
            raise UnknownNameError(f"{source}: " + unknown_name_message("config key", str(key), valid))


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        value = err.get("input")
        shown = "" if isinstance(value, dict) and not err["loc"] else f" (got {value!r})"
        lines.append(f"{source}: invalid value for '{where}'{shown}: {err['msg']}")
    return "\n".join(lines)


def make_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build and fully validate a config from a mapping; errors name the key and the source."""
    _check_keys(data, source)
    try:
        config = TrainConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    validate_names(config)
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}"
        )
    _check_keys(data, str(path))
    return data


def dump_yaml(config: TrainConfig, path: str | Path) -> None:
    """Write the fully resolved config; the file is re-runnable with ``--config``."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def validate_names(config: TrainConfig) -> None:
    """Check every name and keyword argument against its registry, before any data is loaded."""
    from dmlkit import data, losses, metrics, miners, models, samplers

    try:
        data.REGISTRY.check_kwargs(config.dataset, config.dataset_args, provided_by_caller=("root",))
        if config.skip_unreadable and "skip_unreadable" not in data.REGISTRY.parameters(config.dataset):
            raise ConfigError(f"skip_unreadable: dataset '{config.dataset}' reads no image files")
        if not models.backbone_exists(config.backbone):
            raise UnknownNameError(
                unknown_name_message("backbone", config.backbone, models.available_backbones())
            )
        models.check_pooling(config.pooling)
        losses.REGISTRY.check_kwargs(
            config.loss, config.loss_args, provided_by_caller=("num_classes", "embedding_size")
        )
        loss_cls = losses.REGISTRY.get(config.loss)
        tuple_kinds, accepts_ref = loss_cls.tuple_kinds, loss_cls.accepts_ref
        if config.loss == "multiple":
            from dmlkit.losses.combine import declared_attributes

            if "losses" not in config.loss_args:
                raise ConfigError("loss 'multiple' needs loss_args {losses: [{name: ..., weight: ...}, ...]}")
            tuple_kinds, accepts_ref = declared_attributes(config.loss_args["losses"])
        if config.xbm_size is not None and not accepts_ref:
            takes_ref = [n for n in losses.available() if losses.REGISTRY.get(n).accepts_ref]
            raise ConfigError(
                f"loss '{config.loss}' cannot take a reference set, so it cannot use a cross-batch memory "
                f"(xbm_size={config.xbm_size}); losses that can: {', '.join(takes_ref)}"
            )
        if config.miner is not None:
            miners.REGISTRY.check_kwargs(config.miner, config.miner_args)
            if config.loss == "multiple":
                kind = miners.REGISTRY.get(config.miner).output_kind
                if kind not in tuple_kinds:
                    raise ConfigError(
                        f"miner '{config.miner}' outputs {kind}, which no member of this "
                        f"'multiple' loss without its own miner can use"
                    )
            else:
                miners.check_compatible(loss_cls, config.miner)
        elif config.miner_args:
            raise ConfigError(f"miner_args {config.miner_args} given but no miner is set")
        if config.miner_schedule is not None:
            if config.miner is None:
                raise ConfigError(f"miner_schedule '{config.miner_schedule}' given but no miner is set")
            miners.check_schedule(config.miner, config.miner_schedule)
        sampler_extra = ("samples_per_class",) if _sampler_takes_k(config.sampler) else ()
        samplers.REGISTRY.check_kwargs(
            config.sampler,
            list(config.sampler_args) + list(sampler_extra),
            provided_by_caller=("labels", "batch_size", "seed", "rank", "world_size"),
        )
        metrics.check_options(config.metrics, config.eval_distance, config.eval_backend)
    except ConfigError:
        raise
    except KeyError as exc:  # pragma: no cover - registries raise UnknownNameError
        raise ConfigError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------
# Command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _annotation_kind(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _annotation_kind(args[0])
    if annotation is bool:
        return "bool"
    if origin is dict:
        return "dict"
    if origin is list:
        return "list_int" if args and args[0] is int else "list_str"
    if origin is Literal:
        return "choice"
    return "scalar"


def _parse_mapping(text: str) -> dict[str, Any]:
    """``'{alpha: 2, beta: 50}'`` (YAML/JSON) or ``'alpha=2,beta=50'`` → dict."""
    text = text.strip()
    if not text or text.lower() in ("none", "null", "{}"):
        return {}
    if "=" in text and not text.startswith("{"):
        out: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"expected key=value, got '{part}'")
            out[key.strip()] = yaml.safe_load(value.strip())
        return out
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not a mapping: {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a mapping: {text!r}")
    return value


def _parse_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        return [str(v) for v in yaml.safe_load(text)]
    return [part.strip() for part in text.split(",") if part.strip()]


def _none_or(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "null") else text


class SuggestingParser(argparse.ArgumentParser):
    """argparse that answers an unknown flag with the closest valid one."""

    def parse_args(
        self, args: typing.Sequence[str] | None = None, namespace: typing.Any = None
    ) -> typing.Any:
        # Unknown flags of a subcommand surface at the top-level parser; report them from the
        # subcommand's parser, which knows the valid flags to suggest from.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser: argparse.ArgumentParser = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parser = action.choices.get(getattr(parsed, action.dest, None), self)
            parser.error("unrecognized arguments: " + " ".join(extras))
        return parsed

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments"):
            bad = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
            flags = [opt for action in self._actions for opt in action.option_strings if opt.startswith("--")]
            for flag in bad:
                flag = flag.split("=", 1)[0]
                if flag not in flags:
                    message = unknown_name_message("option", flag, flags)
                    break
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped, with its default in the help text."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, info in TrainConfig.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        group_name = str(extra.get("group", "other"))
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        kind = _annotation_kind(info.annotation)
        default = info.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, (dict, list)) else default
        help_text = f"{info.description} (default: {shown})"
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        elif kind == "dict":
            group.add_argument(_flag(name), type=_parse_mapping, metavar="MAP", **common)
        elif kind in ("list_str", "list_int"):
            group.add_argument(_flag(name), type=_parse_list, metavar="A,B,...", **common)
        elif kind == "choice":
            choices = typing.get_args(info.annotation)
            group.add_argument(_flag(name), choices=choices, **common)
        else:
            group.add_argument(_flag(name), type=_none_or, metavar="VALUE", **common)


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """Merge defaults < ``--config`` file (or ``base``) < flags and validate."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    config_path = getattr(args, "config", None)
    if config_path:
        data.update(load_yaml(config_path))
        source = str(config_path)
    overrides = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    data.update(overrides)
    if overrides:
        source = f"{source} + command line" if config_path else "command line"
    return make_config(data, source)
