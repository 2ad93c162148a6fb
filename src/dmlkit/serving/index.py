"""A searchable gallery: embeddings in atomic chunks and a faiss index over them (``dmlkit index build``).

An index folder holds::

    manifest.json          what the folder is: the checkpoint's fingerprint, the chunks, the current index
    chunks/000000.npz ...  the embeddings (float32, the model's raw output) and ids of up to chunk_size images
    index-000001.faiss     the faiss index of every chunk's rows, in chunk order (row i = ids[i])
    ids-000001.json        those ids, in the same order

**Atomic and resumable.** Every file is written to a temporary sibling, fsynced and renamed over its name
(``os.replace``), and the manifest, rewritten the same way after each chunk, is the only list of what is
done: a chunk file or an index generation the manifest does not name is a leftover of an interrupted run
and is deleted. An interrupted build therefore keeps every chunk it finished, and the next run embeds only
the images that no listed chunk holds. The index file and its ids carry a generation number, and the
manifest switches to a new generation in one rename, so a reader always finds a consistent pair.

**Incremental.** Images are identified by their id (the path relative to the folder, or the CSV's image
column). Running the build again on a folder with new images embeds only those; the faiss index is
extended with the new rows (``index.add``) when its kind and options are unchanged, and rebuilt from the
stored embeddings (nothing is embedded again) otherwise or with ``rebuild=True``. Ids that are no longer
in the folder stay in the index and are reported.

**Kind by size** (:func:`choose_kind`, overridable): exact ``flat`` (``IndexFlatIP`` / ``IndexFlatL2``)
below :data:`FLAT_BELOW` images, ``hnsw`` (``IndexHNSWFlat``, ``M`` = 32) below :data:`HNSW_BELOW`, then
``ivfpq`` (``IndexIVFPQ``: ``nlist`` ≈ 4·√n cells, ``m`` sub-quantizers of 8 bits, ``nprobe`` ≈ nlist / 16),
whose memory is ``m`` bytes per image instead of 4·d. Rows are stored as the distance's
:meth:`~dmlkit.distances.Distance.prepare` makes them (L2-normalised for cosine), as the search backends of
:mod:`dmlkit.search.faiss_backend` do.

**Fingerprint** (:func:`fingerprint`): a SHA-256 of the checkpoint's weights, its model recipe and its
evaluation preprocessing. Embeddings of another checkpoint do not live in the same space, so a build into
an index of another fingerprint, or a search of it with another checkpoint, is refused naming both.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dmlkit import distances
from dmlkit.errors import ConfigError, DataError, unknown_name_message
from dmlkit.files import read_json, write_atomic

try:  # advisory lock against two builds writing one folder (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "dmlkit-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNKS = "chunks"
LOCK = ".lock"
#: Images per chunk: the unit of atomic writing (what an interruption may lose) and of each embedding call.
DEFAULT_CHUNK_SIZE = 1024
#: ``auto``: exact ``flat`` below this many images (a brute-force query over 50 000 × 512 floats is a few ms).
FLAT_BELOW = 50_000
#: ``auto``: ``hnsw`` below this many images, ``ivfpq`` from it (compressed: ``m`` bytes per image).
HNSW_BELOW = 1_000_000
KINDS: tuple[str, ...] = ("auto", "flat", "hnsw", "ivfpq")
#: The options of each kind (:class:`IndexOptions` fields); any other given for an explicit kind is refused.
KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivfpq": ("nlist", "nprobe", "pq_m", "pq_bits", "seed"),
}
#: faiss's guidance: at least 39 training points per k-means centroid.
POINTS_PER_CENTROID = 39

#: ``embed(paths) -> float32 array (len(paths), d)``: how a build turns images into embeddings.
Embed = Callable[[Sequence[Path]], np.ndarray]


def import_faiss(what: str = "dmlkit index") -> ModuleType:
    """The ``faiss`` module, or a ``ConfigError`` saying how to install it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise ConfigError(
            f"{what} needs the optional package faiss, which is not installed: pip install 'dmlkit[faiss]' "
            "(or faiss-cpu)"
        ) from exc


