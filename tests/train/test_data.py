"""The datasets of a run: ``train_classes`` (a fraction of the training classes, for the extended-class
model upgrade)."""

from __future__ import annotations

import numpy as np
import pytest

from dmlkit.config import make_config
from dmlkit.errors import ConfigError
from dmlkit.train.data import run_data

SMALL = {"dataset": "synthetic", "dataset_args": {"num_classes": 20, "samples_per_class": 3, "image_size": 8}}


def _names(dataset) -> set[str]:  # type: ignore[no-untyped-def]
    return {str(dataset.class_names[code]) for code in np.unique(dataset.labels)}


def test_train_classes_keeps_the_first_classes_and_the_same_validation_and_test() -> None:
    full = run_data(make_config({**SMALL, "val_fraction": 0.2}))
    half = run_data(make_config({**SMALL, "val_fraction": 0.2, "train_classes": 0.5}))
    ordered = [str(full.train.class_names[c]) for c in range(full.train.num_classes)]
    assert full.train.num_classes == 8  # synthetic's 10 training classes less the 20 % held out
    assert _names(half.train) == set(ordered[:4])
    assert np.array_equal(np.sort(half.train.labels), np.repeat(np.arange(4), 3))  # contiguous codes
    assert _names(half.val) == _names(full.val) and _names(half.test) == _names(full.test)
    assert len(half.train) == 4 * 3


def test_train_classes_needs_two_classes() -> None:
    with pytest.raises(ConfigError, match="keeps 1 of the 8 training classes"):
        run_data(make_config({**SMALL, "val_fraction": 0.2, "train_classes": 0.1}))


def test_train_classes_is_a_fraction() -> None:
    with pytest.raises(ConfigError, match="train_classes"):
        make_config({**SMALL, "train_classes": 1.5})
