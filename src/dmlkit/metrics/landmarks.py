"""Landmark-retrieval protocols: revisited Oxford/Paris (Radenović et al., CVPR 2018) and the Google
Landmarks v2 mAP@100 (Weyand et al., CVPR 2020).

Both take either a **ranking** (int array ``n_query × L``: gallery indices, best first, ``-1`` for an
empty slot; ``L`` may be shorter than the gallery; or the :class:`~dmlkit.search.RetrievalResults` of a
search, whose ``topk_indices`` are that ranking) or **embeddings** (``query``, ``gallery``, searched with
:func:`dmlkit.search.search`, ties by gallery index) plus per-query ground-truth lists of gallery indices.

**Revisited Oxford/Paris** (:func:`revisited_map`). ``gnd`` is revisitop's structure: one mapping per
query with the lists ``easy``, ``hard`` and ``junk`` (a missing key is an empty list). Per protocol:

=========  =====================  =====================
protocol   positives              ignored ("junk")
=========  =====================  =====================
Easy       easy                   junk + hard
Medium     easy + hard            junk
Hard       hard                   junk + easy
=========  =====================  =====================

Ignored items are removed from the ranking (the items behind them move up). With p_0 < p_1 < ... the
0-based positions of the positives in that ranking and n⁺ the number of positives (all of them, ranked
or not), revisitop's ``compute_ap`` accumulates trapezoids of the precision–recall curve:

    AP = (1/n⁺) Σ_j ½ · (P₀(j) + P₁(j)),  P₀(j) = j / p_j (1 if p_j = 0),  P₁(j) = (j + 1) / (p_j + 1)

(``ap="step"`` gives the non-interpolated AP = (1/n⁺) Σ_j (j + 1)/(p_j + 1) instead). mP@κ is revisitop's
precision at κ capped at the last positive: with P the 1-based positions, κ' = min(max P, κ) and
mP@κ = |{P ≤ κ'}| / κ'. (If a positive is missing from a truncated ranking, κ' = κ.) Queries without
a positive under a protocol are excluded from its means and counted, as revisitop does (``nempty``).
Values are fractions (revisitop prints percentages).

**GLDv2 mAP@100** (:func:`gldv2_map`): per query with m_q ≥ 1 relevant gallery items,
AP@100 = (1/min(m_q, 100)) Σ_{k≤100} P(k)·rel(k), averaged over those queries; queries with m_q = 0 (the
"non-landmark" queries of the challenge) are excluded and counted. It is ``map@K`` of
:func:`dmlkit.metrics.evaluate` with relevance given by lists instead of labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from dmlkit import search
from dmlkit.distances import DistanceLike
from dmlkit.errors import ConfigError, DataError, UnknownNameError, unknown_name_message
from dmlkit.metrics.retrieval import precision_sum
from dmlkit.search.results import RetrievalResults, metric_table, strict_json

PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)
#: Entries of one block of ranking flags (bool/int64 temporaries are O(block)).
BLOCK_ELEMENTS = 2**22

#: (positive lists, ignored lists) of each protocol of the revisited benchmark.
_PROTOCOL_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


@dataclass(eq=False)
class LandmarkResults:
    """Values of a landmark-retrieval protocol: a score report, not a ranking (the revisited protocol ranks
    the whole gallery in query blocks and keeps none of it, so no :class:`RetrievalResults` holds it).

    - ``metrics``: name → mean over the queries with at least one positive (``"medium/map"``,
      ``"hard/mp@5"``; ``"map@100"`` for GLDv2).
    - ``per_query``: the same names → float64 tensor [n_query], NaN for queries without a positive.
    - ``num_queries``; ``num_queries_without_relevant``: per protocol (``"easy"``...; ``"map@100"``).
    """

    metrics: dict[str, float]
    per_query: dict[str, torch.Tensor]
    num_queries: int
    num_queries_without_relevant: dict[str, int]
    protocol: str

    def __getitem__(self, name: str) -> float:
        try:
            return self.metrics[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message("landmark metric", name, self.metrics)) from None

    def __contains__(self, name: object) -> bool:
        return name in self.metrics

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (per-query values as lists, NaN kept)."""
        return {
            "protocol": self.protocol,
            "num_queries": self.num_queries,
            "num_queries_without_relevant": dict(self.num_queries_without_relevant),
            "metrics": dict(self.metrics),
            "per_query": {name: v.tolist() for name, v in self.per_query.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON (NaN → null)."""
        return strict_json(self.to_dict(), indent)

    def table(self, title: str | None = None, digits: int = 4) -> str:
        """Aligned plain text: metric, value (fractions, not percentages)."""
        without = self.num_queries_without_relevant
        counts = [(f"queries without positive ({p})", c) for p, c in without.items()]
        return metric_table(self.metrics, counts, title, digits)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def _index_list(values: Any, what: str) -> np.ndarray:
    """Sorted unique int64 gallery indices of one ground-truth list (None: empty)."""
    if values is None:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise DataError(f"{what} must hold integer gallery indices, got dtype {array.dtype}")
    if int(array.min()) < 0:
        raise DataError(f"{what} holds a negative gallery index ({int(array.min())})")
    return np.unique(array.astype(np.int64))


def _pair_keys(lists: Sequence[np.ndarray], width: int) -> torch.Tensor:
    """Sorted int64 keys query · width + gallery of every (query, listed gallery index) pair."""
    if not lists:
        return torch.zeros(0, dtype=torch.int64)
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    cols = np.concatenate(lists) if lengths.sum() else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(np.sort(rows * width + cols))


def _uses_ranking(ranking: Any, query: Any, gallery: Any) -> bool:
    """True for a given ranking, False for query/gallery embeddings; neither or both is an error."""
    if ranking is not None:
        if query is not None or gallery is not None:
            raise ConfigError("give either a ranking or query/gallery embeddings, not both")
        return True
    if query is None or gallery is None:
        raise ConfigError("give a ranking, or both query and gallery embeddings")
    return False


def _check_ranking(ranking: Any, n_query: int) -> torch.Tensor:
    if isinstance(ranking, RetrievalResults):
        ranking = ranking.topk_indices
    r = torch.as_tensor(np.asarray(ranking)) if not isinstance(ranking, torch.Tensor) else ranking.detach()
    if r.ndim != 2:
        raise DataError(f"ranking must be 2-D (n_query × L), got shape {tuple(r.shape)}")
    if r.is_floating_point() or r.dtype == torch.bool:
        raise DataError(f"ranking must hold integer gallery indices, got dtype {r.dtype}")
    r = r.to("cpu", torch.int64)
    if len(r) != n_query:
        raise DataError(f"ranking has {len(r)} rows but there are {n_query} queries (ground-truth entries)")
    if r.numel() and int(r.min()) < -1:
        raise DataError("ranking holds an index below -1 (-1 marks an empty slot)")
    if r.shape[1] > 1:
        ordered = r.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            row = int(repeated.any(dim=1).nonzero()[0, 0])
            raise DataError(f"ranking row {row} lists a gallery index twice")
    return r


def _search_blocks(
    query: Any, gallery: Any, distance: DistanceLike, chunk_size: int | None, device: Any
) -> tuple[int, int, Iterator[tuple[int, torch.Tensor]]]:
    """(n_query, n_gallery, generator of (start, ranking block)): the whole gallery ranked exactly by
    :func:`dmlkit.search.run` (ties by index), one block of queries at a time, so that the n_query ×
    n_gallery ranking is never held."""
    search.check_searchable(distance)
    inputs = search.prepare(query, gallery)
    n_query, n_gallery = len(inputs.query), len(inputs.gallery)
    rows = chunk_size or max(1, BLOCK_ELEMENTS // n_gallery)

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, n_query, rows):
            part = inputs.take(start, start + rows)
            ranked = search.run(part, n_gallery, distance=distance, device=device, chunk_size=rows)
            yield start, ranked.topk_indices

    return n_query, n_gallery, blocks()


def _ranking_blocks(ranking: torch.Tensor) -> Any:
    rows = max(1, BLOCK_ELEMENTS // max(ranking.shape[1], 1))
    for start in range(0, len(ranking), rows):
        yield start, ranking[start : start + rows]


# ---------------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# ---------------------------------------------------------------------------------------------------------


def revisited_lists(
    gnd: Sequence[Mapping[str, Any]], protocol: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(positives, ignored) gallery-index arrays per query under ``protocol`` (easy / medium / hard)."""
    if protocol not in _PROTOCOL_SETS:
        raise UnknownNameError(unknown_name_message("revisited protocol", protocol, PROTOCOLS))
    positive_keys, junk_keys = _PROTOCOL_SETS[protocol]
    positives, junk = [], []
    for i, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise DataError(f"gnd[{i}] must be a mapping with 'easy'/'hard'/'junk' lists, not {type(entry)}")
        lists = {key: _index_list(entry.get(key), f"gnd[{i}]['{key}']") for key in ("easy", "hard", "junk")}
        for a, b in (("easy", "hard"), ("easy", "junk"), ("hard", "junk")):
            both = np.intersect1d(lists[a], lists[b])
            if len(both):
                raise DataError(f"gnd[{i}]: gallery index {int(both[0])} is in both '{a}' and '{b}'")
        positives.append(np.unique(np.concatenate([lists[key] for key in positive_keys])))
        junk.append(np.unique(np.concatenate([lists[key] for key in junk_keys])))
    return positives, junk


def _revisited_block(
    start: int,
    ranking: torch.Tensor,
    width: int,
    positive_keys: torch.Tensor,
    junk_keys: torch.Tensor,
    n_positive: torch.Tensor,
    kappas: Sequence[int],
    ap: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """AP and mP@κ of the queries ``start ..`` whose ranking rows are ``ranking``."""
    rows = torch.arange(start, start + len(ranking))
    valid = ranking >= 0
    keys = rows[:, None] * width + ranking.clamp_min(0)
    is_positive = valid & torch.isin(keys, positive_keys)
    kept = valid & ~torch.isin(keys, junk_keys)
    # 0-based position after removing ignored items, and 0-based index among the positives.
    position = kept.cumsum(dim=1) - 1
    before = is_positive.cumsum(dim=1) - 1
    # Clamped so that entries before the first kept item (position −1) stay finite; only positives count.
    p, j = position.clamp_min(0).double(), before.clamp_min(0).double()
    upper = (j + 1) / (p + 1)
    if ap == "trapezoid":
        lower = torch.where(position == 0, torch.ones_like(p), j / p.clamp_min(1))
        term = (lower + upper) / 2
    else:
        term = upper
    npos = n_positive[rows].double()
    average_precision = torch.where(is_positive, term, 0.0).sum(dim=1) / npos.clamp_min(1)

    found = is_positive.sum(dim=1)
    missing = found < n_positive[rows]
    one_based = torch.where(is_positive, position + 1, torch.zeros_like(position))
    last = one_based.max(dim=1).values if one_based.shape[1] else torch.zeros(len(rows), dtype=torch.int64)
    precisions = []
    for kappa in kappas:
        short = missing & (n_positive[rows] > 0) & (kept.sum(dim=1) < kappa)
        if bool(short.any()):
            row = int(rows[short][0])
            raise DataError(
                f"the ranking of query {row} is too short for mP@{kappa}: a positive is missing and fewer "
                f"than {kappa} non-ignored items are ranked"
            )
        cap = torch.where(missing, torch.full_like(last, kappa), last.clamp_max(kappa)).clamp_min(1)
        hits = (is_positive & (one_based <= cap[:, None])).sum(dim=1)
        precisions.append(hits.double() / cap.double())
    return average_precision, precisions


def revisited_map(
    gnd: Sequence[Mapping[str, Any]],
    ranking: Any = None,
    *,
    query: Any = None,
    gallery: Any = None,
    distance: DistanceLike = "cosine",
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    protocols: Sequence[str] = PROTOCOLS,
    ap: Literal["trapezoid", "step"] = "trapezoid",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> LandmarkResults:
    """mAP and mP@κ of the revisited Oxford/Paris protocol (Radenović et al. 2018), per protocol.

    Give either ``ranking`` (``n_query × L`` gallery indices, best first, or a
    :class:`~dmlkit.search.RetrievalResults`) or ``query`` and ``gallery`` embeddings (the whole gallery
    ranked exactly with ``distance`` by the ``torch`` search, in query blocks of ``chunk_size``: the
    n_query × n_gallery ranking is never held). ``gnd[i]`` has the lists ``easy``, ``hard``, ``junk`` of
    query i (revisitop's ``cfg['gnd']``). Metric names: ``"easy/map"``, ``"easy/mp@1"``, ... (fractions).
    See the module docstring.
    """
    if ap not in ("trapezoid", "step"):
        raise UnknownNameError(unknown_name_message("AP rule", str(ap), ("trapezoid", "step")))
    kappas = tuple(kappas)
    if not kappas or any(not isinstance(k, int) or k < 1 for k in kappas):
        raise ConfigError(f"kappas must be positive integers, got {kappas}")
    for protocol in protocols:
        if protocol not in _PROTOCOL_SETS:
            raise UnknownNameError(unknown_name_message("revisited protocol", protocol, PROTOCOLS))
    gnd = list(gnd)
    n_query = len(gnd)
    if n_query == 0:
        raise DataError("gnd is empty: there are no queries")
    lists = {p: revisited_lists(gnd, p) for p in protocols}
    source = _source(ranking, query, gallery, n_query, distance, chunk_size, device)
    width = _key_width(source, lists)

    prepared = {}
    for protocol, (positives, junk) in lists.items():
        prepared[protocol] = (
            _pair_keys(positives, width),
            _pair_keys(junk, width),
            torch.tensor([len(x) for x in positives], dtype=torch.int64),
        )
    ap_parts: dict[str, list[torch.Tensor]] = {p: [] for p in protocols}
    mp_parts: dict[str, list[list[torch.Tensor]]] = {p: [] for p in protocols}
    for start, block in source["blocks"]():
        for protocol, (pos_keys, junk_keys, n_positive) in prepared.items():
            average_precision, precisions = _revisited_block(
                start, block, width, pos_keys, junk_keys, n_positive, kappas, ap
            )
            ap_parts[protocol].append(average_precision)
            mp_parts[protocol].append(precisions)

    metrics: dict[str, float] = {}
    per_query: dict[str, torch.Tensor] = {}
    without: dict[str, int] = {}
    for protocol, (_, _, n_positive) in prepared.items():
        has = n_positive > 0
        without[protocol] = int((~has).sum())
        series = {"map": torch.cat(ap_parts[protocol])}
        for i, kappa in enumerate(kappas):
            series[f"mp@{kappa}"] = torch.cat([parts[i] for parts in mp_parts[protocol]])
        for name, values in series.items():
            values = torch.where(has, values, torch.full_like(values, math.nan))
            per_query[f"{protocol}/{name}"] = values
            metrics[f"{protocol}/{name}"] = float(values[has].mean()) if bool(has.any()) else math.nan
    return LandmarkResults(metrics, per_query, n_query, without, "revisited")


def _source(
    ranking: Any,
    query: Any,
    gallery: Any,
    n_query: int,
    distance: DistanceLike,
    chunk_size: int | None,
    device: Any,
) -> dict[str, Any]:
    if _uses_ranking(ranking, query, gallery):
        r = _check_ranking(ranking, n_query)
        return {"blocks": lambda: _ranking_blocks(r), "max_index": int(r.max()) if r.numel() else -1}
    nq, ng, blocks = _search_blocks(query, gallery, distance, chunk_size, device)
    if nq != n_query:
        raise DataError(f"query has {nq} rows but the ground truth has {n_query} entries")
    return {"blocks": lambda: blocks, "max_index": ng - 1, "n_gallery": ng}


def _key_width(source: dict[str, Any], lists: Mapping[str, tuple[list[np.ndarray], list[np.ndarray]]]) -> int:
    largest = source["max_index"]
    for positives, junk in lists.values():
        for arrays in (positives, junk):
            for x in arrays:
                if len(x):
                    largest = max(largest, int(x[-1]))
    if "n_gallery" in source and largest >= source["n_gallery"]:
        n_gallery = source["n_gallery"]
        raise DataError(f"ground truth lists gallery index {largest} but the gallery has {n_gallery} items")
    return largest + 1


# ---------------------------------------------------------------------------------------------------------
# Google Landmarks v2
# ---------------------------------------------------------------------------------------------------------


def gldv2_map(
    relevant: Sequence[Any],
    ranking: Any = None,
    *,
    query: Any = None,
    gallery: Any = None,
    distance: DistanceLike = "cosine",
    k: int = 100,
    backend: str = "torch",
    backend_options: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> LandmarkResults:
    """GLDv2 retrieval mAP@k (Weyand et al. 2020; k = 100): per query,
    (1/min(m_q, k)) Σ_{i≤k} P(i)·rel(i) with m_q = |relevant[q]|, averaged over the queries with m_q ≥ 1.

    ``relevant[q]``: gallery indices relevant to query q (empty for a non-landmark query). Give a
    ``ranking`` (or :class:`~dmlkit.search.RetrievalResults`; only its first k columns are used) or
    ``query``/``gallery`` embeddings (top k by :func:`dmlkit.search.search` with ``backend`` and
    ``backend_options``). Metric name: ``f"map@{k}"``.
    """
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    lists = [_index_list(x, f"relevant[{i}]") for i, x in enumerate(relevant)]
    n_query = len(lists)
    if n_query == 0:
        raise DataError("relevant is empty: there are no queries")
    if _uses_ranking(ranking, query, gallery):
        top = _check_ranking(ranking, n_query)[:, :k]
    else:
        inputs = search.prepare(query, gallery)
        if len(inputs.query) != n_query:
            raise DataError(f"query has {len(inputs.query)} rows but relevant has {n_query} entries")
        n_gallery = len(inputs.gallery)
        largest = max((int(x[-1]) for x in lists if len(x)), default=-1)
        if largest >= n_gallery:
            raise DataError(f"relevant lists gallery index {largest} but the gallery has {n_gallery} items")
        depth = min(k, n_gallery)
        top = search.run(inputs, depth, distance, backend, backend_options, device, chunk_size).topk_indices
    width = max(int(top.max()) if top.numel() else -1, *(int(x[-1]) for x in lists if len(x)), 0) + 1
    keys = _pair_keys(lists, width)
    m = torch.tensor([len(x) for x in lists], dtype=torch.int64)
    name = f"map@{k}"
    parts = []
    for start, block in _ranking_blocks(top):
        rows = torch.arange(start, start + len(block))
        rel = (block >= 0) & torch.isin(rows[:, None] * width + block.clamp_min(0), keys)
        parts.append(precision_sum(rel, k) / m[rows].clamp(1, k).double())
    values = torch.cat(parts)
    has = m > 0
    values = torch.where(has, values, torch.full_like(values, math.nan))
    mean = float(values[has].mean()) if bool(has.any()) else math.nan
    return LandmarkResults({name: mean}, {name: values}, n_query, {name: int((~has).sum())}, "gldv2")
