"""Memories of past embeddings used as reference sets: cross-batch memory (XBM)."""

from dmlkit.memory.xbm import DTYPES, CrossBatchMemory, parse_size, resolve_size

__all__ = ["DTYPES", "CrossBatchMemory", "parse_size", "resolve_size"]
