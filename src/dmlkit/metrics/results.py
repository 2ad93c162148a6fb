"""``RetrievalResults``: the one object passed from search to metrics to reports."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dmlkit.errors import UnknownNameError, unknown_name_message

Label = int | str


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(eq=False)
class RetrievalResults:
    """Neighbours, labels and metric values of one evaluation (all tensors on the CPU).

    - ``topk_indices`` (int64, nq × k): gallery positions, best first; ``-1`` marks an empty slot (fewer
      than k retrievable gallery items).
    - ``topk_distances`` (nq × k): in the units of ``distance``: similarities (descending) for
      ``cosine``/``dot``, distances (ascending) for ``euclidean``/``squared_euclidean``; ``∓inf`` in
      empty slots.
    - ``query_labels``/``gallery_labels`` (int64): label codes. Integer labels are their own codes; string
      labels are indices into ``label_values`` (the sorted vocabulary), which is ``None`` otherwise.
    - ``query_ids``/``gallery_ids`` (int64): ids codes (positions when not given); ``id_values`` like
      ``label_values``.
    - ``num_relevant`` (int64, nq): R, the number of retrievable gallery items sharing the query's label.
    - ``metrics``: metric name → value (mean over queries with R > 0 for retrieval metrics).
    - ``per_class``: retrieval metric name → {label → mean over that class's queries with R > 0}; keys
      are original labels (strings if the labels were strings); classes without such queries are absent.
    - ``num_queries``: all queries; ``num_queries_without_relevant``: those with R = 0, excluded from
      every retrieval metric's average.
    - ``backend``: the search that produced the neighbours (``torch``, ``faiss-flat``, ``faiss-ivf``,
      ``faiss-hnsw``; the last two are approximate).
    """

    topk_indices: torch.Tensor
    topk_distances: torch.Tensor
    query_labels: torch.Tensor
    gallery_labels: torch.Tensor
    query_ids: torch.Tensor
    gallery_ids: torch.Tensor
    distance: str
    metrics: dict[str, float]
    per_class: dict[str, dict[Label, float]]
    num_queries: int
    num_queries_without_relevant: int
    num_relevant: torch.Tensor | None = None
    k: int = 0
    leave_one_out: bool = False
    label_values: list[str] | None = None
    id_values: list[str] | None = None
    cluster_assignments: torch.Tensor | None = None
    backend: str = "torch"
    extra: dict[str, Any] = field(default_factory=dict)

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

    def query_label_values(self) -> list[Label]:
        """Original query labels (strings when the labels were strings)."""
        return [self.label_of(c) for c in self.query_labels.tolist()]

    def gallery_label_values(self) -> list[Label]:
        """Original gallery labels (strings when the labels were strings)."""
        return [self.label_of(c) for c in self.gallery_labels.tolist()]

    def to_dict(self, neighbors: bool = False) -> dict[str, Any]:
        """Summary as plain Python values; ``neighbors=True`` adds top-k indices/distances, labels, ids."""
        out: dict[str, Any] = {
            "distance": self.distance,
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
                "query_ids": self._id_values(self.query_ids),
                "gallery_ids": self._id_values(self.gallery_ids),
            }
        return out

    def _id_values(self, ids: torch.Tensor) -> list[Label]:
        return [self.id_values[i] if self.id_values is not None else int(i) for i in ids.tolist()]

    def to_json(self, neighbors: bool = False, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON: non-finite numbers (NaN metrics, ±inf empty slots) become null."""

        def clean(value: Any) -> Any:
            if isinstance(value, float):
                return _finite_or_none(value)
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return json.dumps(clean(self.to_dict(neighbors=neighbors)), indent=indent, allow_nan=False)

    def table(self, title: str | None = None, digits: int = 4) -> str:
        """Plain-text table of metric → value, columns aligned, e.g.::

        metric    value
        --------  ------
        recall@1  0.8125
        """
        rows = [(name, "nan" if math.isnan(v) else f"{v:.{digits}f}") for name, v in self.metrics.items()]
        rows.append(("queries", str(self.num_queries)))
        rows.append(("queries without relevant", str(self.num_queries_without_relevant)))
        header = ("metric", "value")
        w0 = max(len(header[0]), *(len(r[0]) for r in rows))
        w1 = max(len(header[1]), *(len(r[1]) for r in rows))
        lines = [] if title is None else [title]
        lines.append(f"{header[0]:<{w0}}  {header[1]:>{w1}}")
        lines.append(f"{'-' * w0}  {'-' * w1}")
        lines += [f"{name:<{w0}}  {value:>{w1}}" for name, value in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