def fingerprint(checkpoint: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of what fixes a checkpoint's embeddings: its weights (``model``: every state-dict
    entry's name, dtype, shape and bytes, in key order), its model recipe (``model_config`` without
    ``pretrained_weights``, which the weights replace: ``normalize`` changes the output, not the weights)
    and its evaluation preprocessing (``data_spec``). Equal fingerprints embed every image identically."""
    digest = hashlib.sha256()
    model_config = {
        k: v for k, v in dict(checkpoint.get("model_config") or {}).items() if k != "pretrained_weights"
    }
    recipe = {"model_config": model_config, "data_spec": checkpoint.get("data_spec")}
    digest.update(json.dumps(recipe, sort_keys=True, default=repr).encode())
    state = checkpoint["model"]
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            digest.update(f"{name}|{value!r}|".encode())
            continue
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def short(fingerprint_hex: str) -> str:
    """The first 16 hex digits of a fingerprint, as messages show it."""
    return fingerprint_hex[:16]


def choose_kind(n: int) -> str:
    """The index kind ``auto`` picks for ``n`` images: ``flat`` (< :data:`FLAT_BELOW`), ``hnsw``
    (< :data:`HNSW_BELOW`), else ``ivfpq``."""
    if n < FLAT_BELOW:
        return "flat"
    return "hnsw" if n < HNSW_BELOW else "ivfpq"


@dataclass(frozen=True)
class IndexOptions:
    """What kind of faiss index to build and its options (``None``: the default for the gallery's size).

    ``kind``: one of :data:`KINDS` (``auto``: :func:`choose_kind`). ``hnsw``: ``hnsw_m`` links per node (32),
    ``ef_construction`` (80) and ``ef_search`` (128, at least the k searched) candidate lists. ``ivfpq``:
    ``nlist`` cells (≈ 4·√n, at most n / 39), ``nprobe`` cells searched (⌈nlist / 16⌉), ``pq_m``
    sub-quantizers (a divisor of d: the largest ≤ min(64, d / 4)), ``pq_bits`` bits each (8, fewer when
    fewer than 39 · 256 images train them), k-means ``seed``.
    """

    kind: str = "auto"
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(unknown_name_message("index kind", self.kind, KINDS))
        for key, value in self.given().items():
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
                raise ConfigError(f"index option {key} must be a positive integer, got {value!r}")
        if self.pq_bits is not None and self.pq_bits > 16:
            raise ConfigError(f"index option pq_bits must be at most 16, got {self.pq_bits}")
        if self.kind != "auto":
            unused = [key for key in self.given() if key not in KIND_OPTIONS[self.kind]]
            if unused:
                raise ConfigError(
                    f"index option {unused[0]} does not apply to a {self.kind} index (its options: "
                    f"{', '.join(KIND_OPTIONS[self.kind]) or 'none'})"
                )

    def given(self) -> dict[str, int]:
        """The options set explicitly (not ``kind``)."""
        return {k: v for k, v in asdict(self).items() if k != "kind" and v is not None}

    def resolve(self, n: int, d: int) -> tuple[str, dict[str, int]]:
        """``(kind, params)`` for ``n`` images of ``d`` dimensions: every option of the kind, defaults
        filled in."""
        kind = choose_kind(n) if self.kind == "auto" else self.kind
        if kind == "flat":
            return kind, {}
        if kind == "hnsw":
            return kind, {
                "hnsw_m": self.hnsw_m or 32,
                "ef_construction": self.ef_construction or 80,
                "ef_search": self.ef_search or 128,
            }
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(n)), n // POINTS_PER_CENTROID))
        if nlist > n:
            raise ConfigError(
                f"index option nlist={nlist} needs at least {nlist} images to train; there are {n}"
            )
        pq_m = self.pq_m or max(m for m in range(1, min(64, max(1, d // 4)) + 1) if d % m == 0)
        if d % pq_m:
            raise ConfigError(f"index option pq_m={pq_m} must divide the embedding size {d}")
        pq_bits = self.pq_bits or min(8, max(1, int(math.log2(max(2, n // POINTS_PER_CENTROID)))))
        if 2**pq_bits > n:
            raise ConfigError(
                f"index option pq_bits={pq_bits} needs at least {2**pq_bits} images; there are {n}"
            )
        nprobe = min(self.nprobe or max(1, math.ceil(nlist / 16)), nlist)
        return kind, {
            "nlist": nlist,
            "nprobe": nprobe,
            "pq_m": pq_m,
            "pq_bits": pq_bits,
            "seed": self.seed or 0,
        }


@dataclass
class BuildReport:
    """What :func:`build_index` did: images ``embedded`` now and ``reused`` from earlier chunks (``total`` in
    the index), the index ``kind``, ``params`` and ``distance``, what happened to the faiss index
    (``state``: ``built``, ``rebuilt``, ``extended`` or ``up to date``), ids no longer in the image list
    (``missing``, kept), seconds spent embedding and in all."""

    folder: Path
    total: int
    embedded: int
    reused: int
    kind: str
    distance: str
    params: dict[str, int]
    state: str
    missing: list[str] = field(default_factory=list)
    embed_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Images embedded per second of the whole build (0 when nothing was embedded)."""
        return self.embedded / self.seconds if self.embedded and self.seconds > 0 else 0.0


# -- files ---------------------------------------------------------------------------------------------------


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda handle: handle.write(json.dumps(value, indent=1).encode()))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an index folder (``None``: none there), checked to be a dmlkit index's."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, "index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f'{path} is not a dmlkit index manifest (no "format": "{FORMAT}")')
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: index format version {manifest.get('version')}; this dmlkit reads {FORMAT_VERSION}"
        )
    return manifest


