"""Which retrieved items are relevant: by default those with the query's label; with a ``label_comparison``
function (pytorch-metric-learning's ``label_comparison_fn``), those for which
``label_comparison(query_labels, gallery_labels)`` is True — multi-label relevance (labels are rows of tags,
relevant when they share one) or hierarchical relevance (same super-class).

:class:`Relevance` holds the function, the labels it compares and, per query, R (retrievable relevant gallery
items, exclusions applied) and N (relevant gallery items before exclusions), counted once, in blocks, over
every (query, gallery) pair. :class:`EvaluationResults` is the :class:`~dmlkit.search.RetrievalResults` that
:func:`dmlkit.metrics.evaluate` returns: the search, plus what its metrics were computed with beyond it (a
custom relevance, the searches of the other distance of ``c_``/``e_`` metric names), so that
:func:`~dmlkit.metrics.compute`, :func:`~dmlkit.metrics.per_group` and the pictures read the same
relevance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeAlias

import numpy as np
import torch

from dmlkit.errors import ConfigError, DataError
from dmlkit.search.encoding import ArrayLike
from dmlkit.search.exclusion import Exclusion
from dmlkit.search.results import RetrievalResults

#: ``label_comparison(query_labels, gallery_labels) -> bool``, broadcasting like ``==``: called with
#: ``query_labels[:, None]`` (shape ``[b, 1]``, or ``[b, 1, L]`` for rows of L tags) against the gallery
#: labels of a block (``[b, k]`` / ``[1, n_gallery]``, or ``[..., L]``); returns a boolean ``[b, k]`` /
#: ``[b, n_gallery]`` array.
LabelComparison: TypeAlias = Callable[[Any, Any], Any]
#: Labels as a comparison sees them: an integer or boolean tensor (1-D, or 2-D with one row per item) or a
#: 1-D numpy array of strings.
LabelValues: TypeAlias = torch.Tensor | np.ndarray

#: Label comparisons (× the width of a label row) formed per block when R and N are counted.
COUNT_BLOCK_ELEMENTS = 2**22


def label_values(labels: ArrayLike, name: str) -> LabelValues:
    """``labels`` as ``label_comparison`` sees them: integer/boolean values as a CPU tensor (1-D, or 2-D with
    one row of tags per item), strings as a 1-D numpy array of ``str``. Floats are refused (labels are never
    cast from float), as are other shapes."""
    if isinstance(labels, torch.Tensor):
        values = labels.detach().cpu()
    else:
        array = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels))
        if array.dtype.kind == "U" or (
            array.dtype.kind == "O" and array.size and all(isinstance(v, str) for v in array.ravel())
        ):
            if array.ndim != 1:
                raise DataError(f"{name}: string labels must be 1-D, got shape {array.shape}")
            return array.astype(str)
        if array.dtype.kind not in "iub":
            raise DataError(f"{name} must be integers, booleans or strings, got dtype {array.dtype}")
        values = torch.from_numpy(
            np.ascontiguousarray(array).astype(np.int64 if array.dtype.kind == "u" else array.dtype)
        )
    if values.is_floating_point() or values.is_complex():
        raise DataError(f"{name} must be integers, booleans or strings, got dtype {values.dtype}")
    if values.ndim not in (1, 2):
        raise DataError(f"{name} must be 1-D, or 2-D with one row per item, got shape {tuple(values.shape)}")
    return values


def class_codes(
    query: LabelValues, gallery: LabelValues | None
) -> tuple[ArrayLike, ArrayLike | None, list[str] | None]:
    """What the search and the per-class means see as each item's class: 1-D labels as they are; rows of
    tags coded by their distinct rows (sorted), with the rows written out (``"(0, 1, 1)"``) as label names.
    ``gallery`` None: leave-one-out (the query labels)."""
    if query.ndim == 1:
        return query, gallery, None
    assert isinstance(query, torch.Tensor)
    if gallery is not None and (gallery.ndim != 2 or gallery.shape[1] != query.shape[1]):
        raise DataError(
            f"query labels are rows of {query.shape[1]} values but gallery labels have shape "
            f"{tuple(gallery.shape)}"
        )
    rows = query if gallery is None else torch.cat([query, torch.as_tensor(gallery)])
    distinct, codes = torch.unique(rows, dim=0, return_inverse=True)
    names = [str(tuple(row)) for row in distinct.tolist()]
    return codes[: len(query)], None if gallery is None else codes[len(query) :], names


def _take(values: LabelValues, index: torch.Tensor) -> LabelValues:
    if isinstance(values, np.ndarray):
        return values[index.cpu().numpy()]
    return values[index.cpu()]


def _compare(fn: LabelComparison, a: LabelValues, b: LabelValues, shape: tuple[int, int]) -> torch.Tensor:
    """``fn(a, b)`` as a CPU bool tensor of ``shape``; anything else raises naming what came back."""
    out = fn(a, b)
    found = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    if found.dtype != torch.bool:
        raise ConfigError(f"label_comparison must return booleans, got dtype {found.dtype}")
    if tuple(found.shape) != shape:
        raise ConfigError(
            f"label_comparison must return one boolean per (query, gallery item) pair, shape {shape}; got "
            f"{tuple(found.shape)} (it is called with query_labels[:, None] and a block of gallery labels)"
        )
    return found.cpu()


@dataclass(eq=False)
class Relevance:
    """Relevance by ``fn(query_labels, gallery_labels)``: the labels it compares and, per query, R and N.

    ``num_relevant`` (int64, nq): R, the retrievable gallery items the query finds relevant (its own row and
    other excluded pairs left out); ``class_size`` (int64, nq): N, the gallery items it finds relevant
    before exclusions (Roth et al.'s class frequency, the denominator of ``map_1000``/``map_lim``/``map_c``).
    """

    fn: LabelComparison
    query_labels: LabelValues
    gallery_labels: LabelValues
    num_relevant: torch.Tensor
    class_size: torch.Tensor

    @classmethod
    def count(
        cls, fn: LabelComparison, query_labels: LabelValues, gallery_labels: LabelValues, exclusion: Exclusion
    ) -> Relevance:
        """Compare every (query, gallery) pair in blocks of queries (≤ :data:`COUNT_BLOCK_ELEMENTS`
        comparisons per block) and count R and N; memory O(block), time O(n_query · n_gallery)."""
        if not callable(fn):
            raise ConfigError(f"label_comparison must be a function, got {type(fn).__name__}")
        n_query, n_gallery = len(query_labels), len(gallery_labels)
        width = 1 if query_labels.ndim == 1 else int(query_labels.shape[1])
        rows = max(1, COUNT_BLOCK_ELEMENTS // max(1, n_gallery * width))
        relevant = torch.zeros(n_query, dtype=torch.int64)
        total = torch.zeros(n_query, dtype=torch.int64)
        cpu = torch.device("cpu")
        exclusion = exclusion.to(cpu)
        gallery = gallery_labels[None]
        for start in range(0, n_query, rows):
            end = min(start + rows, n_query)
            same = _compare(fn, query_labels[start:end][:, None], gallery, (end - start, n_gallery))
            total[start:end] = same.sum(1)
            excluded = exclusion.mask(torch.arange(start, end), 0, n_gallery, cpu)
            relevant[start:end] = total[start:end] if excluded is None else (same & ~excluded).sum(1)
        return cls(fn, query_labels, gallery_labels, relevant, total)

    def topk(self, rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Boolean ``[len(rows), k]``: whether each retrieved gallery item (``indices``, ``-1`` for an
        empty slot) is relevant to query ``rows[i]`` (positions in this object's queries); on the device of
        ``indices``."""
        shape = (len(rows), indices.shape[1])
        if shape[0] == 0 or shape[1] == 0:
            return torch.zeros(shape, dtype=torch.bool, device=indices.device)
        query = _take(self.query_labels, rows)[:, None]
        gallery = _take(self.gallery_labels, indices.clamp_min(0).reshape(-1))
        gallery = gallery.reshape(shape + tuple(gallery.shape[1:]))
        same = _compare(self.fn, query, gallery, shape).to(indices.device)
        return same & (indices >= 0)

    def select(self, rows: torch.Tensor) -> Relevance:
        """The relevance of the queries ``rows`` (indices or a boolean mask) alone."""
        return replace(
            self,
            query_labels=_take(self.query_labels, rows),
            num_relevant=self.num_relevant[rows],
            class_size=self.class_size[rows],
        )


@dataclass(eq=False)
class EvaluationResults(RetrievalResults):
    """The :class:`~dmlkit.search.RetrievalResults` of :func:`dmlkit.metrics.evaluate`: its search (the
    ``distance`` asked), plus

    - ``variants``: the search of each other distance a ``c_`` (``"cosine"``) or ``e_`` (``"euclidean"``)
      metric name ranks by (one search per distance, shared by every metric of it);
    - ``relevance``: the :class:`Relevance` of a ``label_comparison`` (None: same label).

    :func:`~dmlkit.metrics.compute` and :func:`~dmlkit.metrics.per_group` read both, and
    :meth:`select_queries` keeps them aligned with the queries kept.
    """

    variants: dict[str, RetrievalResults] = field(default_factory=dict, repr=False)
    relevance: Relevance | None = field(default=None, repr=False)

    @classmethod
    def wrap(
        cls,
        results: RetrievalResults,
        variants: dict[str, RetrievalResults] | None = None,
        relevance: Relevance | None = None,
    ) -> EvaluationResults:
        """``results`` (tensors shared) with ``variants`` and ``relevance``; R taken from ``relevance``."""
        values = {f.name: getattr(results, f.name) for f in fields(RetrievalResults)}
        if relevance is not None:
            values["num_relevant"] = relevance.num_relevant
            values["first_relevant_rank"] = None  # ranked by label equality, not by the comparison
        return cls(**values, variants=dict(variants or {}), relevance=relevance)

    def select_queries(self, rows: torch.Tensor) -> EvaluationResults:
        selected = super().select_queries(rows)
        assert isinstance(selected, EvaluationResults)
        return replace(
            selected,
            variants={name: found.select_queries(rows) for name, found in self.variants.items()},
            relevance=None if self.relevance is None else self.relevance.select(rows),
        )


def relevant_topk(results: RetrievalResults) -> torch.Tensor:
    """Boolean ``n_query × k``: the i-th retrieved item exists (index ≥ 0) and is relevant — has the query's
    label, or passes the results' ``label_comparison`` (:class:`EvaluationResults`)."""
    indices = results.topk_indices
    custom = getattr(results, "relevance", None)
    if custom is not None:
        return custom.topk(torch.arange(len(indices)), indices)
    if results.query_labels is None or results.gallery_labels is None:
        raise ConfigError("relevance needs labels: search with query_labels (and gallery_labels)")
    labels = results.gallery_labels[indices.clamp_min(0)]
    return (indices >= 0) & (labels == results.query_labels[:, None])
