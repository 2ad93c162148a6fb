"""Memories of past embeddings used as reference sets: cross-batch memory (XBM)."""

from dmlkit.memory.xbm import (
    DTYPES,
    CrossBatchMemory,
    available_bytes,
    build_memory,
    check_fits,
    memory_bytes,
    parse_size,
    resolve_size,
)

__all__ = [
    "DTYPES",
    "CrossBatchMemory",
    "available_bytes",
    "build_memory",
    "check_fits",
    "memory_bytes",
    "parse_size",
    "resolve_size",
]