def _read_chunk(
    folder: Path, entry: Mapping[str, Any], ids_only: bool = False
) -> tuple[np.ndarray | None, list[str]]:
    path = folder / entry["file"]
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = [str(i) for i in data["ids"]]
            embeddings = None if ids_only else np.asarray(data["embeddings"], dtype=np.float32)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(
            f"index chunk {path} (listed in {folder / MANIFEST}) is missing or unreadable: {exc}; delete the "
            "index folder and build it again"
        ) from exc
    if len(ids) != entry["count"] or (embeddings is not None and len(embeddings) != len(ids)):
        raise DataError(
            f"index chunk {path} holds {len(ids)} ids; {folder / MANIFEST} lists {entry['count']}"
        )
    return embeddings, ids


def _chunk_rows(folder: Path, chunks: Sequence[Mapping[str, Any]], start: int) -> Iterator[np.ndarray]:
    """The embeddings of every row from ``start`` on, chunk by chunk (chunks before it are not read)."""
    offset = 0
    for entry in chunks:
        end = offset + entry["count"]
        if end > start:
            embeddings, _ = _read_chunk(folder, entry)
            assert embeddings is not None
            yield embeddings[max(0, start - offset) :]
        offset = end


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with (folder / LOCK).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise ConfigError(
                f"another dmlkit index build is writing {folder}; wait for it to finish"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Delete what an interrupted run left: temporary files, chunks and index generations not listed."""
    keep = {entry["file"] for entry in manifest["chunks"]}
    index = manifest.get("index") or {}
    keep |= {index.get("file"), index.get("ids")}
    candidates = [*folder.glob(".*.tmp"), *(folder / CHUNKS).glob("*"), *folder.glob("index-*.faiss")]
    for path in [*candidates, *folder.glob("ids-*.json")]:
        if path.is_file() and str(path.relative_to(folder)) not in keep:
            path.unlink(missing_ok=True)


# -- building ------------------------------------------------------------------------------------------------


def _start(
    folder: Path,
    fingerprint_hex: str,
    checkpoint_name: str,
    source: str,
    distance: str | None,
    default_distance: str,
) -> dict[str, Any]:
    """The folder's manifest (a new one written first if there is none), checked against the checkpoint."""
    manifest = read_manifest(folder)
    if manifest is None:
        if folder.exists() and any(p.name != LOCK for p in folder.iterdir()):
            raise ConfigError(
                f"--out {folder} is a folder that holds no dmlkit index (no {MANIFEST}); give an empty or "
                "new one"
            )
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint_hex,
            "checkpoint": checkpoint_name,
            "images": source,
            "distance": distance or default_distance,
            "embedding_size": None,
            "chunks": [],
            "index": None,
        }
        _write_json(folder / MANIFEST, manifest)
        return manifest
    if manifest["fingerprint"] != fingerprint_hex:
        raise ConfigError(
            f"index {folder} was built by checkpoint {manifest['checkpoint']} (fingerprint "
            f"{short(manifest['fingerprint'])}); {checkpoint_name} has fingerprint "
            f"{short(fingerprint_hex)} and embeds differently: build its index in another folder"
        )
    manifest["checkpoint"], manifest["images"] = checkpoint_name, source
    if distance is not None:
        manifest["distance"] = distance
    return manifest


