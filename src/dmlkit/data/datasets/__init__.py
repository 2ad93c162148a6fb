"""Dataset builders, one file per dataset. Importing this package imports every module in it, which
registers each builder in :data:`dmlkit.data.base.REGISTRY` and catalogues it in
:data:`dmlkit.data.catalog.CATALOG`: a new dataset is a new file here, nothing else changes."""

import importlib
import pkgutil

from dmlkit.data.datasets.csv_dataset import csv_dataset, csv_table
from dmlkit.data.datasets.folder import folder, folder_table
from dmlkit.data.datasets.omniglot import omniglot
from dmlkit.data.datasets.synthetic import render_glyphs, synthetic

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["csv_dataset", "csv_table", "folder", "folder_table", "omniglot", "render_glyphs", "synthetic"]
