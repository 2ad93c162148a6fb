"""What a search backend is (:class:`SearchBackend`), what it returns (:class:`Neighbours`), and the
registry of backends: ``build(name, **options)`` and ``available()``.

Every backend finds, for each query row, the ``k`` best gallery rows under a
:class:`~dmlkit.distances.Distance` (ranked by its ``index_metric`` on :meth:`~dmlkit.distances.Distance.
prepare`-d rows), skipping the pairs an :class:`~dmlkit.search.exclusion.Exclusion` forbids, and counts R
(relevant, retrievable items per query) when given labels. What differs is declared on the class:

- ``exact``: whether the top-k is the exact one (``torch``, ``faiss-flat``) or approximate (``faiss-ivf``,
  ``faiss-hnsw``);
- ``full_ranking``: whether it can place the first relevant item in the *whole* ranking
  (``first_relevant``, the metric ``mrr``), not only in the top-k.

A backend's options are its constructor's keyword arguments, checked by name (``build("faiss-ivf",
nprob=3)`` raises, suggesting ``nprobe``); defaults stand beside each in its signature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import torch

from dmlkit.distances import Distance
from dmlkit.errors import ConfigError
from dmlkit.registry import Registry
from dmlkit.search.exclusion import Exclusion


@dataclass
class SearchInputs:
    """Checked, encoded inputs of a search (:func:`dmlkit.search.prepare` makes them)."""

    query: torch.Tensor
    gallery: torch.Tensor
    query_ids: torch.Tensor
    gallery_ids: torch.Tensor
    exclusion: Exclusion
    leave_one_out: bool
    query_labels: torch.Tensor | None = None
    gallery_labels: torch.Tensor | None = None
    label_values: list[str] | None = None
    id_values: list[str] | None = None

    def take(self, start: int, end: int) -> SearchInputs:
        """The same search for the queries ``start:end`` only (against the whole gallery)."""
        return replace(
            self,
            query=self.query[start:end],
            query_ids=self.query_ids[start:end],
            query_labels=None if self.query_labels is None else self.query_labels[start:end],
            exclusion=self.exclusion.take(start, end),
        )


@dataclass(frozen=True)
class SearchRequest:
    """What to find: the top ``k`` under ``distance`` (a searchable one); with ``first_relevant``, each
    query's first relevant item in the whole ranking; ``chunk_size`` queries per block (torch); on
    ``device`` (None: the query's)."""

    k: int
    distance: Distance
    first_relevant: bool = False
    chunk_size: int | None = None
    device: torch.device | None = None


@dataclass
class Neighbours:
    """What a backend returns: the top-k of every query and, given labels, R and the first relevant rank."""

    distances: torch.Tensor  # [nq, k] in the distance's own units, best first; distance.worst when empty
    indices: torch.Tensor  # [nq, k] int64 gallery positions, -1 for empty slots
    num_relevant: torch.Tensor | None  # [nq] int64: non-excluded gallery items with the query's label
    first_relevant_rank: torch.Tensor | None  # [nq] int64, 1-based rank of the best relevant item; 0 if none


class SearchBackend(Protocol):
    """A k-nearest-neighbour search (see the module docstring)."""

    #: Registry name.
    name: ClassVar[str]
    #: True when the top-k is exact (ties by gallery index for ``torch``).
    exact: ClassVar[bool]
    #: True when ``first_relevant`` (the rank of the first relevant item in the full ranking) is supported.
    full_ranking: ClassVar[bool]

    def search(self, inputs: SearchInputs, request: SearchRequest) -> Neighbours:
        """The top ``request.k`` gallery rows of every query row of ``inputs`` (R too, given labels)."""
        ...


REGISTRY: Registry[SearchBackend] = Registry("search backend")


def build(name: str, /, **options: Any) -> SearchBackend:
    """The backend ``name`` with ``options``; unknown names or options raise with the closest valid one,
    and so does a faiss backend when faiss is not installed."""
    if options and not REGISTRY.parameters(name):
        raise ConfigError(f"backend '{name}' takes no backend_options, got {sorted(options)}")
    return REGISTRY.build(name, **options)


def available() -> list[str]:
    """Registered backend names."""
    return REGISTRY.available()


def check_full_ranking(name: str) -> None:
    """Raise ``ConfigError`` unless backend ``name`` can rank the whole gallery (needed by ``mrr``)."""
    if not REGISTRY.get(name).full_ranking:  # type: ignore[attr-defined]
        raise ConfigError(
            f"metric 'mrr' ranks the whole gallery, which backend '{name}' does not do; use 'mrr@K' "
            "(reciprocal rank within the top K) or backend 'torch'"
        )


def positive_int(value: Any, name: str, none_ok: bool = True) -> None:
    """Raise ``ConfigError`` unless ``value`` is a positive integer (or None when ``none_ok``)."""
    if value is None and none_ok:
        return
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {value!r}")