def _check_ids(ids: Sequence[str], paths: Sequence[Path]) -> None:
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} ids for {len(paths)} paths")
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise DataError(f"image id '{item}' is listed twice; every image of an index needs its own id")
        seen.add(item)


def _embed_chunk(embed: Embed, paths: Sequence[Path], size: int | None) -> np.ndarray:
    embeddings = np.ascontiguousarray(np.asarray(embed(paths), dtype=np.float32))
    if embeddings.ndim != 2 or len(embeddings) != len(paths):
        raise DataError(f"embedding {len(paths)} images gave an array of shape {embeddings.shape}")
    if size is not None and embeddings.shape[1] != size:
        raise DataError(f"the images embed to {embeddings.shape[1]} dimensions; the index holds {size}")
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad.size:
        raise DataError(
            f"the model gave NaN or infinite embeddings for {paths[int(bad[0])]} ({bad.size} images)"
        )
    return embeddings


def _embed_missing(
    folder: Path,
    manifest: dict[str, Any],
    todo: Sequence[tuple[Path, str]],
    embed: Embed,
    chunk_size: int,
    progress: bool,
) -> None:
    """Embed ``todo`` chunk by chunk; each chunk is written atomically, then listed in the manifest."""
    bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(todo), chunk_size):
            part = todo[start : start + chunk_size]
            embeddings = _embed_chunk(embed, [p for p, _ in part], manifest["embedding_size"])
            manifest["embedding_size"] = int(embeddings.shape[1])
            name = f"{CHUNKS}/{len(manifest['chunks']):06d}.npz"
            ids = np.array([i for _, i in part], dtype=str)
            write_atomic(
                folder / name, lambda handle, e=embeddings, i=ids: np.savez(handle, embeddings=e, ids=i)
            )
            manifest["chunks"].append({"file": name, "count": len(part)})
            _write_json(folder / MANIFEST, manifest)
            bar.update(len(part))
    finally:
        bar.close()


def _new_index(faiss: ModuleType, kind: str, params: Mapping[str, int], d: int, inner_product: bool) -> Any:
    metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    if kind == "flat":
        return faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["hnsw_m"], metric)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
    index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["pq_m"], params["pq_bits"], metric)
    index.cp.seed = params["seed"] % (2**31)
    index.nprobe = params["nprobe"]
    return index  # faiss's Python wrapper keeps the quantizer alive with the index


def _train_sample(rows: np.ndarray, params: Mapping[str, int]) -> np.ndarray:
    """The k-means training points of an IVF-PQ index: at most 256 per cell (seeded draw)."""
    n_train = min(len(rows), max(256 * params["nlist"], POINTS_PER_CENTROID * 2 ** params["pq_bits"]))
    if n_train >= len(rows):
        return rows
    rng = np.random.default_rng(params["seed"])
    return np.ascontiguousarray(rows[np.sort(rng.choice(len(rows), n_train, replace=False))])


