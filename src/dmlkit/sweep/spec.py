"""A sweep specification (``dmlkit sweep SPEC.yaml``): a base training configuration, the factors that vary,
the seeds, the objective and the search; every configuration it can produce is validated before anything runs.

```yaml
name: losses                       # the study (default: the file's name)
base: base.yaml                    # a dmlkit train config: a file (relative to the spec) or a mapping
factors:                           # a key of the config (a flag name: lr, loss; or section.key) → its levels
  loss: [contrastive, multisimilarity, {name: triplet, args: {margin: 0.2}}]   # a list: a grid
  lr: {log_uniform: [1.0e-4, 1.0e-2]}                                           # a distribution
  embedding_size: {int: [64, 512], step: 64}
  miner: {levels: {none: null, semihard: semihard}}                             # named levels
seeds: [0, 1, 2]                   # every configuration is trained once per seed
objective: {metric: map@r, split: val}   # what the search optimises: the mean over the seeds
sampler: grid                      # grid (every factor a list), one_at_a_time, random or tpe
max_trials: 20                     # configurations (default: the grid's size)
nproc_per_node: 1                  # > 1: every run is a torchrun job
executor: local                    # or submitit: each run a Slurm job (executor_args: its parameters)
```

``sampler: one_at_a_time`` (every factor a list) runs the influence-map design of Berton et al.: the base
point (every factor at its first level) and, for each factor, each other level with the rest at their first
levels — 1 + Σ (levels − 1) configurations instead of the grid's product.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmlkit import metrics
from dmlkit.config.loading import flag_keys, format_validation_error, load_yaml, make_config, parse_yaml
from dmlkit.config.sections import TrainConfig
from dmlkit.errors import ConfigError

#: The distributions a factor may follow (random and TPE samplers): name → Optuna's suggest call.
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "log_uniform", "int")


class Factor(BaseModel):
    """One varied configuration key: named ``levels`` (a grid), or a distribution over a range."""

    model_config = ConfigDict(extra="forbid")

    levels: dict[str, Any] | None = None
    uniform: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    int: tuple[int, int] | None = None
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Factor:
        given = [k for k in ("levels", *DISTRIBUTIONS) if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a factor is a list of levels or one of {', '.join(DISTRIBUTIONS)}; got {given}"
            )
        if self.levels is not None and not self.levels:
            raise ValueError("a factor needs at least one level")
        for kind in DISTRIBUTIONS:
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} needs low < high, got {list(bounds)}")
        return self

    @property
    def is_grid(self) -> bool:
        return self.levels is not None

    def endpoints(self) -> list[Any]:
        """The values that validate the factor: every level, or the range's two ends."""
        if self.levels is not None:
            return list(self.levels.values())
        low, high = self.uniform or self.log_uniform or self.int  # type: ignore[misc]
        return [low, high]


