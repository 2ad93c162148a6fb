"""Memories of past embeddings used as reference sets: cross-batch memory (XBM)."""

from dmlkit.memory.xbm import DTYPES, CrossBatchMemory, resolve_size

__all__ = ["DTYPES", "CrossBatchMemory", "resolve_size"]