def _finish(
    folder: Path, manifest: dict[str, Any], options: IndexOptions, rebuild: bool
) -> tuple[str, dict[str, int], str]:
    """Bring the faiss index up to the chunks: build, extend or rebuild it, or leave it. Returns
    ``(kind, params, state)`` (:class:`BuildReport`)."""
    faiss = import_faiss()
    total = sum(entry["count"] for entry in manifest["chunks"])
    d = manifest["embedding_size"]
    kind, params = options.resolve(total, d)
    distance = distances.build(manifest["distance"])
    inner_product = distance.index_metric == "inner_product"
    current = manifest.get("index")
    same = (
        current is not None
        and not rebuild
        and (current["kind"], current["distance"], current["options"])
        == (kind, manifest["distance"], options.given())
        and current["count"] <= total
    )
    if same and current["count"] == total:
        _write_json(folder / MANIFEST, manifest)  # the checkpoint's path and the source as given now
        return current["kind"], current["params"], "up to date"

    def prepare(rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(distance.prepare(torch.from_numpy(rows)).numpy())

    if same:
        index = faiss.read_index(str(folder / current["file"]))
        params, start = current["params"], current["count"]
    else:
        index, start = _new_index(faiss, kind, params, d, inner_product), 0
        if kind == "ivfpq":
            rows = np.concatenate(list(_chunk_rows(folder, manifest["chunks"], 0)))
            index.train(_train_sample(prepare(rows), params))
    for rows in _chunk_rows(folder, manifest["chunks"], start):
        index.add(prepare(rows))
    ids = [i for entry in manifest["chunks"] for i in _read_chunk(folder, entry, ids_only=True)[1]]
    generation = (current or {}).get("generation", 0) + 1
    index_file, ids_file = f"index-{generation:06d}.faiss", f"ids-{generation:06d}.json"
    write_atomic(
        folder / index_file, lambda handle: faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
    )
    _write_json(folder / ids_file, ids)
    manifest["index"] = {
        "generation": generation,
        "kind": kind,
        "distance": manifest["distance"],
        "options": options.given(),
        "params": params,
        "count": total,
        "file": index_file,
        "ids": ids_file,
    }
    _write_json(folder / MANIFEST, manifest)  # the switch to the new generation
    for old in ((current or {}).get("file"), (current or {}).get("ids")):
        if old and old not in (index_file, ids_file):
            (folder / old).unlink(missing_ok=True)
    return kind, params, "extended" if same else "rebuilt" if current is not None else "built"


def build_index(
    folder: str | Path,
    paths: Sequence[Path],
    ids: Sequence[str],
    embed: Embed,
    *,
    fingerprint_hex: str,
    checkpoint_name: str,
    source: str = "",
    distance: str | None = None,
    default_distance: str = "cosine",
    options: IndexOptions | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rebuild: bool = False,
    progress: bool = False,
) -> BuildReport:
    """Build, resume or extend the index in ``folder`` over the images ``paths`` (identified by ``ids``).

    ``embed(paths)`` returns their float32 embeddings, one row each (the checkpoint's evaluation
    preprocessing and model); ``fingerprint_hex`` (:func:`fingerprint`) and ``checkpoint_name`` identify
    that checkpoint: a folder built by another fingerprint raises ``ConfigError`` naming both. ``distance``:
    the search's (:func:`dmlkit.distances.available` with ``indexable=True``; ``None``: the folder's, else
    ``default_distance``). ``source`` (the image folder or CSV) is recorded. Images whose id a listed chunk
    holds are not embedded again; the rest are embedded ``chunk_size`` at a time, each chunk written
    atomically; then the faiss index is extended, rebuilt (another kind or options, ``rebuild``) or left as
    it is (nothing new). See the module docstring for the layout.
    """
    started = time.perf_counter()
    folder = Path(folder)
    options = options or IndexOptions()
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
    if distance is not None and distance not in distances.available(indexable=True):
        raise ConfigError(unknown_name_message("distance", distance, distances.available(indexable=True)))
    import_faiss()  # before anything is embedded
    _check_ids(ids, paths)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for the index")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        manifest = _start(folder, fingerprint_hex, checkpoint_name, source, distance, default_distance)
        _remove_leftovers(folder, manifest)
        done = {i for entry in manifest["chunks"] for i in _read_chunk(folder, entry, ids_only=True)[1]}
        wanted = set(ids)
        todo = [(p, i) for p, i in zip(paths, ids, strict=True) if i not in done]
        embed_started = time.perf_counter()
        _embed_missing(folder, manifest, todo, embed, chunk_size, progress)
        embed_seconds = time.perf_counter() - embed_started
        if not manifest["chunks"]:
            raise DataError("no images to index")
        kind, params, state = _finish(folder, manifest, options, rebuild)
    return BuildReport(
        folder=folder,
        total=sum(entry["count"] for entry in manifest["chunks"]),
        embedded=len(todo),
        reused=len(done & wanted),
        kind=kind,
        distance=manifest["distance"],
        params=params,
        state=state,
        missing=sorted(done - wanted),
        embed_seconds=embed_seconds,
        seconds=time.perf_counter() - started,
    )


# -- searching -----------------------------------------------------------------------------------------------


@dataclass
class GalleryIndex:
    """An index folder opened for search (:func:`open_index`): the faiss ``index``, the ``ids`` of its rows,
    its ``manifest`` and the :class:`~dmlkit.distances.Distance` it ranks by."""

    folder: Path
    manifest: dict[str, Any]
    index: Any
    ids: list[str]
    distance: distances.Distance

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def kind(self) -> str:
        return str(self.manifest["index"]["kind"])

    @property
    def embedding_size(self) -> int:
        return int(self.manifest["embedding_size"])

    def check_checkpoint(self, fingerprint_hex: str, checkpoint_name: str) -> None:
        """``ConfigError`` naming both checkpoints unless ``fingerprint_hex`` is the one that built the
        index."""
        if fingerprint_hex != self.fingerprint:
            raise ConfigError(
                f"index {self.folder} was built by checkpoint {self.manifest['checkpoint']} (fingerprint "
                f"{short(self.fingerprint)}); {checkpoint_name} has fingerprint {short(fingerprint_hex)}: "
                "its embeddings are not comparable. Search with the checkpoint that built the index, or "
                f"build an index for this one (dmlkit index build --checkpoint {checkpoint_name} ...)"
            )

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, each ``len(queries) × min(k, len(ids))``: the nearest rows (−1: no more found)
        and their scores in the distance's units (cosine similarity, Euclidean distance...)."""
        queries = torch.as_tensor(queries, dtype=torch.float32)
        if queries.ndim != 2 or queries.shape[1] != self.embedding_size:
            raise DataError(
                f"queries of shape {tuple(queries.shape)} for index {self.folder} of "
                f"{self.embedding_size}-dimensional embeddings"
            )
        k = min(k, len(self.ids))
        params = self.manifest["index"]["params"]
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(params["ef_search"], k)
        prepared = np.ascontiguousarray(self.distance.prepare(queries).numpy())
        scores, rows = self.index.search(prepared, k)
        scores = self.distance.from_index(torch.from_numpy(scores)).numpy()
        return np.where(rows < 0, self.distance.worst, scores), rows


def open_index(folder: str | Path) -> GalleryIndex:
    """Open an index folder written by :func:`build_index` for search. ``DataError`` naming the folder if
    it holds no index, if its build has not finished, or if its files disagree with its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"no dmlkit index in {folder} (no {MANIFEST}): build one with `dmlkit index build`")
    current = manifest.get("index")
    if current is None:
        raise DataError(
            f"the build of index {folder} has not finished ({len(manifest['chunks'])} chunks embedded): run "
            "`dmlkit index build` again with the same --out to finish it"
        )
    faiss = import_faiss("dmlkit search --index")
    try:
        index = faiss.read_index(str(folder / current["file"]))
    except RuntimeError as exc:
        raise DataError(
            f"cannot read faiss index {folder / current['file']}: {str(exc).strip().splitlines()[0]}"
        ) from exc
    ids = read_json(folder / current["ids"], "index ids")
    if not isinstance(ids, list) or not (index.ntotal == len(ids) == current["count"]):
        count = len(ids) if isinstance(ids, list) else "no"
        raise DataError(
            f"index {folder}: {index.ntotal} rows in {current['file']}, {count} ids in {current['ids']}, "
            f"{current['count']} in {MANIFEST}; build it again"
        )
    if current["kind"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = current["params"]["nprobe"]
    return GalleryIndex(folder, manifest, index, [str(i) for i in ids], distances.build(current["distance"]))


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FLAT_BELOW",
    "HNSW_BELOW",
    "KINDS",
    "BuildReport",
    "Embed",
    "GalleryIndex",
    "IndexOptions",
    "build_index",
    "choose_kind",
    "fingerprint",
    "import_faiss",
    "open_index",
    "read_manifest",
    "short",
]