def level_label(value: Any) -> str:
    """A short text naming a level in tables, plots and Optuna's categorical choices."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and set(value) <= {"name", "args"} and "name" in value:
        args = value.get("args") or {}
        inner = ",".join(f"{k}={level_label(v)}" for k, v in args.items())
        return f"{value['name']}({inner})" if inner else str(value["name"])
    return json.dumps(value, sort_keys=True) if isinstance(value, Mapping | list) else str(value)


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = "map@r"
    split: Literal["val", "test"] = "val"

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        metrics.check_options([value], "cosine", "torch")
        return value

    @property
    def direction(self) -> str:
        return "maximize" if metrics.higher_is_better(self.metric) else "minimize"


class SweepSpec(BaseModel):
    """The parsed specification (see the module docstring); ``base`` is resolved to a mapping."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base: dict[str, Any] = Field(default_factory=dict)
    factors: dict[str, Factor]
    seeds: list[int] = Field(default_factory=lambda: [0])
    objective: Objective = Field(default_factory=Objective)
    sampler: Literal["grid", "one_at_a_time", "random", "tpe"] | None = None
    max_trials: int | None = Field(default=None, gt=0)
    nproc_per_node: int = Field(default=1, ge=1)
    storage: str | None = None
    executor: Literal["local", "submitit"] = "local"
    executor_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factors", mode="before")
    @classmethod
    def _lists_are_grids(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        return {
            key: {"levels": {level_label(v): v for v in factor}} if isinstance(factor, list) else factor
            for key, factor in value.items()
        }

    @model_validator(mode="after")
    def _search(self) -> SweepSpec:
        if not self.factors:
            raise ValueError("a sweep needs at least one factor")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        grid = all(f.is_grid for f in self.factors.values())
        if self.sampler is None:
            self.sampler = "grid" if grid else "tpe"
        if self.sampler in ("grid", "one_at_a_time") and not grid:
            ranges = [k for k, f in self.factors.items() if not f.is_grid]
            raise ValueError(
                f"the {self.sampler} sampler needs every factor as a list of levels; {ranges} are ranges"
            )
        if self.max_trials is None:
            if not grid:
                raise ValueError("max_trials is needed when a factor is a range")
            self.max_trials = len(self.points()) if self.sampler == "one_at_a_time" else self.grid_size
        return self

    def base_labels(self) -> dict[str, str]:
        """Every factor at its first level (the one-at-a-time design's base point)."""
        return {key: next(iter(f.levels or {})) for key, f in self.factors.items()}

    def points(self) -> list[dict[str, str]]:
        """The one-at-a-time design's configurations as level labels: the base point, then each factor's
        other levels with every other factor at its first level."""
        base = self.base_labels()
        found = [base]
        for key, factor in self.factors.items():
            found += [{**base, key: label} for label in list(factor.levels or {})[1:]]
        return found

    def design(self) -> list[dict[str, str]] | None:
        """The configurations a finite design runs, as level labels, at most ``max_trials``: the
        one-at-a-time points, or the grid (in product order; a ``max_trials`` below the grid's size draws
        that many points with the first seed). None for the random and TPE samplers."""
        if self.sampler == "one_at_a_time":
            return self.points()[: self.max_trials]
        if self.sampler != "grid":
            return None
        keys = list(self.factors)
        grid = [dict(zip(keys, labels, strict=True)) for labels in itertools.product(*self.grid().values())]
        if self.max_trials is not None and self.max_trials < len(grid):
            return random.Random(self.seeds[0]).sample(grid, self.max_trials)
        return grid

    def is_varied_alone(self, labels: Mapping[str, Any], factor: str) -> bool:
        """Whether a configuration (labels) has every factor but ``factor`` at its base level: the runs
        a one-at-a-time influence plot of ``factor`` may use."""
        base = self.base_labels()
        return all(str(labels.get(key)) == base[key] for key in self.factors if key != factor)

    @property
    def grid_size(self) -> int:
        return math.prod(len(f.levels or {}) for f in self.factors.values())

    def grid(self) -> dict[str, list[str]]:
        """Factor → its level labels (Optuna's grid search space)."""
        return {key: list(f.levels or {}) for key, f in self.factors.items()}

    def config(
        self, values: Mapping[str, Any], seed: int, run: Mapping[str, Any] | None = None
    ) -> TrainConfig:
        """The training configuration of factor ``values`` (actual values, not labels) and ``seed``, with
        ``run`` options (output folder, name) on top; errors name the factor."""
        data = json.loads(json.dumps(self.base))  # a deep copy of plain data
        for key, value in {**values, "seed": seed, **(run or {})}.items():
            _set(data, key, value)
        return make_config(data, source=f"sweep '{self.name}'")

    def validate_all(self) -> int:
        """Build the configuration of every grid point (every level; a range's two ends), with the first
        seed: a wrong key or value fails here, before any run. Returns how many were checked."""
        keys = list(self.factors)
        checked = 0
        if self.sampler == "one_at_a_time":
            combinations: Any = (
                [(self.factors[k].levels or {})[point[k]] for k in keys] for point in self.points()
            )
        else:
            combinations = itertools.product(*(self.factors[k].endpoints() for k in keys))
        for combination in combinations:
            try:
                self.config(dict(zip(keys, combination, strict=True)), self.seeds[0])
            except ConfigError as exc:
                shown = ", ".join(f"{k}={level_label(v)}" for k, v in zip(keys, combination, strict=True))
                raise ConfigError(f"sweep '{self.name}': the configuration {shown}: {exc}") from None
            checked += 1
        return checked


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (a flag name, ``lr``, or ``section.key``) in a config mapping."""
    if "." in key:
        section, _, rest = key.partition(".")
        node = data.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"sweep factor '{key}': '{section}' is not a section")
        _set(node, rest, value) if "." in rest else node.__setitem__(rest, value)
    else:
        data[key] = value


def config_id(values: Mapping[str, Any]) -> str:
    """A short stable name of a configuration (its factor values), the folder of its runs."""
    text = json.dumps({k: values[k] for k in sorted(values)}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=5).hexdigest()


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file; ``base`` may name a config file relative to the spec."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: '{path}'")
    raw = parse_yaml(path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"'{path}' must hold a mapping (name, base, factors, seeds, objective, ...)")
    raw.setdefault("name", path.stem)
    base = raw.get("base")
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        raw["base"] = load_yaml(base_path)
    try:
        return SweepSpec(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


def known_keys() -> list[str]:
    """The flag names a factor may use (``section.key`` works too)."""
    return sorted(flag_keys())


__all__ = [
    "DISTRIBUTIONS",
    "Factor",
    "Objective",
    "SweepSpec",
    "config_id",
    "known_keys",
    "level_label",
    "load_spec",
]
