"""Dataset builders; importing this package registers them in :data:`dmlkit.data.base.REGISTRY`."""

from dmlkit.data.datasets.csv_dataset import csv_dataset
from dmlkit.data.datasets.folder import file_splits, folder
from dmlkit.data.datasets.omniglot import omniglot
from dmlkit.data.datasets.synthetic import render_glyphs, synthetic

__all__ = ["csv_dataset", "file_splits", "folder", "omniglot", "render_glyphs", "synthetic"]
