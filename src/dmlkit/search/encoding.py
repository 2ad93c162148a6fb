"""Input conversion shared by every search entry point: embeddings as checked 2-D float tensors, labels /
ids / groups as int64 codes (strings mapped to their index in a sorted vocabulary)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

from dmlkit.errors import DataError

ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]


def as_embeddings(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """``x`` as a detached 2-D floating-point tensor (float16/bfloat16 are widened to float32), sharing
    memory with ``x`` where it can; NaN or infinite rows are an error naming how many there are."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise DataError(f"{name} must hold floating-point embeddings, got numpy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise DataError(f"{name} must be a torch tensor or numpy array (n × d), got {type(x).__name__}")
    if not t.is_floating_point():
        raise DataError(f"{name} must hold floating-point embeddings, got dtype {t.dtype}")
    if t.ndim != 2:
        raise DataError(f"{name} must be 2-D (n × d), got shape {tuple(t.shape)}")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise DataError(f"{name} has {bad} row(s) with NaN or infinite values")
    return t


def encode_values(values: ArrayLike, name: str) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """Split ``values`` (labels, ids, groups) into int64 values *or* an array of strings.

    Returns ``(int64 tensor, None)`` for integer input and ``(None, str array)`` for string input.
    Floating-point input is rejected: labels are never cast from or to float.
    """
    if isinstance(values, torch.Tensor):
        if values.ndim != 1:
            raise DataError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.is_complex():
            raise DataError(f"{name} must be integers or strings, got dtype {values.dtype}")
        return values.detach().to("cpu", torch.int64), None
    array = values if isinstance(values, np.ndarray) else np.asarray(list(values))
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return torch.zeros(0, dtype=torch.int64), None
    if array.dtype.kind in "iub":
        if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{name} has values above the int64 range")
        return torch.from_numpy(array.astype(np.int64)), None
    if array.dtype.kind == "U":
        return None, array
    if array.dtype.kind == "O" and all(isinstance(v, str) for v in array):
        return None, array.astype(str)
    if array.dtype.kind == "O" and all(isinstance(v, int | np.integer) for v in array):
        return torch.from_numpy(array.astype(np.int64)), None
    raise DataError(f"{name} must be integers or strings, got dtype {array.dtype}")


def encode_pair(
    a: ArrayLike, b: ArrayLike, name_a: str, name_b: str
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """Encode two value arrays on a shared int64 code space.

    Integer values are their own codes. Strings are mapped to their index in the sorted union of both
    arrays, which is returned as the vocabulary (``None`` for integers).
    """
    ia, sa = encode_values(a, name_a)
    ib, sb = encode_values(b, name_b)
    # An empty array has no type of its own: it takes the other one's.
    if ia is not None and len(ia) == 0 and sb is not None:
        ia, sa = None, np.zeros(0, dtype=str)
    if ib is not None and len(ib) == 0 and sa is not None:
        ib, sb = None, np.zeros(0, dtype=str)
    if ia is not None and ib is not None:
        return ia, ib, None
    if sa is not None and sb is not None:
        vocabulary = np.unique(np.concatenate([sa, sb]))
        codes_a = torch.from_numpy(np.searchsorted(vocabulary, sa).astype(np.int64))
        codes_b = torch.from_numpy(np.searchsorted(vocabulary, sb).astype(np.int64))
        return codes_a, codes_b, [str(v) for v in vocabulary]
    raise DataError(f"{name_a} and {name_b} must both be integers or both be strings")


def check_length(values: torch.Tensor, n: int, name: str, of: str) -> None:
    """Raise ``DataError`` unless ``values`` has one entry per row of ``of`` (``n`` rows)."""
    if len(values) != n:
        raise DataError(f"{name} has {len(values)} entries but {of} has {n} rows")


def is_array_like(x: object) -> bool:
    """Whether ``x`` is a tensor, array, list or tuple (a value array rather than a callable)."""
    return isinstance(x, torch.Tensor | np.ndarray | list | tuple)
