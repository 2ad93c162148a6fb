"""Multi-process training (``torchrun``): the process group, gathering a global batch with autograd, and the
few collectives the trainer needs. Everything here is the identity in a single process.

Semantics (docs/distributed.md): ``--batch-size`` is the *global* batch. The sampler forms it once, exactly as
a single process would, and each of the W ranks embeds a contiguous shard of it
(:class:`dmlkit.samplers.ShardedBatchSampler`). :func:`gather_rows` concatenates every rank's embeddings,
labels and dataset indices in rank order, so every rank holds the global batch, and **every rank computes the
full loss on it** (miners included, with the same seed on every rank). The gather's backward sums the
gradients of all ranks for each rank's own rows: each rank computes the same loss L, so a rank's embeddings
receive W · ∂L/∂e, and DDP's averaging of the parameter gradients divides by W again — the gradients are
exactly those of one process on the concatenated batch, for every loss (including the ones that do not
decompose over anchors: FastAP, Smooth-AP, the hardest-in-batch miners). The cost is the loss computed W
times, on B × B' similarities, which is small next to the backbone; the alternative (each rank its own anchors
against the global batch) needs every loss to be a mean over anchors and a reduction that knows the global
count, which is what makes PML's ``efficient=True`` give other gradients. Parameters outside the model (a
proxy loss's proxies, a step's heads) get identical gradients on every rank and are averaged once more
(:func:`average_gradients`) so they cannot drift apart.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dmlkit.errors import ConfigError

#: Seconds a collective may wait before the process group gives up (a rank that died or hangs): every rank
#: then fails instead of waiting for ever. ``DMLKIT_DIST_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes: ``rank`` of ``world_size`` (``local_rank`` on its
    node). ``Distributed()`` is the single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains (a process group is running)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory, the logs and the checkpoints."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: CUDA device ``local_rank`` when training on CUDA, else ``requested``."""
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def wrap(self, model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
        """``model`` under DistributedDataParallel (BatchNorm converted to SyncBatchNorm with ``sync_bn``);
        the model itself in a single process. The wrapper shares the model's parameters."""
        if not self.enabled:
            return model
        if sync_bn:
            if device.type != "cuda":
                raise ConfigError(
                    "sync_bn: SyncBatchNorm runs on CUDA devices (nccl) only; on the CPU each process "
                    "normalises its own part of the batch (or use --freeze-bn)"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=not sync_bn)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is set on any rank (a stop request seen by one rank stops all after one step)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=_collective_device(device))
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)


def from_environment() -> Distributed:
    """The ranks ``torchrun`` describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (a single process when
    they are absent)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> Distributed:
    """Start the process group of a ``torchrun`` launch (nccl on CUDA, gloo on the CPU; a timeout on every
    collective) and return this rank's :class:`Distributed`; a single process when not launched so."""
    found = from_environment()
    if not found.enabled:
        return found
    if not dist.is_available():
        raise ConfigError(
            "this PyTorch build has no torch.distributed: multi-process training is unavailable"
        )
    if dist.is_initialized():
        return found
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(found.local_rank)
    timeout = float(os.environ.get("DMLKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return found


def shutdown() -> None:
    """End the process group, if one runs."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group of more than one rank runs in this process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(device: torch.device) -> torch.device:
    # gloo reduces CPU tensors, nccl CUDA ones
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order (lengths may differ); backward: each rank's rows get the sum over ranks
    of the gradients for them (every rank computed the loss on all rows)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, lengths: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.lengths = lengths
        ctx.rank = dist.get_rank()
        return _gather_padded(tensor, lengths)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.lengths[: ctx.rank])
        return grad[start : start + ctx.lengths[ctx.rank]], None


def _gather_padded(tensor: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    longest = max(lengths)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    out = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([chunk[:n] for chunk, n in zip(out, lengths, strict=True)])


def row_counts(count: int, device: torch.device) -> list[int]:
    """How many rows every rank holds (one small all-gather)."""
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    found = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(found, mine)
    return [int(x) for x in found]


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of each tensor (equal row counts across the tensors of one rank, any across ranks),
    concatenated in rank order; floating tensors that require grad keep it (:class:`_GatherRows`). The
    tensors themselves in a single process."""
    if not active():
        return tensors
    lengths = row_counts(len(tensors[0]), tensors[0].device)
    return tuple(
        _GatherRows.apply(t, lengths) if t.requires_grad else _gather_padded(t.detach(), lengths)
        for t in tensors
    )


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over the ranks (in one flat all-reduce): for parameters DDP
    does not own (a loss's proxies), whose gradients every rank computed from the same global batch."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_parameters(modules: Iterable[nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank (modules DDP does not own: same start everywhere)."""
    if not active():
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Distributed",
    "active",
    "average_gradients",
    "broadcast_parameters",
    "from_environment",
    "gather_rows",
    "row_counts",
    "setup",
    "shutdown",
]
