"""The datasets of a run, built once from its configuration: shared by training and ``dmlkit eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dmlkit import data as data_lib
from dmlkit.config import DataSection, TrainConfig
from dmlkit.data import ImageDataset
from dmlkit.errors import ConfigError


@dataclass
class RunData:
    """The training part, the class-disjoint validation part (None with ``val_fraction`` 0), the test split
    (classes unseen in training) and the spec that rebuilds the evaluation preprocessing."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    spec: dict[str, Any]

    @property
    def num_classes(self) -> int:
        """Classes of the training part (what classification-style losses need)."""
        return len(np.unique(self.train.labels))

    def split(self, name: str) -> ImageDataset:
        """``train``, ``val`` or ``test``; ``val`` of a run without a validation split is an error."""
        if name == "val" and self.val is None:
            raise ConfigError("the run has no validation split (val_fraction 0)")
        parts = {"train": self.train, "val": self.val, "test": self.test}
        if name not in parts:
            raise ConfigError(f"split must be train, val or test, got '{name}'")
        return parts[name]  # type: ignore[return-value]

    def describe(self, dataset: str) -> str:
        val = self.val
        val_text = f"{len(val)} images / {len(np.unique(val.labels))} classes" if val is not None else "none"
        return (
            f"data: {dataset} — train {len(self.train)} images / {self.num_classes} classes, val {val_text}, "
            f"test {len(self.test)} images / {len(np.unique(self.test.labels))} classes"
        )


def build_data(section: DataSection, seed: int) -> RunData:
    """Load the dataset, split off the validation classes (seeded) and attach the transforms: training
    augmentation (a pure function of ``seed``, epoch and item) on the training part, evaluation
    preprocessing on the others."""
    splits = data_lib.build(section.dataset.name, section.data_root, **section.dataset_kwargs())
    if section.val_fraction > 0:
        train, val = data_lib.class_disjoint_split(splits.train, section.val_fraction, seed)
    else:
        train, val = splits.train, None
    train.transform = splits.transform("train")
    train.augment_seed = seed
    for part in (val, splits.test):
        if part is not None:
            part.transform = splits.transform("eval")
    return RunData(train, val, splits.test, data_lib.data_spec(splits))


def run_data(config: TrainConfig) -> RunData:
    """:func:`build_data` of a configuration."""
    return build_data(config.data, config.run.seed)
