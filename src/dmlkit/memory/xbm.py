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

import torch
import torch.distributed as dist
from torch import nn

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

    def __init__(self, size: int, embedding_size: int, dtype: str | torch.dtype = "float32") -> None:
        super().__init__()
        if size < 1 or embedding_size < 1:
            raise ConfigError(
                f"CrossBatchMemory needs size ≥ 1 and embedding_size ≥ 1, got {size}, {embedding_size}"
            )
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ConfigError(f"xbm dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
            dtype = DTYPES[dtype]
        self.size = int(size)
        self.register_buffer("embeddings", torch.zeros(self.size, embedding_size, dtype=dtype))
        self.register_buffer("labels", torch.full((self.size,), -1, dtype=torch.int64))
        self.register_buffer("indices", torch.full((self.size,), -1, dtype=torch.int64))
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("fill", torch.zeros((), dtype=torch.int64))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

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
        """Gather the batch of every rank and enqueue them in rank order, so all ranks hold the same memory.

        Batches may differ in length across ranks. Without an initialised process group this is
        :meth:`enqueue`.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.enqueue(embeddings, labels, indices)
            return
        world = dist.get_world_size()
        length = torch.tensor([len(embeddings)], device=embeddings.device)
        lengths = [torch.zeros_like(length) for _ in range(world)]
        dist.all_gather(lengths, length)
        longest = int(max(int(x) for x in lengths))

        def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
            padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            padded[: len(tensor)] = tensor
            out = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(out, padded.contiguous())
            return [chunk[: int(n)] for chunk, n in zip(out, lengths, strict=True)]

        parts = zip(gather(embeddings.detach()), gather(labels), gather(indices), strict=True)
        for emb, lab, idx in parts:
            self.enqueue(emb, lab, idx)

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
