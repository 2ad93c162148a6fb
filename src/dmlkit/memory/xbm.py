"""Cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

Embeddings drift slowly once training has warmed up, so the embeddings of past mini-batches, kept in a
FIFO queue, are good stand-ins for the current ones: every anchor can be compared with thousands of
stored items through the loss's ``ref_emb/ref_labels`` path at the cost of one B × M similarity matrix.

The memory is a ring buffer of detached embeddings (in a chosen dtype), int64 labels and the int64
dataset indices of the items, so that an anchor is never paired with a stored copy of itself (matched
by dataset index, not by position). All state lives in registered buffers, so ``state_dict()`` — and
with it the training checkpoint — holds the whole memory, its write pointer, fill level and the
iteration counter used for the warm-up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from dmlkit.distributed import gather_rows
from dmlkit.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_size(size: int | float | str) -> int | float:
    """A memory size as written: a count (an int, or digits: ``8192``, ``"8192"``) or a ratio of the training
    set (a float, or a decimal: ``0.5``, ``"1.0"``); must be positive and finite."""
    value: int | float
    if isinstance(size, str):
        text = size.strip()
        try:
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ConfigError(f"xbm size must be a count or a ratio, got '{size}'") from None
    else:
        value = size
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"xbm size must be a count or a ratio, got {size!r}")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"xbm size must be a positive count, got {value}")
    if isinstance(value, float) and not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"xbm size ratio must be positive and finite, got {value}")
    return value


def resolve_size(size: int | float | str, train_size: int) -> int:
    """Memory size from a count (e.g. ``8192``) or a ratio of the training set (e.g. ``0.5``), as
    :func:`parse_size` reads them. Ratios are ``round(ratio × train_size)``, at least 1."""
    value = parse_size(size)
    return value if isinstance(value, int) else max(1, round(value * train_size))


#: Bytes per entry besides the embedding: the int64 label and the int64 dataset index.
_ENTRY_OVERHEAD = 2 * torch.empty((), dtype=torch.int64).element_size()
_GIB = 1024**3


def memory_bytes(size: int, embedding_size: int, dtype: str | torch.dtype = "float32") -> int:
    """Bytes a memory of ``size`` entries takes: ``size × (embedding_size × dtype bytes + 16)``."""
    itemsize = torch.empty((), dtype=_dtype(dtype)).element_size()
    return int(size) * (int(embedding_size) * itemsize + _ENTRY_OVERHEAD)


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory that can still be allocated on ``device``: free CUDA memory (``torch.cuda.mem_get_info``), or
    for the CPU the kernel's ``MemAvailable`` (free + reclaimable; ``/proc/meminfo``), else the free
    physical pages (``os.sysconf``). None where it cannot be told (other devices, other systems)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(
    size: int,
    embedding_size: int,
    dtype: str | torch.dtype = "float32",
    device: torch.device | str | None = None,
    what: str = "cross-batch memory",
) -> None:
    """Raise ``ConfigError`` before allocating when a memory of ``size`` entries needs more than the memory
    available on ``device`` (:func:`available_bytes`; no check where that is unknown). ``what`` names the
    option in the message (e.g. ``xbm_size 1.0``)."""
    needed = memory_bytes(size, embedding_size, dtype)
    available = available_bytes(device)
    if available is None or needed <= available:
        return
    where = torch.device(device if device is not None else "cpu")
    raise ConfigError(
        f"{what}: a cross-batch memory of {size:,} entries ({embedding_size}-d {_dtype_name(dtype)} "
        f"embeddings + int64 label and index) needs {needed / _GIB:,.1f} GiB, but only "
        f"{available / _GIB:,.1f} GiB is available on {where}; use a smaller --xbm-size (a count, or a "
        "ratio of the training set) or a 2-byte --xbm-dtype"
    )


def build_memory(
    size: int | float | str,
    train_size: int,
    embedding_size: int,
    dtype: str | torch.dtype = "float32",
    device: torch.device | str | None = None,
) -> CrossBatchMemory:
    """The memory of a run: size resolved (:func:`resolve_size`), checked against the memory available on
    ``device`` (:func:`check_fits`, the message naming ``xbm_size`` as given), allocated on ``device``."""
    entries = resolve_size(size, train_size)
    check_fits(entries, embedding_size, dtype, device, what=f"xbm_size {size}")
    return CrossBatchMemory(entries, embedding_size, dtype, device=device)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"xbm dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    return DTYPES[dtype]


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CrossBatchMemory(nn.Module):
    """A FIFO ring buffer of ``size`` (embedding, label, dataset index) entries.

    ``enqueue`` writes a batch after the oldest entries are dropped (exact FIFO order, also across the
    wrap-around); ``contents`` returns the filled part; ``ordered`` returns it oldest first.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    write_pointer: torch.Tensor
    fill: torch.Tensor
    iteration: torch.Tensor

    def __init__(
        self,
        size: int,
        embedding_size: int,
        dtype: str | torch.dtype = "float32",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if size < 1 or embedding_size < 1:
            raise ConfigError(
                f"CrossBatchMemory needs size ≥ 1 and embedding_size ≥ 1, got {size}, {embedding_size}"
            )
        dtype = _dtype(dtype)
        # Before allocating: a size beyond the available memory is a named error, not a crash or a
        # machine driven into swap.
        check_fits(size, embedding_size, dtype, device, what=f"CrossBatchMemory(size={size})")
        self.size = int(size)
        buffers = {
            "embeddings": torch.zeros(self.size, embedding_size, dtype=dtype, device=device),
            "labels": torch.full((self.size,), -1, dtype=torch.int64, device=device),
            "indices": torch.full((self.size,), -1, dtype=torch.int64, device=device),
            "write_pointer": torch.zeros((), dtype=torch.int64, device=device),
            "fill": torch.zeros((), dtype=torch.int64, device=device),
            "iteration": torch.zeros((), dtype=torch.int64, device=device),
        }
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    def __len__(self) -> int:
        return int(self.fill)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Append a batch, overwriting the oldest entries; a batch larger than the memory keeps its tail."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embeddings.shape[1]:
            raise ConfigError(
                f"memory holds {self.embeddings.shape[1]}-d embeddings, got shape {tuple(embeddings.shape)}"
            )
        if not (len(embeddings) == len(labels) == len(indices)):
            raise ConfigError(
                f"enqueue needs as many labels and indices as embeddings, got "
                f"{len(embeddings)}, {len(labels)}, {len(indices)}"
            )
        if labels.is_floating_point() or indices.is_floating_point():
            raise ConfigError("memory labels and indices must be integer tensors")
        n = len(embeddings)
        if n > self.size:
            embeddings, labels, indices, n = (
                embeddings[-self.size :],
                labels[-self.size :],
                indices[-self.size :],
                self.size,
            )
        start = int(self.write_pointer)
        slots = (torch.arange(n, device=self.labels.device) + start) % self.size
        self.embeddings[slots] = embeddings.detach().to(self.embeddings.device, self.embeddings.dtype)
        self.labels[slots] = labels.to(self.labels.device, torch.int64)
        self.indices[slots] = indices.to(self.indices.device, torch.int64)
        self.write_pointer.fill_((start + n) % self.size)
        self.fill.fill_(min(self.size, int(self.fill) + n))

    @torch.no_grad()
    def enqueue_all_ranks(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> None:
        """Gather the batch of every rank and enqueue them in rank order, so all ranks hold the same memory
        (for a loop that does not gather the batch itself; dmlkit's training step does, and enqueues the
        global batch with :meth:`enqueue`).

        Batches may differ in length across ranks. Without an initialised process group this is
        :meth:`enqueue`.
        """
        gathered = gather_rows(embeddings.detach(), labels, indices)  # in rank order; itself in one process
        self.enqueue(*gathered)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled entries (embeddings, labels, indices), in slot order (not FIFO order)."""
        n = int(self.fill)
        return self.embeddings[:n], self.labels[:n], self.indices[:n]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled entries oldest first."""
        n = int(self.fill)
        if n < self.size:
            order = torch.arange(n, device=self.labels.device)
        else:
            order = (torch.arange(self.size, device=self.labels.device) + int(self.write_pointer)) % self.size
        return self.embeddings[order], self.labels[order], self.indices[order]

    def extra_repr(self) -> str:
        return f"size={self.size}, embedding_size={self.embeddings.shape[1]}, dtype={self.embeddings.dtype}"
