"""Embedding whole datasets with a model, and evaluating a model on a dataset."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist_lib
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from dmlkit import metrics as metrics_lib
from dmlkit.data.base import LEAVE_ONE_OUT, ImageDataset, ItemAnnotations
from dmlkit.distances import DistanceLike
from dmlkit.distributed import Distributed, gather_rows
from dmlkit.errors import ConfigError, DataError, DmlkitError

#: What ``eval``/``embed``/``search`` read of a checkpoint besides the weights: the model's rebuild
#: recipe, the evaluation preprocessing and the training configuration.
INFERENCE_ENTRIES: tuple[str, ...] = ("model", "model_config", "data_spec", "config")


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (no training state needed) and load its weights.

    ``path`` is a checkpoint file or a run folder (its ``best.pt``, :func:`dmlkit.train.checkpoint.
    checkpoint_file`). A file that is no dmlkit checkpoint, lacks an entry of :data:`INFERENCE_ENTRIES` or
    whose weights do not fit its own model raises ``DataError`` naming it.
    """
    from dmlkit import models  # the model registries import torchvision/timm: only when a model loads
    from dmlkit.train import checkpoint as ckpt  # dmlkit.train imports this module

    file = ckpt.checkpoint_file(path)
    checkpoint = ckpt.load(file, map_location="cpu")
    missing = [key for key in INFERENCE_ENTRIES if key not in checkpoint]
    if missing:
        raise DataError(f"{file} is not a complete dmlkit checkpoint (no {', '.join(map(repr, missing))})")
    if not isinstance(checkpoint["model_config"], dict) or not isinstance(checkpoint["data_spec"], dict):
        raise DataError(f"{file}: 'model_config' and 'data_spec' must be mappings; the file is damaged")
    model_config = dict(checkpoint["model_config"])
    model_config["pretrained_weights"] = None  # the checkpoint's own weights replace them
    try:
        model = models.build_model(**model_config)
    except (DmlkitError, TypeError) as exc:
        raise DataError(f"{file}: cannot rebuild its model from 'model_config': {exc}") from exc
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{file}: its weights do not fit its own model ({first})") from exc
    return model.to(device).eval(), checkpoint


def resolve_device(name: str) -> torch.device:
    """``auto`` → first CUDA device if available, else CPU; otherwise the named device (validated)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device '{name}': {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def autocast(device: torch.device, amp: str) -> Any:
    """Autocast context for ``amp`` in ('none', 'bf16', 'fp16')."""
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp 'fp16' needs a CUDA device; use 'bf16' on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def query_gallery_positions(dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions of a split's queries and of its gallery under its protocol (``None``: leave-one-out, the
    gallery is the queries)."""
    flags = dataset.annotations
    if flags.is_query is None or flags.is_gallery is None:
        return np.arange(len(dataset)), None
    return np.flatnonzero(flags.is_query), np.flatnonzero(flags.is_gallery)


