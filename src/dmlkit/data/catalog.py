"""What ``dmlkit datasets`` knows of each dataset: its citation, licence, protocol, official counts and where
to get it (:class:`DatasetInfo`, in :data:`CATALOG`), and the registration of a dataset of image files from
the function that lists it (:func:`register_file_dataset`).

A dataset of image files is written once, as a *table function* ``(root, **options) -> ItemTable`` that
reads the list files the authors distribute and touches no image (not even to see whether it exists: the
builder names the first missing image with its line, ``dmlkit datasets check`` lists them all).
:func:`register_file_dataset` makes the builder (``data.build(name, root, **options)``) from it, with the
options every file dataset shares (:func:`file_dataset_options`) added to its signature; ``dmlkit datasets
check`` and ``convert`` call the table function directly.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dmlkit.data.base import REGISTRY, DatasetSplits
from dmlkit.data.images import DEFAULT_MAX_IMAGE_PIXELS, OverlapCheck, VerifyMode
from dmlkit.data.table import FileOptions, ItemTable, table_splits
from dmlkit.errors import UnknownNameError, unknown_name_message

TableFunction = Callable[..., ItemTable]


@dataclass(frozen=True)
class Download:
    """One file of a dataset's official distribution: fetched from ``url`` into ``root/filename``, checked
    against ``md5`` or ``sha256`` (and ``size`` in bytes) when known, then unpacked into ``root`` when
    ``extract`` (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``)."""

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    extract: bool = True


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as ``dmlkit datasets list`` shows it.

    - ``protocol``: how it is evaluated (one line); ``layout``: the files ``root`` must hold;
    - ``expected``: the official counts, variant → split → ``(images, classes)``; the variant is ``""``
      or the value of the option named by ``variant_option`` (VehicleID's ``size``); the split ``"all"``
      counts the whole table (GLDv2's are the file's, whose test split is a hold-out of ours);
    - ``downloads``: the official files (empty: no public URL); ``manual``: what to do by hand instead
      (registration for licence-gated sets, a mirror, the files to place);
    - ``table``: the table function (``None`` for datasets that are not image files: ``synthetic``,
      ``omniglot``);
    - ``labelled``: False for a dataset without classes (``unlabelled``), which only self-supervised
      training (``dmlkit train --ssl``) can use: it has no validation or test split.
    """

    name: str
    title: str
    protocol: str
    citation: str = ""
    licence: str = ""
    homepage: str = ""
    layout: str = ""
    expected: Mapping[str, Mapping[str, tuple[int, int]]] = field(default_factory=dict)
    variant_option: str | None = None
    downloads: tuple[Download, ...] = ()
    manual: str = ""
    table: TableFunction | None = None
    labelled: bool = True

    def expected_counts(self, options: Mapping[str, Any]) -> Mapping[str, tuple[int, int]]:
        """The official counts for these dataset options (empty when none are known)."""
        variant = "" if self.variant_option is None else str(options.get(self.variant_option, ""))
        if self.variant_option is not None and not variant and self.table is not None:
            default = inspect.signature(self.table).parameters.get(self.variant_option)
            variant = str(default.default) if default is not None else ""
        return self.expected.get(variant, {})


class Catalog:
    """Dataset name → :class:`DatasetInfo`, filled when the dataset modules are imported."""

    def __init__(self) -> None:
        self._entries: dict[str, DatasetInfo] = {}

    def add(self, info: DatasetInfo) -> DatasetInfo:
        if info.name in self._entries:
            raise ValueError(f"dataset '{info.name}' is catalogued twice")
        self._entries[info.name] = info
        return info

    def get(self, name: str) -> DatasetInfo:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message("dataset", name, self._entries)) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


#: Every dataset's :class:`DatasetInfo` (the same names as :data:`dmlkit.data.base.REGISTRY`).
CATALOG = Catalog()


def file_dataset_options(
    image_size: int = 224,
    channels: int = 3,
    skip_unreadable: bool = False,
    verify_images: VerifyMode = "auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    overlap_check: OverlapCheck = "path",
) -> tuple[int, FileOptions]:
    """The options every dataset of image files takes, declared once: ``image_size`` (the size the
    pipelines resize to), ``channels`` (1 or 3), ``skip_unreadable`` (drop files that fail the build-time
    check, replace files that fail later by another image of the class), ``verify_images`` (``auto``,
    ``header``, ``full``), ``max_image_pixels`` (``None``: no limit) and ``overlap_check`` (``path``,
    ``content``, ``none``: warn about files in both train and test)."""
    return image_size, FileOptions(channels, skip_unreadable, verify_images, max_image_pixels, overlap_check)


def _resolved(function: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """``function``'s keyword parameters with their annotations resolved to types (the registry checks
    values against them)."""
    hints = typing.get_type_hints(function)
    return [
        parameter.replace(annotation=hints.get(name, inspect.Parameter.empty), kind=parameter.KEYWORD_ONLY)
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in skip
    ]


def register_file_dataset(info: DatasetInfo) -> Callable[..., DatasetSplits]:
    """Register ``info`` in :data:`CATALOG` and its builder in the dataset registry: ``(root=None, *,
    <the table function's options>, <file_dataset_options>) -> DatasetSplits``."""
    table_function = info.table
    if table_function is None:
        raise ValueError(f"dataset '{info.name}': a file dataset needs a table function")
    own = _resolved(table_function, skip=("root",))
    shared = _resolved(file_dataset_options)
    own_names = {p.name for p in own}

    def build(root: str | None = None, **options: Any) -> DatasetSplits:
        image_size, file_options = file_dataset_options(
            **{k: v for k, v in options.items() if k not in own_names}
        )  # the options are checked before any file is read
        table = table_function(root, **{k: v for k, v in options.items() if k in own_names})
        if not file_options.skip_unreadable:  # else dropped with the unusable ones, with a warning
            table.require_files()  # a missing image is named with its list file and line
        return table_splits(table, info.name, image_size, file_options)

    root = inspect.Parameter(
        "root", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=str | None
    )
    build.__signature__ = inspect.Signature([root, *own, *shared])  # type: ignore[attr-defined]
    build.__name__ = build.__qualname__ = info.name
    build.__doc__ = f"{info.title}: {info.protocol}\n\n{inspect.getdoc(table_function) or ''}"
    CATALOG.add(info)
    REGISTRY.register(info.name)(build)
    return build


__all__ = ["CATALOG", "Catalog", "DatasetInfo", "Download", "file_dataset_options", "register_file_dataset"]
