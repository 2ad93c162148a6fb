"""Re-ranking and post-processing of a search: α-query expansion, database-side augmentation, k-reciprocal
re-ranking and learned PCA-whitening, as registered steps applied around :func:`dmlkit.search.run`.

    results = rerank.search(query, gallery, steps=["pcaw:dim=64", "dba:k=5", "aqe:alpha=3,k=2"], k=100,
                            fit_embeddings=train)              # a RetrievalResults, like search.search
    scored = rerank.evaluate(x, y, steps=["k_reciprocal:k1=20,k2=6"], metrics=["map@r"])

Two kinds of step (:data:`REGISTRY`, ``build(name, **options)``, ``available()``,
``parse_spec("aqe:alpha=3,k=2") -> ("aqe", {"alpha": 3, "k": 2})``):

- **embedding steps** (:class:`EmbeddingStep`) return new query/gallery embeddings, which are then searched:
  ``aqe`` (:class:`AlphaQE`), ``dba`` (:class:`DBA`), ``pcaw`` (:class:`PCAWhitening`, fitted on training
  embeddings);
- **ranking steps** (:class:`RankingStep`) re-order the candidates of a :class:`RetrievalResults`:
  ``k_reciprocal`` (:class:`KReciprocal`).

:func:`run` applies the embedding steps in order, searches, then applies the ranking steps. Every step
works in blocks of rows; memory is O(n·k) (the neighbour lists, the sparse k-reciprocal vectors), never an
``n × n`` matrix. Formulas, defaults and the restriction of the k-reciprocal re-ranking to each query's top
candidates: ``docs/metrics.md`` ("Re-ranking and post-processing").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from dmlkit import distances
from dmlkit.distances import Distance, DistanceLike
from dmlkit.errors import ConfigError, DataError
from dmlkit.registry import Registered, Registry
from dmlkit.search import api
from dmlkit.search.base import SearchInputs
from dmlkit.search.encoding import ArrayLike, as_embeddings
from dmlkit.search.exclusion import IgnoreSpec
from dmlkit.search.results import RetrievalResults

if TYPE_CHECKING:  # the metrics import the search package: no import at run time
    from dmlkit.metrics.label_relevance import LabelComparison
    from dmlkit.metrics.scoring import Average

#: Largest number of entries of one block of temporaries (gathered neighbour rows, sparse-vector
#: comparisons, distance tiles) in the steps' own computations; the searches use their own blocks.
BLOCK_ELEMENTS = 2**22


# ---------------------------------------------------------------------------------------------------------
# How the searches inside the steps run


@dataclass(frozen=True)
class SearchSettings:
    """How every search of a pipeline runs: the ``distance`` (an object), the ``backend`` and its options, the
    ``device``, and ``chunk_size`` (queries per block of the search; also caps the rows of the steps' own
    blocks)."""

    distance: Distance
    backend: str = "torch"
    backend_options: Mapping[str, Any] | None = None
    device: torch.device | None = None
    chunk_size: int | None = None

    @classmethod
    def make(
        cls,
        distance: DistanceLike = "cosine",
        backend: str = "torch",
        backend_options: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
    ) -> SearchSettings:
        """Settings from names, the distance checked to be searchable."""
        return cls(
            api.check_searchable(distance),
            backend,
            backend_options,
            None if device is None else torch.device(device),
            chunk_size,
        )

    def search(self, inputs: SearchInputs, k: int, first_relevant: bool = False) -> RetrievalResults:
        """:func:`dmlkit.search.run` of ``inputs`` with these settings."""
        return api.run(
            inputs,
            k,
            self.distance,
            self.backend,
            self.backend_options,
            self.device,
            self.chunk_size,
            first_relevant,
        )

    def rows(self, width: int) -> int:
        """Rows per block when each row costs ``width`` entries (at most ``chunk_size``)."""
        rows = max(1, BLOCK_ELEMENTS // max(width, 1))
        return min(rows, self.chunk_size) if self.chunk_size else rows

    def device_of(self, x: torch.Tensor) -> torch.device:
        """Where the steps' own blocks run: ``device``, else where ``x`` is."""
        return self.device if self.device is not None else x.device


# ---------------------------------------------------------------------------------------------------------
# Steps and their registry


class Step(Registered):
    """A post-processing step (see the module docstring); options are constructor arguments."""

    #: "embeddings" (:class:`EmbeddingStep`) or "ranking" (:class:`RankingStep`).
    kind: ClassVar[str] = "embeddings"

    def __init__(self, **options: Any) -> None:
        self.options = options

    @property
    def fitted(self) -> bool:
        """False for a step that must learn from training embeddings first (:meth:`fit`)."""
        return True

    def fit(self, embeddings: torch.Tensor | np.ndarray) -> Step:
        """Learn from training embeddings (a no-op for steps that learn nothing); returns ``self``."""
        return self

    def spec(self) -> str:
        """The step as a spec string, ``name:key=value,...`` (:func:`parse_spec` reads it back)."""
        options = ",".join(f"{key}={value}" for key, value in self.options.items() if value is not None)
        return f"{self.who}:{options}" if options else self.who

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"{type(self).__name__}({options})"