@torch.no_grad()
def compute_embeddings(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: str = "none",
    num_workers: int = 0,
    progress: bool = False,
    description: str = "embed",
    distributed: Distributed | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32, on CPU) and int64 labels of every item of ``dataset``, in order.

    The dataset yields ``(image, label, index)``; the model is put in eval mode and restored after. With
    several processes (``distributed``), each rank embeds a contiguous part of the dataset and every rank
    receives all of them (gathered as tensors, in dataset order).
    """
    device = torch.device(device)
    if distributed is not None and distributed.enabled:
        part = np.array_split(np.arange(len(dataset)), distributed.world_size)[distributed.rank]  # type: ignore[arg-type]
        mine, labels = compute_embeddings(
            model, Subset(dataset, part.tolist()), batch_size=batch_size, device=device, amp=amp,
            num_workers=num_workers, progress=progress, description=description,
        )  # fmt: skip
        width = torch.tensor([mine.shape[1] if len(mine) else 0], device=device)
        dist_lib.all_reduce(width, op=dist_lib.ReduceOp.MAX)  # a rank without items has no width
        mine = mine.reshape(len(mine), int(width.item())).to(device)
        gathered, labels = gather_rows(mine, labels.to(device))
        return gathered.cpu(), labels.cpu()
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    # An iterator, not the loader: tqdm.auto calls iter() on what it is given and iterates it again, which
    # would start the DataLoader's workers twice.
    bar = tqdm(
        iter(loader), total=len(loader), desc=description, disable=not progress, leave=False, unit="batch"
    )
    for images, batch_labels, _ in bar:
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        chunks.append(out.float().cpu())
        labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    model.train(was_training)
    if not chunks:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(chunks), torch.cat(labels)


def evaluate_embeddings(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    annotations: ItemAnnotations | None,
    metric_names: Sequence[str],
    *,
    k: int | None = None,
    seed: int = 0,
    distance: DistanceLike = "cosine",
    backend: str = "torch",
    steps: Sequence[Any] | None = None,
    fit_embeddings: torch.Tensor | None = None,
) -> metrics_lib.RetrievalResults:
    """Retrieval metrics of a split's embeddings under its protocol (``annotations``, from the dataset):

    - leave-one-out (no query/gallery flags): every item is a query against all the others;
    - query/gallery: the items flagged ``is_query`` against those flagged ``is_gallery``; an item that is
      both never retrieves itself. ``results.query_ids`` / ``gallery_ids`` are the items' positions in the
      split.

    Items of one ``sequence`` never retrieve each other, under either protocol. ``steps``: re-ranking and
    post-processing steps (:mod:`dmlkit.search.rerank`), unfitted ones fitted on ``fit_embeddings``."""
    evaluate: Any = metrics_lib.evaluate
    if steps:
        from dmlkit.search import rerank

        evaluate = functools.partial(rerank.evaluate, steps=steps, fit_embeddings=fit_embeddings)
    sequences = None if annotations is None else annotations.sequences
    groups = None if sequences is None else torch.as_tensor(sequences)
    names = tuple(metric_names)
    if annotations is None or annotations.protocol == LEAVE_ONE_OUT:
        return evaluate(
            embeddings,
            labels,
            metrics=names,
            k=k,
            seed=seed,
            distance=distance,
            backend=backend,
            ignore=groups,
        )
    assert annotations.is_query is not None and annotations.is_gallery is not None
    queries = torch.from_numpy(np.flatnonzero(annotations.is_query))
    gallery = torch.from_numpy(np.flatnonzero(annotations.is_gallery))
    if not len(queries) or not len(gallery):
        raise ConfigError(
            f"a query/gallery split needs both: {len(queries)} queries, {len(gallery)} gallery items"
        )
    return evaluate(
        embeddings[queries],
        labels[queries],
        embeddings[gallery],
        labels[gallery],
        metrics=names,
        k=k,
        seed=seed,
        distance=distance,
        backend=backend,
        query_ids=queries,
        gallery_ids=gallery,
        ignore=None if groups is None else (groups[queries], groups[gallery]),
    )


def evaluate_model(
    model: nn.Module,
    dataset: ImageDataset,
    metric_names: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: str = "none",
    num_workers: int = 0,
    progress: bool = False,
    seed: int = 0,
    description: str = "eval",
    distance: DistanceLike = "cosine",
    backend: str = "torch",
    distributed: Distributed | None = None,
) -> metrics_lib.RetrievalResults:
    """Retrieval metrics of ``model`` on ``dataset`` under the dataset's protocol (leave-one-out, or its
    query/gallery flags: :func:`evaluate_embeddings`), with ``distance`` and ``backend`` as in
    :func:`dmlkit.metrics.evaluate`. With several processes each embeds its part of the dataset, and every
    rank computes the metrics on all the embeddings (so every rank selects the same ``best.pt``)."""
    embeddings, labels = compute_embeddings(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        amp=amp,
        num_workers=num_workers,
        progress=progress,
        description=description,
        distributed=distributed,
    )
    return evaluate_embeddings(
        embeddings,
        labels,
        dataset.annotations,
        metric_names,
        seed=seed,
        distance=distance,
        backend=backend,
    )
