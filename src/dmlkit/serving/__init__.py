"""Serving what was trained: a gallery index to search, and the model exported for inference.

- :mod:`dmlkit.serving.index` (``dmlkit index build``, ``dmlkit search --index``): a gallery's embeddings in
  atomically written chunks (resumable, incremental) and a faiss index over them (flat, HNSW or IVF-PQ,
  chosen by size), stamped with the :func:`fingerprint` of the checkpoint that embedded it.
- :mod:`dmlkit.serving.export` (``dmlkit export``): the model as TorchScript or ONNX with its evaluation
  preprocessing recorded (embedded metadata and a JSON sidecar).

faiss is optional (``pip install 'dmlkit[faiss]'``) and imported only when an index is built or read.
"""

from dmlkit.serving.export import FORMATS, export_model, load_metadata, preprocessing_record
from dmlkit.serving.index import (
    KINDS,
    BuildReport,
    GalleryIndex,
    IndexOptions,
    build_index,
    choose_kind,
    fingerprint,
    open_index,
)

__all__ = [
    "FORMATS",
    "KINDS",
    "BuildReport",
    "GalleryIndex",
    "IndexOptions",
    "build_index",
    "choose_kind",
    "export_model",
    "fingerprint",
    "load_metadata",
    "open_index",
    "preprocessing_record",
]