class EmbeddingStep(Step):
    """A step that returns new embeddings to search (:meth:`transform`)."""

    kind: ClassVar[str] = "embeddings"

    def transform(self, inputs: SearchInputs, settings: SearchSettings) -> SearchInputs:
        """``inputs`` with new query and/or gallery embeddings (ids, labels and exclusions unchanged)."""
        raise NotImplementedError


class RankingStep(Step):
    """A step that re-orders the candidates of a search (:meth:`rerank`)."""

    kind: ClassVar[str] = "ranking"

    def depth(self, k: int) -> int:
        """Candidates the search must keep for a final top ``k``."""
        return k

    def rerank(
        self, results: RetrievalResults, inputs: SearchInputs, settings: SearchSettings | None = None
    ) -> RetrievalResults:
        """``results`` with every query's candidates re-ordered (metrics empty)."""
        raise NotImplementedError


REGISTRY: Registry[Step] = Registry("re-ranking step")


def build(name: str, /, **options: Any) -> Step:
    """The step ``name`` with ``options``; an unknown name or option raises with the closest valid one."""
    return REGISTRY.build(name, **options)


def available() -> list[str]:
    """Registered step names."""
    return REGISTRY.available()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"aqe:alpha=3,k=2"`` → ``("aqe", {"alpha": 3, "k": 2})`` (values read as YAML scalars; a bare
    ``"dba"`` has no options). The step is built once to check it: an unknown step or key, a value of the
    wrong type or out of range, or an unreadable ``state`` file raises a ``ConfigError`` (an
    ``argparse.ArgumentTypeError`` too, so ``--rerank`` reports it as a bad argument) naming the culprit
    and suggesting the closest valid name."""
    from dmlkit.config.flags import FlagValueError, parse_mapping

    if not isinstance(spec, str) or not spec.strip():
        raise FlagValueError(f"empty re-ranking step; available: {', '.join(available())}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    try:
        REGISTRY.get(name)
        options = parse_mapping(rest) if rest.strip() else {}
        build(name, **options)  # every key, type and value checked (and a pcaw state file read)
    except (ConfigError, DataError) as error:
        raise FlagValueError(f"spec {spec!r}: {error}") from None
    return name, options


StepLike = Step | str


def build_steps(steps: StepLike | Sequence[StepLike] | None) -> list[Step]:
    """Steps from :class:`Step` objects and spec strings (``None``: none), checked to be in a valid order:
    every embedding step before every ranking step."""
    if steps is None:
        return []
    items = [steps] if isinstance(steps, str | Step) else list(steps)
    built = [item if isinstance(item, Step) else _from_spec(item) for item in items]
    seen_ranking = None
    for step in built:
        if step.kind == "ranking":
            seen_ranking = step
        elif seen_ranking is not None:
            raise ConfigError(
                f"re-ranking step '{step.who}' changes the embeddings after '{seen_ranking.who}' re-ranked "
                "the results: put embedding steps (aqe, dba, pcaw) before ranking steps (k_reciprocal)"
            )
    return built


def _from_spec(item: object) -> Step:
    if not isinstance(item, str):
        raise ConfigError(f"a re-ranking step must be a spec string or a Step, got {type(item).__name__}")
    name, options = parse_spec(item)
    return build(name, **options)


def _check_int(step: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"re-ranking step '{step}': {name} must be an integer ≥ {minimum}, got {value!r}")


def _check_number(step: str, name: str, value: Any, low: float, high: float | None = None) -> None:
    ok = isinstance(value, int | float | np.number) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
        raise ConfigError(f"re-ranking step '{step}': {name} must be a number {bound}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Query expansion and database-side augmentation


def expand(
    rows: torch.Tensor,
    pool: torch.Tensor,
    neighbours: torch.Tensor,
    alpha: float,
    distance: DistanceLike = "cosine",
    settings: SearchSettings | None = None,
) -> torch.Tensor:
    """α-weighted expansion of every row by its neighbours in ``pool`` (Radenović et al.):

        x̃_i = (x_i + Σ_t w_it · y_{n(i,t)}) / (1 + Σ_t w_it),   w_it = max(cos(x_i, y_{n(i,t)}), 0)^α

    over the rows as the distance sees them (:meth:`~dmlkit.distances.Distance.prepare`: L2-normalised for
    ``cosine``, whose result is normalised again). ``neighbours`` (int64 ``n × k``, ``-1`` for an empty
    slot, which weighs 0) index ``pool``. α = 0 is average query expansion (the mean of the row and its
    neighbours); ``k = 0`` returns the (prepared) rows as they are. Negative similarities weigh 0 (so odd
    α never subtracts a neighbour). Rows are processed in blocks (``n_block × k × d`` gathered rows)."""
    metric = distances.resolve(distance)
    settings = settings or SearchSettings(metric)
    x, y = metric.prepare(rows), metric.prepare(pool)
    if len(neighbours) != len(x):
        raise DataError(f"neighbours has {len(neighbours)} rows but there are {len(x)} rows to expand")
    k = neighbours.shape[1]
    if k == 0 or len(x) == 0:
        return x.clone()
    dev = settings.device_of(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    step = settings.rows(k * max(x.shape[1], 1))
    y_dev = y.to(dev)
    for start in range(0, len(x), step):
        xi = x[start : start + step].to(dev)
        idx = neighbours[start : start + step].to(dev)
        gathered = y_dev[idx.clamp_min(0)]
        cosine = F.cosine_similarity(xi[:, None, :], gathered, dim=-1)
        weights = cosine.clamp_min(0).pow(float(alpha)) * (idx >= 0)
        total = xi + torch.einsum("bk,bkd->bd", weights, gathered)
        out[start : start + step] = (total / (1 + weights.sum(dim=1, keepdim=True))).to(x.device)
    return F.normalize(out, dim=1) if metric.normalizes else out


@REGISTRY.register("aqe")
class AlphaQE(EmbeddingStep):
    """α-weighted query expansion, αQE (Radenović, Tolias, Chum, *Fine-tuning CNN Image Retrieval with No
    Human Annotation*, TPAMI 2018): each query is replaced by the α-weighted mean of itself and its top
    ``k`` gallery neighbours (:func:`expand`), then searched again. ``alpha=0``: average query expansion
    (Chum et al. 2007); ``k=0``: the identity. The neighbours come from the same search (its exclusions:
    in leave-one-out a query never expands with itself)."""

    def __init__(self, k: int = 2, alpha: float = 3.0) -> None:
        _check_int("aqe", "k", k, 0)
        _check_number("aqe", "alpha", alpha, 0.0)
        super().__init__(k=int(k), alpha=float(alpha))
        self.k, self.alpha = int(k), float(alpha)

    def transform(self, inputs: SearchInputs, settings: SearchSettings) -> SearchInputs:
        if self.k == 0:
            return inputs
        found = settings.search(inputs, self.k)
        query = expand(
            inputs.query, inputs.gallery, found.topk_indices, self.alpha, settings.distance, settings
        )
        return replace(inputs, query=query)


@REGISTRY.register("dba")
class DBA(EmbeddingStep):
    """Database-side augmentation (Arandjelović & Zisserman 2012; α-weighted as in Radenović et al. 2018):
    each gallery item is replaced by the α-weighted mean of itself and its top ``k`` gallery neighbours
    (itself excluded, by gallery id) with :func:`expand`; queries are searched against the augmented
    gallery. In leave-one-out the queries are the gallery rows, so they are augmented with it. ``k=0``: the
    identity."""

    def __init__(self, k: int = 2, alpha: float = 3.0) -> None:
        _check_int("dba", "k", k, 0)
        _check_number("dba", "alpha", alpha, 0.0)
        super().__init__(k=int(k), alpha=float(alpha))
        self.k, self.alpha = int(k), float(alpha)

    def transform(self, inputs: SearchInputs, settings: SearchSettings) -> SearchInputs:
        if self.k == 0:
            return inputs
        own = api.prepare(inputs.gallery, None, query_ids=inputs.gallery_ids)  # gallery vs itself
        found = settings.search(own, self.k)
        gallery = expand(
            inputs.gallery, inputs.gallery, found.topk_indices, self.alpha, settings.distance, settings
        )
        same = inputs.leave_one_out and inputs.query is inputs.gallery
        return replace(inputs, gallery=gallery, query=gallery if same else inputs.query)


# ---------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i − b_j‖² for every pair of rows of a block."""
    return torch.cdist(a, b).pow_(2)


