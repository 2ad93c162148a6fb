"""The real data in ``../shared`` through the generic datasets: the Omniglot evaluation folders through
``folder`` and the clothing CSV through ``csv`` (skipped only where ``../shared`` is absent)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from dmlkit import data

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
OMNIGLOT = SHARED / "omniglot" / "images_evaluation"
CLOTHING = SHARED / "clothing"


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="../shared/data/omniglot not present")
def test_omniglot_evaluation_folders_load_as_alphabet_slash_character_classes() -> None:
    splits = data.build("folder", str(OMNIGLOT), class_depth=2, image_size=28, verify_images="header")
    classes = splits.train.class_names + splits.test.class_names
    on_disk = sorted(f"{a.name}/{c.name}" for a in OMNIGLOT.iterdir() if a.is_dir() for c in a.iterdir())
    assert sorted(classes) == on_disk and len(classes) == 659  # the 659 evaluation characters
    assert len(splits.train) + len(splits.test) == 659 * 20
    assert splits.test.class_names == on_disk[-330:]  # the last half in sorted order
    image, _, _ = splits.test[0]
    assert image.shape == (3, 28, 28) and splits.test.ids[0].startswith(on_disk[-330])


@pytest.mark.skipif(not (CLOTHING / "images.csv").is_file(), reason="../shared/data/clothing not present")
def test_clothing_csv_loads_every_listed_photo_with_its_label() -> None:
    excluded = {"Not sure", "Skip"}
    with (CLOTHING / "images.csv").open(newline="") as handle:
        expected = Counter(row["label"] for row in csv.DictReader(handle) if row["label"] not in excluded)
    splits = data.build(
        "csv", str(CLOTHING), exclude_labels=sorted(excluded), image_size=32, verify_images="header"
    )
    found = Counter()
    for part in (splits.train, splits.test):
        found.update(part.class_names[code] for code in part.labels)
    assert found == expected
    assert splits.test.class_names == sorted(expected)[len(expected) - round(0.5 * len(expected)) :]
    assert splits.train.annotations.protocol == splits.test.annotations.protocol == "leave-one-out"
