"""The dataset catalogue: one entry per registered dataset, its builder's options, and the docs table that
quotes each benchmark's official counts."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from dmlkit import data
from dmlkit.data.catalog import CATALOG, file_dataset_options
from dmlkit.errors import ConfigError, UnknownNameError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "datasets.md"


def test_every_registered_dataset_is_catalogued_and_documented() -> None:
    assert CATALOG.names() == data.available()
    text = DOCS.read_text()
    for name in CATALOG.names():
        assert f"`{name}`" in text, name
        for counts in CATALOG.get(name).expected.values():
            for images, classes in counts.values():
                assert f"{images:,}" in text and f"{classes:,}" in text, (name, images, classes)


def test_a_file_dataset_builder_takes_its_own_and_the_shared_options() -> None:
    parameters = inspect.signature(data.REGISTRY.get("vehicleid")).parameters
    shared = list(inspect.signature(file_dataset_options).parameters)
    assert list(parameters) == ["root", "size", "protocol", "gallery_seed", *shared]
    with pytest.raises(UnknownNameError, match="did you mean 'size'"):
        data.build("vehicleid", "/nowhere", sise="small")
    with pytest.raises(ConfigError, match=r"gallery_seed must be"):
        data.build("vehicleid", "/nowhere", gallery_seed="one")
    with pytest.raises(UnknownNameError, match="did you mean 'cub200'"):
        CATALOG.get("cub2000")