def _row_max(points: torch.Tensor, settings: SearchSettings) -> torch.Tensor:
    """max_j ‖p_i − p_j‖² per row, in blocks of ``rows × tile`` distances."""
    n = len(points)
    rows = settings.rows(min(n, 4096))
    tile = max(1, BLOCK_ELEMENTS // rows)
    out = torch.zeros(n, dtype=points.dtype, device=points.device)
    for start in range(0, n, rows):
        block = points[start : start + rows]
        best = torch.zeros(len(block), dtype=points.dtype, device=points.device)
        for t in range(0, n, tile):
            best = torch.maximum(best, _sq_distances(block, points[t : t + tile]).amax(dim=1))
        out[start : start + rows] = best
    return out


def _reciprocal(knn: torch.Tensor, width: int, settings: SearchSettings) -> torch.Tensor:
    """Bool ``N × width``: ``knn[i, t]`` is a reciprocal neighbour (i is among its first ``width``)."""
    forward = knn[:, :width]
    mask = torch.empty(forward.shape, dtype=torch.bool, device=knn.device)
    step = settings.rows(width * width)
    for start in range(0, len(knn), step):
        rows = torch.arange(start, min(start + step, len(knn)), device=knn.device)
        backward = forward[forward[rows]]  # rows × width × width
        mask[rows] = (backward == rows[:, None, None]).any(dim=2)
    return mask


def _unique_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's distinct values below ``n``, sorted, padded with ``n`` (width = the largest count)."""
    idx = idx.sort(dim=1).values
    repeated = torch.zeros_like(idx, dtype=torch.bool)
    repeated[:, 1:] = idx[:, 1:] == idx[:, :-1]
    idx = idx.masked_fill(repeated, n).sort(dim=1).values
    width = int((idx < n).sum(dim=1).max()) if len(idx) else 0
    return idx[:, : max(width, 1)]


def _pad_concat(parts: list[torch.Tensor], fill: float | int) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    padded = [F.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]
    return torch.cat(padded)


def _expansion_sets(knn: torch.Tensor, k1: int, settings: SearchSettings) -> torch.Tensor:
    """R*(i) of every point (Zhong et al., eq. 6 as in their code): R(i, k1) plus R(c, round(k1/2)) of each
    c ∈ R(i, k1) sharing more than 2/3 of its items with R(i, k1): sorted members, ``N × M`` padded with N.
    R(i, k) = {j among the k + 1 first neighbours of i : i among the k + 1 first neighbours of j}."""
    n = len(knn)
    wide, half = min(k1 + 1, knn.shape[1]), min(round(k1 / 2) + 1, knn.shape[1])
    forward, forward_ok = knn[:, :wide], _reciprocal(knn, wide, settings)
    near, near_ok = knn[:, :half], _reciprocal(knn, half, settings)
    parts = []
    step = settings.rows(wide * half * wide)
    for start in range(0, n, step):
        cand, cand_ok = forward[start : start + step], forward_ok[start : start + step]
        members = torch.where(cand_ok, cand, n)  # R(i, k1), padded with n
        sub, sub_ok = near[cand], near_ok[cand]  # R(c, k1/2) of every forward neighbour c
        shared = ((sub[..., None] == members[:, None, None, :]).any(dim=3) & sub_ok).sum(dim=2)
        accept = cand_ok & (3 * shared > 2 * sub_ok.sum(dim=2))
        extra = torch.where(accept[..., None] & sub_ok, sub, n).flatten(1)
        parts.append(_unique_rows(torch.cat([members, extra], dim=1), n))
    return _pad_concat(parts, n)


def _gather_rows(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``points[idx]`` with pad indices (= len(points)) mapped to row 0 (masked by the caller)."""
    return points[idx.clamp_max(len(points) - 1)]


def _vectors(
    points: torch.Tensor, members: torch.Tensor, scale: torch.Tensor, settings: SearchSettings
) -> torch.Tensor:
    """V_i: exp(−d(i, j)) over j ∈ R*(i), normalised to sum 1 (d = squared distance / the row's max)."""
    n, width = members.shape
    values = torch.zeros(members.shape, dtype=points.dtype, device=points.device)
    step = settings.rows(width * max(points.shape[1], 1))
    for start in range(0, n, step):
        idx = members[start : start + step]
        diff = points[start : start + step, None, :] - _gather_rows(points, idx)
        d = diff.pow(2).sum(dim=2) / scale[start : start + step, None]
        w = torch.exp(-d) * (idx < n)
        values[start : start + step] = w / w.sum(dim=1, keepdim=True)
    return values


def _local_expansion(
    members: torch.Tensor, values: torch.Tensor, knn: torch.Tensor, k2: int, settings: SearchSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local query expansion (eq. 11): V_i ← the mean of V_j over the k2 first neighbours j of i, as sparse
    rows (sorted indices padded with N, values)."""
    n, width = members.shape
    parts_idx, parts_val = [], []
    step = settings.rows(k2 * width * 4)
    for start in range(0, n, step):
        near = knn[start : start + step, :k2]
        idx, order = members[near].flatten(1).sort(dim=1)
        val = values[near].flatten(1).gather(1, order) / k2
        first = torch.ones_like(idx, dtype=torch.bool)
        first[:, 1:] = idx[:, 1:] != idx[:, :-1]
        slot = first.cumsum(dim=1) - 1  # the position of each entry's distinct index
        out_idx = torch.full_like(idx, n).scatter_(1, slot, idx)
        out_val = torch.zeros_like(val).scatter_add_(1, slot, val)
        out_val = out_val.masked_fill(out_idx >= n, 0)
        keep = max(1, int((out_idx < n).sum(dim=1).max()))
        parts_idx.append(out_idx[:, :keep])
        parts_val.append(out_val[:, :keep])
    return _pad_concat(parts_idx, n), _pad_concat(parts_val, 0.0)


def _overlap(
    a_idx: torch.Tensor, a_val: torch.Tensor, b_idx: torch.Tensor, b_val: torch.Tensor, n: int
) -> torch.Tensor:
    """Σ_j min(V_a[j], V_b[j]) of each query row ``a`` (``B × M``) against its candidates ``b``
    (``B × K × M``): the query rows are scattered into a dense ``B × (N + 1)`` block (column N, the pad,
    stays 0) and read at the candidates' indices."""
    batch, count, width = b_idx.shape
    dense = torch.zeros((batch, n + 1), dtype=a_val.dtype, device=a_val.device)
    dense.scatter_(1, a_idx, a_val)
    at_b = dense.gather(1, b_idx.reshape(batch, count * width)).reshape(batch, count, width)
    return torch.minimum(at_b, b_val).sum(dim=2)


def k_reciprocal_distances(
    query: torch.Tensor,
    gallery: torch.Tensor,
    candidates: torch.Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    distance: DistanceLike = "cosine",
    leave_one_out: bool = False,
    settings: SearchSettings | None = None,
) -> torch.Tensor:
    """The k-reciprocal final distance d* = (1 − λ)·d_J + λ·d (Zhong et al., CVPR 2017) of every query
    against each of its ``candidates`` (int64 ``nq × K`` gallery indices, ``-1`` for an empty slot, whose
    distance is +inf); float ``nq × K``, smaller is better.

    As in the authors' code: the points are the queries and the gallery together (in ``leave_one_out``, the
    gallery alone: query i is gallery item i); d is the squared Euclidean distance of the rows as
    ``distance`` prepares them (2 − 2·cos for ``cosine``), divided by each point's largest distance to any
    point; neighbour lists include the point itself; R*(p) adds R(c, round(k1/2)) of c ∈ R(p, k1) when
    they share more than 2/3 of it; V_p = exp(−d) over R*(p), normalised to sum 1, then averaged over the
    k2 first neighbours (k2 = 1: no averaging); d_J = 1 − Σmin(V_p, V_g) / (2 − Σmin(V_p, V_g)).
    Everything but the candidates' final distances is exact; memory is O(N·k1·k2 + nq·K).
    """
    metric = api.check_searchable(distance)
    if metric.index_metric == "inner_product" and not metric.normalizes:
        raise ConfigError(
            "k_reciprocal needs a distance (cosine, euclidean, squared_euclidean), not the unnormalised 'dot'"
        )
    settings = settings or SearchSettings(metric)
    dev = settings.device_of(gallery)
    g = metric.prepare(gallery).to(dev)
    points = g if leave_one_out else torch.cat([metric.prepare(query).to(dev, g.dtype), g])
    offset = 0 if leave_one_out else len(query)
    n = len(points)
    graph = api.prepare(points, points)
    depth = min(max(k1 + 1, k2), n)
    found = api.run(
        graph,
        depth,
        "squared_euclidean",
        settings.backend,
        settings.backend_options,
        dev,
        settings.chunk_size,
    )
    knn = found.topk_indices.to(dev)
    scale = _row_max(points, settings).clamp_min(torch.finfo(points.dtype).tiny)
    members = _expansion_sets(knn, k1, settings)
    values = _vectors(points, members, scale, settings)
    if k2 > 1:
        members, values = _local_expansion(members, values, knn, min(k2, depth), settings)
    return _final_distances(
        points, members, values, scale, candidates.to(dev), offset, lambda_value, settings
    )


def _final_distances(
    points: torch.Tensor,
    members: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    candidates: torch.Tensor,
    offset: int,
    lambda_value: float,
    settings: SearchSettings,
) -> torch.Tensor:
    """d* of each query (point q) against its candidates (points offset + g), in query blocks."""
    n, width = members.shape
    nq, count = candidates.shape
    out = torch.full((nq, count), float("inf"), dtype=points.dtype, device=points.device)
    if count == 0:
        return out.cpu()
    step = settings.rows(max(n + 1, count * max(width, points.shape[1]) * 3))
    for start in range(0, nq, step):
        rows = slice(start, min(start + step, nq))  # queries are the first nq points
        cand = candidates[rows]
        other = cand.clamp_min(0) + offset
        shared = _overlap(members[rows], values[rows], members[other], values[other], n)
        jaccard = 1 - shared / (2 - shared)
        diff = points[rows, None, :] - points[other]
        original = diff.pow(2).sum(dim=2) / scale[rows, None]
        final = (1 - lambda_value) * jaccard + lambda_value * original
        out[rows] = final.masked_fill(cand < 0, float("inf"))
    return out.cpu()


@REGISTRY.register("k_reciprocal")
class KReciprocal(RankingStep):
    """k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, *Re-ranking Person Re-identification with
    k-reciprocal Encoding*, CVPR 2017; defaults k1 = 20, k2 = 6, λ = 0.3 as in the paper): each query's
    candidates are re-ordered by d* (:func:`k_reciprocal_distances`).

    Restricted to each query's top ``candidates`` (the search keeps max(k, candidates)): the authors' code
    computes d* against the whole gallery (an nq × N matrix); here only the candidates get a final
    distance, so an item outside them is never promoted. Everything else (the k-reciprocal sets over all
    points, their weights, the local expansion) is exact, and with candidates ≥ the gallery size the
    ranking is the reference's. ``topk_distances`` keep each item's original distance (in the distance's
    units), now in d*'s order; ``first_relevant_rank`` (``mrr``) is dropped."""

    def __init__(self, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, candidates: int = 100) -> None:
        _check_int("k_reciprocal", "k1", k1, 1)
        _check_int("k_reciprocal", "k2", k2, 1)
        _check_number("k_reciprocal", "lambda_value", lambda_value, 0.0, 1.0)
        _check_int("k_reciprocal", "candidates", candidates, 1)
        super().__init__(k1=int(k1), k2=int(k2), lambda_value=float(lambda_value), candidates=int(candidates))
        self.k1, self.k2, self.lambda_value = int(k1), int(k2), float(lambda_value)
        self.candidates = int(candidates)

    def depth(self, k: int) -> int:
        return max(k, self.candidates)

    def rerank(
        self, results: RetrievalResults, inputs: SearchInputs, settings: SearchSettings | None = None
    ) -> RetrievalResults:
        settings = settings or SearchSettings(results.distance, results.backend)
        final = k_reciprocal_distances(
            inputs.query,
            inputs.gallery,
            results.topk_indices,
            k1=self.k1,
            k2=self.k2,
            lambda_value=self.lambda_value,
            distance=settings.distance,
            leave_one_out=inputs.leave_one_out and inputs.query is inputs.gallery,
            settings=settings,
        )
        order = final.sort(dim=1, stable=True).indices
        return replace(
            results,
            topk_indices=results.topk_indices.gather(1, order),
            topk_distances=results.topk_distances.gather(1, order),
            first_relevant_rank=None,
            metrics={},
            per_class={},
            cluster_assignments=None,
        )


# ---------------------------------------------------------------------------------------------------------
# Learned PCA-whitening

#: Eigenvalues below this fraction of the largest are raised to it before whitening (no division by ~0).
EIGENVALUE_FLOOR = 1e-12
_STATE_KEYS = ("mean", "eigenvalues", "eigenvectors", "count", "normalize")


@REGISTRY.register("pcaw")
class PCAWhitening(EmbeddingStep):
    """Learned PCA-whitening (Jégou & Chum, ECCV 2012), with the shrinkage of Tolias et al. (HOW, ECCV
    2020): fitted on training embeddings (:meth:`fit`), applied to queries and gallery before the search:

        x ↦ diag(λ_1..dim^(−power/2)) · U_1..dimᵀ · (x̂ − m)

    with x̂ the row L2-normalised when ``normalize`` (as landmark descriptors are), m the training mean and
    (λ, U) the eigenpairs of the training covariance (Σ (x̂ − m)(x̂ − m)ᵀ / n), largest first. ``dim``: the
    components kept (None: all); ``power``: HOW's shrinkage exponent (``pcawhitenlearn_shrinkage(X, s)``):
    1 whitens fully, below 1 shrinks the whitening, 0 is PCA alone (a rotation: Euclidean distances are
    unchanged at full ``dim``). A cosine search compares the whitened rows by angle, i.e. L2-normalised
    after whitening as in Radenović et al.

    The fit is a small state (:meth:`state_dict`: mean, eigenvalues, eigenvectors, count, normalize);
    ``state=FILE`` loads one written by :meth:`save` (``dim`` and ``power`` apply at transform time, so one
    fit serves every setting)."""

    def __init__(
        self, dim: int | None = None, power: float = 1.0, normalize: bool = True, state: str | None = None
    ) -> None:
        if dim is not None:
            _check_int("pcaw", "dim", dim, 1)
        _check_number("pcaw", "power", power, 0.0)
        super().__init__(dim=dim, power=float(power), normalize=bool(normalize), state=state)
        self.dim, self.power, self.normalize = dim, float(power), bool(normalize)
        self.mean: torch.Tensor | None = None
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None
        self.count = 0
        if state is not None:
            self.load_state_dict(_load_state(state))

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return F.normalize(x, dim=1) if self.normalize else x

    def fit(self, embeddings: torch.Tensor | np.ndarray) -> PCAWhitening:
        """Learn the mean and the eigenpairs of the covariance of ``embeddings`` (n × d, n ≥ 2) in float64,
        two passes in row blocks; returns ``self``."""
        x = as_embeddings(embeddings, "pcaw training embeddings")
        n, d = x.shape
        if n < 2:
            raise DataError(f"pcaw needs at least 2 training embeddings to fit, got {n}")
        step = max(1, BLOCK_ELEMENTS // max(d, 1))
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        for start in range(0, n, step):
            total += self._rows(x[start : start + step]).sum(dim=0)
        mean = total / n
        cov = torch.zeros((d, d), dtype=torch.float64, device=x.device)
        for start in range(0, n, step):
            centred = self._rows(x[start : start + step]) - mean
            cov += centred.T @ centred
        values, vectors = torch.linalg.eigh((cov + cov.T) / (2 * n))
        values, vectors = values.flip(0), vectors.flip(1)
        # A fixed sign per eigenvector (its largest entry positive): refits and saved states agree.
        rows = vectors.abs().argmax(dim=0)
        signs = torch.sign(vectors[rows, torch.arange(d, device=x.device)])
        vectors = vectors * torch.where(signs == 0, 1.0, signs)
        self.mean, self.eigenvalues, self.eigenvectors, self.count = (
            mean.cpu(),
            values.clamp_min(0).cpu(),
            vectors.cpu(),
            n,
        )
        return self

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [d], projection [d, dim]) in float64: y = (x̂ − mean) @ projection."""
        if self.mean is None or self.eigenvalues is None or self.eigenvectors is None:
            raise ConfigError(
                "pcaw is not fitted: call fit(training embeddings), pass fit_embeddings, or give state=FILE"
            )
        d = len(self.mean)
        dim = d if self.dim is None else self.dim
        if dim > d:
            raise ConfigError(f"pcaw: dim={dim} is larger than the embedding size {d}")
        if self.power > 0 and dim > self.count - 1:
            raise ConfigError(
                f"pcaw: whitening {dim} dimensions needs more than {dim} training embeddings (fitted on "
                f"{self.count}): the covariance has rank ≤ {self.count - 1}; lower dim or use power=0"
            )
        floor = EIGENVALUE_FLOOR * float(self.eigenvalues[0]) if d else 0.0
        values = self.eigenvalues[:dim].clamp_min(max(floor, torch.finfo(torch.float64).tiny))
        return self.mean, self.eigenvectors[:, :dim] * values.pow(-self.power / 2)[None, :]

    def apply(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The whitened rows of ``x`` (n × dim, the dtype of ``x``; float16 becomes float32)."""
        rows = as_embeddings(x, "pcaw input")
        mean, projection = self.projection()
        if rows.shape[1] != len(mean):
            raise DataError(f"pcaw was fitted on {len(mean)}-d embeddings, got {rows.shape[1]}-d")
        mean, projection = mean.to(rows.device), projection.to(rows.device)
        out = torch.empty((len(rows), projection.shape[1]), dtype=rows.dtype, device=rows.device)
        step = max(1, BLOCK_ELEMENTS // max(rows.shape[1], 1))
        for start in range(0, len(rows), step):
            out[start : start + step] = ((self._rows(rows[start : start + step]) - mean) @ projection).to(
                rows.dtype
            )
        return out

    def transform(self, inputs: SearchInputs, settings: SearchSettings) -> SearchInputs:
        gallery = self.apply(inputs.gallery)
        query = gallery if inputs.query is inputs.gallery else self.apply(inputs.query)
        return replace(inputs, query=query, gallery=gallery)

    def state_dict(self) -> dict[str, Any]:
        """The fit: ``mean`` [d], ``eigenvalues`` [d] (descending), ``eigenvectors`` [d, d] (columns),
        ``count`` (training rows), ``normalize``."""
        if not self.fitted:
            raise ConfigError("pcaw is not fitted: there is no state to save")
        return {
            "mean": self.mean,
            "eigenvalues": self.eigenvalues,
            "eigenvectors": self.eigenvectors,
            "count": self.count,
            "normalize": self.normalize,
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "state") -> None:
        """Load a :meth:`state_dict` (shapes and keys checked: a ``DataError`` names what is wrong)."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise DataError(f"pcaw {source} lacks {', '.join(repr(m) for m in missing)}")
        mean, values, vectors = (torch.as_tensor(state[k]).double() for k in _STATE_KEYS[:3])
        d = len(mean)
        if mean.ndim != 1 or values.shape != (d,) or vectors.shape != (d, d):
            raise DataError(
                f"pcaw {source}: shapes mean {tuple(mean.shape)}, eigenvalues {tuple(values.shape)}, "
                f"eigenvectors {tuple(vectors.shape)} do not fit together (d, d, d × d)"
            )
        self.mean, self.eigenvalues, self.eigenvectors = mean, values, vectors
        self.count, self.normalize = int(state["count"]), bool(state["normalize"])
        self.options["normalize"] = self.normalize

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` with ``torch.save`` (read back by ``state=path``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path


def _load_state(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"pcaw state file not found: '{file}'")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is reported the same way
        raise DataError(f"pcaw state file '{file}' cannot be read: {error}") from None
    if not isinstance(state, Mapping):
        raise DataError(f"pcaw state file '{file}' does not hold a mapping")
    return dict(state)


# ---------------------------------------------------------------------------------------------------------
# Pipelines


def _fit_steps(steps: list[Step], fit_embeddings: torch.Tensor | np.ndarray | None) -> None:
    for step in steps:
        if step.fitted:
            continue
        if fit_embeddings is None:
            raise ConfigError(
                f"re-ranking step '{step.who}' must be fitted: pass fit_embeddings (e.g. the training "
                "split's embeddings), call fit(), or load a state"
            )
        step.fit(fit_embeddings)


def transform_inputs(
    inputs: SearchInputs,
    steps: StepLike | Sequence[StepLike] | None,
    settings: SearchSettings,
    fit_embeddings: torch.Tensor | np.ndarray | None = None,
) -> SearchInputs:
    """``inputs`` through the embedding steps of ``steps`` in order (ranking steps are an error here)."""
    built = build_steps(steps)
    ranking = [step.who for step in built if step.kind == "ranking"]
    if ranking:
        raise ConfigError(f"{', '.join(ranking)} re-ranks search results; it does not change embeddings")
    _fit_steps(built, fit_embeddings)
    for step in built:
        assert isinstance(step, EmbeddingStep)
        inputs = step.transform(inputs, settings)
    return inputs


def run(
    inputs: SearchInputs,
    steps: StepLike | Sequence[StepLike] | None,
    k: int,
    distance: DistanceLike = "cosine",
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    first_relevant: bool = False,
    fit_embeddings: torch.Tensor | np.ndarray | None = None,
) -> RetrievalResults:
    """:func:`dmlkit.search.run` with ``steps``: the embedding steps transform ``inputs`` in order (unfitted
    ones are first fitted on ``fit_embeddings``), the search keeps as many candidates as the ranking steps
    need, the ranking steps re-order them, and the top ``k`` are returned. ``first_relevant`` (``mrr``) is
    refused with a ranking step, which re-orders the candidates only."""
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"k must be a non-negative integer, got {k!r}")
    built = build_steps(steps)
    settings = SearchSettings.make(distance, backend, backend_options, device, chunk_size)
    ranking = [step for step in built if isinstance(step, RankingStep)]
    if first_relevant and ranking:
        raise ConfigError(
            f"'mrr' ranks the whole gallery, which '{ranking[0].who}' does not re-rank; use 'mrr@K' instead"
        )
    _fit_steps(built, fit_embeddings)
    inputs = transform_inputs(inputs, [s for s in built if not isinstance(s, RankingStep)], settings)
    depth = k
    for step in ranking:
        depth = max(depth, min(step.depth(k), len(inputs.gallery)))
    results = settings.search(inputs, depth, first_relevant)
    for step in ranking:
        results = step.rerank(results, inputs, settings)
    if depth == k:
        return results
    return replace(
        results, topk_indices=results.topk_indices[:, :k], topk_distances=results.topk_distances[:, :k], k=k
    )


def search(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    *,
    steps: StepLike | Sequence[StepLike] | None,
    k: int,
    distance: DistanceLike = "cosine",
    query_labels: ArrayLike | None = None,
    gallery_labels: ArrayLike | None = None,
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    first_relevant: bool = False,
    fit_embeddings: torch.Tensor | np.ndarray | None = None,
) -> RetrievalResults:
    """:func:`dmlkit.search.search` with post-processing ``steps`` (spec strings or :class:`Step` objects,
    applied as in :func:`run`); ``fit_embeddings`` fit the steps that learn (``pcaw``)."""
    inputs = api.prepare(query, gallery, query_labels, gallery_labels, query_ids, gallery_ids, ignore)
    return run(
        inputs,
        steps,
        k,
        distance,
        backend,
        backend_options,
        device,
        chunk_size,
        first_relevant,
        fit_embeddings,
    )


def transform(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray | None = None,
    *,
    steps: StepLike | Sequence[StepLike] | None,
    distance: DistanceLike = "cosine",
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    fit_embeddings: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, gallery) after the embedding ``steps`` (no ``gallery``: leave-one-out, both returned), for
    callers that rank the embeddings themselves (e.g. :func:`dmlkit.metrics.revisited_map`)."""
    inputs = api.prepare(query, gallery)
    settings = SearchSettings.make(distance, backend, backend_options, device, chunk_size)
    out = transform_inputs(inputs, steps, settings, fit_embeddings)
    return out.query, out.gallery


def evaluate(
    query: torch.Tensor | np.ndarray,
    query_labels: ArrayLike,
    gallery: torch.Tensor | np.ndarray | None = None,
    gallery_labels: ArrayLike | None = None,
    *,
    steps: StepLike | Sequence[StepLike] | None,
    metrics: Sequence[str] | str | None = None,
    k: int | None = None,
    distance: DistanceLike = "cosine",
    query_ids: ArrayLike | None = None,
    gallery_ids: ArrayLike | None = None,
    ignore: IgnoreSpec = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    fit_embeddings: torch.Tensor | np.ndarray | None = None,
    label_comparison: LabelComparison | None = None,
    average: Average = "query",
) -> RetrievalResults:
    """:func:`dmlkit.metrics.evaluate` with post-processing ``steps``: the same arguments (relevance by a
    ``label_comparison``, ``average="class"``), plus ``steps`` and ``fit_embeddings``. The steps re-rank by
    ``distance``; the ``c_``/``e_`` names, which rank by another distance, are refused here."""
    from dmlkit.metrics import scoring
    from dmlkit.metrics.retrieval import DEFAULT_METRICS, check_options, parse_metric

    names = check_options(DEFAULT_METRICS if metrics is None else metrics, distance, backend)
    parsed = [scoring.parse_name(name) for name in names]
    variants = [name for name, p in zip(names, parsed, strict=True) if p.variant is not None]
    if variants:
        raise ConfigError(
            f"metric {variants[0]!r} ranks by another distance than the re-ranked one; evaluate it "
            "without post-processing steps"
        )
    built = build_steps(steps)
    inputs, relevance, class_size, max_relevant = scoring.prepare_evaluation(
        query, query_labels, gallery, gallery_labels, parsed,
        query_ids=query_ids, gallery_ids=gallery_ids, ignore=ignore, label_comparison=label_comparison,
    )  # fmt: skip
    assert inputs.gallery_labels is not None
    k = scoring.choose_depth(
        parsed, class_size, max_relevant, len(inputs.gallery_labels), inputs.leave_one_out, k
    )
    wants_mrr = relevance is None and any(parse_metric(name)[0] == "mrr" for name in names)
    results = run(
        inputs, built, k, distance, backend, backend_options, device, chunk_size, wants_mrr, fit_embeddings
    )
    wrapped = scoring.EvaluationResults.wrap(results, relevance=relevance)
    return scoring.compute(wrapped, names, seed=seed, average=average)
