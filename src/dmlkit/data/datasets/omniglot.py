"""``omniglot``: Omniglot (Lake et al., Science 2015) at 28×28, from a local ``omniglot28.npz``.

The file holds ``images`` (N×28×28 uint8, 255 = paper), ``label`` (one id per character), ``alphabet``,
``character``, ``filename`` and ``split`` (``background`` / ``evaluation``). The zero-shot protocol trains on
the 964 ``background`` characters (30 alphabets) and tests on the 659 ``evaluation`` characters (20 other
alphabets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmlkit.data.base import REGISTRY, ArrayImageDataset, DatasetSplits, dataset_file
from dmlkit.data.catalog import CATALOG, DatasetInfo
from dmlkit.errors import DataError

DEFAULT_FILE_NAME = "omniglot28.npz"
REQUIRED_ARRAYS = ("images", "label", "alphabet", "character", "filename", "split")


def _split(arrays: dict[str, np.ndarray], which: str, invert: bool, source: str) -> ArrayImageDataset:
    rows = np.flatnonzero(arrays["split"] == which)
    if len(rows) == 0:
        raise DataError(f"'{source}' has no '{which}' images")
    _, first, codes = np.unique(arrays["label"][rows], return_index=True, return_inverse=True)
    first = rows[first]  # the first image of each class names it (alphabet/character)
    names = [f"{a}/{c}" for a, c in zip(arrays["alphabet"][first], arrays["character"][first], strict=True)]
    ids = [
        f"{a}/{c}/{f}"
        for a, c, f in zip(
            arrays["alphabet"][rows], arrays["character"][rows], arrays["filename"][rows], strict=True
        )
    ]
    images = arrays["images"][rows]
    if invert:
        images = 255 - images
    return ArrayImageDataset(images, codes.astype(np.int64), names, ids)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The :data:`REQUIRED_ARRAYS` of the ``.npz`` file; ``DataError`` naming it when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in REQUIRED_ARRAYS if key not in npz.files]
            if missing:
                raise DataError(f"'{path}' lacks arrays {missing} (has {npz.files})")
            return {key: npz[key] for key in REQUIRED_ARRAYS}
    except DataError:
        raise
    except Exception as exc:
        # Everything in this block only reads the file, and a truncated or corrupt archive fails in many
        # ways (zipfile.BadZipFile, EOFError, zlib.error, a tokenize error in a .npy header, OSError,
        # ValueError...): whatever it is, it is this file's fault.
        reason = str(exc) or "unexpected end of data"
        raise DataError(
            f"cannot read omniglot file '{path}' ({type(exc).__name__}: {reason}): truncated or corrupt"
        ) from exc


def _check_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    """``DataError`` naming the file and the array unless ``images`` is N×H×W ``uint8``, ``label`` N integers
    and the other arrays N values each (a corrupt ``.npy`` header can still parse, with another shape)."""
    images = arrays["images"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        shown = f"{images.shape} {images.dtype}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"'{path}': images must be N×H×W uint8, got {shown}")
    for key in REQUIRED_ARRAYS[1:]:
        value = arrays[key]
        if not isinstance(value, np.ndarray) or value.shape != (len(images),):
            shown = value.shape if isinstance(value, np.ndarray) else type(value).__name__
            raise DataError(f"'{path}': '{key}' must hold one value per image ({len(images)}), got {shown}")
    if not np.issubdtype(arrays["label"].dtype, np.integer):
        raise DataError(f"'{path}': 'label' must be integers, got {arrays['label'].dtype}")


@REGISTRY.register("omniglot")
def omniglot(root: str | None = None, invert: bool = True, image_size: int = 28) -> DatasetSplits:
    """Omniglot from ``root`` (the ``.npz`` file or a folder holding ``omniglot28.npz``).

    ``train`` = background alphabets (964 classes), ``test`` = evaluation alphabets (659 classes).
    ``invert`` (default) makes strokes bright on a dark background, like ``synthetic``; images are resized to
    ``image_size`` by the transforms when it is not 28.
    """
    expected = f"the {DEFAULT_FILE_NAME} file or its folder"
    path = dataset_file(root, "omniglot", expected, DEFAULT_FILE_NAME, "omniglot file")
    arrays = _read_arrays(path)
    _check_arrays(arrays, path)
    images = arrays["images"]
    arrays["split"] = arrays["split"].astype(str)
    train = _split(arrays, "background", invert, str(path))
    test = _split(arrays, "evaluation", invert, str(path))
    native = int(images.shape[1])
    pixels = train.images.float() / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    glyph = {"recipe": "glyph", "mean": [mean], "std": [std], "native_size": native}
    return DatasetSplits.checked(train, test, image_size, 1, "omniglot", glyph, source=str(path))


CATALOG.add(
    DatasetInfo(
        name="omniglot",
        title="Omniglot (omniglot28.npz, 28 × 28)",
        protocol="background alphabets train (964 characters), evaluation alphabets test (659 characters); "
        "leave-one-out",
        citation="B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning through "
        "probabilistic program induction. Science 350(6266), 2015.",
        licence="MIT (github.com/brendenlake/omniglot)",
        homepage="https://github.com/brendenlake/omniglot",
        layout="root = omniglot28.npz or its folder (arrays images, label, alphabet, character, filename, "
        "split)",
        expected={"": {"train": (19280, 964), "test": (13180, 659)}},
        manual="omniglot28.npz is in ../shared/data/omniglot; the original PNGs are images_background.zip "
        "and images_evaluation.zip of github.com/brendenlake/omniglot (load those with --dataset folder "
        "--dataset-args '{class_depth: 2}')",
    )
)

__all__ = ["omniglot"]
