"""``RetrievalResults``: the one object passed from a search to the metrics, the reports and the pictures.

A search (:func:`dmlkit.search.search`) fills the neighbours, their distances, the labels and ids and R;
its ``metrics`` and ``per_class`` are empty until :func:`dmlkit.metrics.compute` fills them (in a copy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dmlkit.distances import Distance
from dmlkit.errors import UnknownNameError, unknown_name_message

Label = int | str


def strict_json(value: Any, indent: int | None = 2) -> str:
    """``value`` as strict JSON: non-finite floats (NaN metrics, ±inf empty slots) become null."""

    def clean(item: Any) -> Any:
        if isinstance(item, float):
            return item if math.isfinite(item) else None
        if isinstance(item, dict):
            return {str(k): clean(v) for k, v in item.items()}
        if isinstance(item, list):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value), indent=indent, allow_nan=False)


def metric_table(
    values: dict[str, float], counts: list[tuple[str, int]], title: str | None = None, digits: int = 4
) -> str:
    """Plain-text table of metric → value (``digits`` decimals, ``nan`` kept), then the ``counts`` rows,
    columns aligned::

        metric    value
        --------  ------
        recall@1  0.8125
    """
    rows = [(name, "nan" if math.isnan(v) else f"{v:.{digits}f}") for name, v in values.items()]
    rows += [(name, str(count)) for name, count in counts]
    w0 = max(len("metric"), *(len(r[0]) for r in rows))
    w1 = max(len("value"), *(len(r[1]) for r in rows))
    lines = [] if title is None else [title]
    lines += [f"{'metric':<{w0}}  {'value':>{w1}}", f"{'-' * w0}  {'-' * w1}"]
    lines += [f"{name:<{w0}}  {value:>{w1}}" for name, value in rows]
    return "\n".join(lines)


@dataclass(eq=False)
class RetrievalResults:
    """Neighbours, labels and (once computed) metric values of one search; tensors on the CPU.

    - ``topk_indices`` (int64, nq × k): gallery positions, best first; ``-1`` marks an empty slot (fewer
      than k retrievable gallery items).
    - ``topk_distances`` (nq × k): in the units of ``distance``: similarities (descending) for
      ``cosine``/``dot``, distances (ascending) for ``euclidean``/``squared_euclidean``; ``distance.worst``
      (``∓inf``) in empty slots.
    - ``distance``: the :class:`~dmlkit.distances.Distance` searched with (equal to its name, ``"cosine"``).
    - ``query_ids``/``gallery_ids`` (int64): id codes (positions when not given); ``id_values`` is the
      sorted vocabulary of string ids, ``None`` otherwise.
    - ``query_labels``/``gallery_labels`` (int64, or None for a search without labels): label codes.
      Integer labels are their own codes; string labels index ``label_values`` (like ``id_values``).
    - ``num_relevant`` (int64, nq; with labels): R, the number of retrievable gallery items sharing the
      query's label. ``first_relevant_rank`` (int64, nq; only when the search was asked for it): 1-based
      rank of the first relevant item in the full ranking, 0 when R = 0.
    - ``k``, ``leave_one_out`` (the gallery is the query set, each query's own row excluded), ``backend``
      (``torch``, ``faiss-flat``, ``faiss-ivf``, ``faiss-hnsw``; the last two approximate) and ``device``
      (where the search ran; metrics are computed there): how the search ran.
    - ``query_embeddings``: the searched query rows (a reference, not a copy), for the clustering and
      embedding-space metrics.
    - ``metrics``: metric name → value (mean over queries with R > 0 for retrieval metrics); ``per_class``:
      retrieval metric name → {label → mean over that class's queries with R > 0}, keyed by original
      labels; ``cluster_assignments``: the k-means clusters of ``nmi``/``ami``/``f1``. Empty (None) after a
      search, filled by :func:`dmlkit.metrics.compute`.
    """

    topk_indices: torch.Tensor
    topk_distances: torch.Tensor
    distance: Distance
    query_ids: torch.Tensor
    gallery_ids: torch.Tensor
    query_labels: torch.Tensor | None = None
    gallery_labels: torch.Tensor | None = None
    num_relevant: torch.Tensor | None = None
    first_relevant_rank: torch.Tensor | None = None
    k: int = 0
    leave_one_out: bool = False
    label_values: list[str] | None = None
    id_values: list[str] | None = None
    backend: str = "torch"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    query_embeddings: torch.Tensor | None = field(default=None, repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[Label, float]] = field(default_factory=dict)
    cluster_assignments: torch.Tensor | None = None

    @property
    def num_queries(self) -> int:
        """Every query, with or without a relevant item."""
        return len(self.topk_indices)

    @property
    def num_queries_without_relevant(self) -> int:
        """Queries with R = 0, left out of every retrieval metric's average (0 without labels)."""
        return 0 if self.num_relevant is None else int((self.num_relevant == 0).sum())

    def __getitem__(self, metric: str) -> float:
        try:
            return self.metrics[metric]
        except KeyError:
            raise UnknownNameError(
                unknown_name_message("metric in these results", metric, self.metrics or ["(none)"])
            ) from None

    def __contains__(self, metric: object) -> bool:
        return metric in self.metrics

    def label_of(self, code: int) -> Label:
        """The original label of an int64 label ``code``."""
        return self.label_values[code] if self.label_values is not None else int(code)

    def id_of(self, code: int) -> Label:
        """The original id of an int64 id ``code``."""
        return self.id_values[code] if self.id_values is not None else int(code)

    def query_label_values(self) -> list[Label]:
        """Original query labels (strings when the labels were strings); empty without labels."""
        return [] if self.query_labels is None else [self.label_of(c) for c in self.query_labels.tolist()]

    def gallery_label_values(self) -> list[Label]:
        """Original gallery labels (strings when the labels were strings); empty without labels."""
        return [] if self.gallery_labels is None else [self.label_of(c) for c in self.gallery_labels.tolist()]

    def to_dict(self, neighbors: bool = False) -> dict[str, Any]:
        """Summary as plain Python values; ``neighbors=True`` adds top-k indices/distances, labels, ids."""
        out: dict[str, Any] = {
            "distance": str(self.distance),
            "backend": self.backend,
            "k": self.k,
            "leave_one_out": self.leave_one_out,
            "num_queries": self.num_queries,
            "num_queries_without_relevant": self.num_queries_without_relevant,
            "metrics": dict(self.metrics),
            "per_class": {m: dict(v) for m, v in self.per_class.items()},
        }
        if neighbors:
            out |= {
                "topk_indices": self.topk_indices.tolist(),
                "topk_distances": self.topk_distances.tolist(),
                "query_labels": self.query_label_values(),
                "gallery_labels": self.gallery_label_values(),
                "query_ids": [self.id_of(i) for i in self.query_ids.tolist()],
                "gallery_ids": [self.id_of(i) for i in self.gallery_ids.tolist()],
            }
        return out

    def select_queries(self, rows: torch.Tensor) -> RetrievalResults:
        """The results of the queries ``rows`` (indices or a boolean mask) against the same gallery, their
        metrics empty (:func:`dmlkit.metrics.compute` fills them): e.g. the queries of one category."""

        def pick(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[rows]

        return replace(
            self,
            topk_indices=self.topk_indices[rows],
            topk_distances=self.topk_distances[rows],
            query_ids=self.query_ids[rows],
            query_labels=pick(self.query_labels),
            num_relevant=pick(self.num_relevant),
            first_relevant_rank=pick(self.first_relevant_rank),
            query_embeddings=pick(self.query_embeddings),
            metrics={},
            per_class={},
            cluster_assignments=None,
        )

    def to_json(self, neighbors: bool = False, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON: non-finite numbers (NaN metrics, ±inf empty slots) become null."""
        return strict_json(self.to_dict(neighbors=neighbors), indent)

    def table(self, title: str | None = None, digits: int = 4) -> str:
        """Plain-text table of metric → value, then the query counts, columns aligned."""
        counts = [
            ("queries", self.num_queries),
            ("queries without relevant", self.num_queries_without_relevant),
        ]
        return metric_table(self.metrics, counts, title, digits)

    def __str__(self) -> str:
        return self.table()
