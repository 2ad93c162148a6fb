"""Re-ranking and post-processing steps on a trained checkpoint's test split: effect, time and memory.

    python benchmarks/rerank.py --checkpoint RUN/best.pt [--steps "aqe:k=2,alpha=3" ...] [--out FILE.json]

The checkpoint's test split (its dataset, data root and recorded preprocessing) and its training split
(what ``pcaw`` is fitted on) are embedded once; then each step list is evaluated under the split's protocol
(:func:`dmlkit.search.rerank.evaluate`, the code path of ``dmlkit eval --rerank``), timed, and its peak
memory measured: the largest tensor any torch operation returned while it ran (a TorchDispatchMode, as the
O(n·k) tests do), set against the n × n a dense re-ranking would hold. Prints a Markdown table.

``--revisited-omniglot DIR`` (the 105 × 105 originals, ``images_evaluation/``) adds the revisited
Oxford/Paris protocol (Radenović et al. 2018; :func:`dmlkit.metrics.revisited_map`, as ``dmlkit eval
--revisited`` scores it) on a fixture built from those real drawings: 70 queries (as many as ROxford), one
drawing of each of 70 characters drawn with the seed; the gallery is every other drawing of the 659
characters (13,110). A query's positives are the other 19 drawings of its character, split by how far they
are from the query in raw pixels (28 × 28, L2): the 10 nearest are ``easy``, the 9 farthest ``hard``; no
``junk``. Easy / Medium / Hard mAP is reported for each step list (``pcaw`` fitted on the checkpoint's
training split).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dmlkit import data as data_lib
from dmlkit.cli.common import FilesDataset
from dmlkit.config import config_from_checkpoint
from dmlkit.inference import compute_embeddings, load_model
from dmlkit.metrics import revisited_map
from dmlkit.search import rerank
from dmlkit.train.data import build_data

DEFAULT_STEPS = (
    "",
    "pcaw",
    "aqe:k=2,alpha=3",
    "dba:k=2,alpha=3",
    "dba:k=2,alpha=3|aqe:k=2,alpha=3",
    "k_reciprocal:k1=20,k2=6,lambda_value=0.3",
    "pcaw|dba:k=2,alpha=3|aqe:k=2,alpha=3",
    "pcaw|k_reciprocal:k1=20,k2=6,lambda_value=0.3",
)


class LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) any torch operation returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def embed_split(
    model: torch.nn.Module, checkpoint: dict, split: str
) -> tuple[torch.Tensor, torch.Tensor, object]:
    trained = config_from_checkpoint(checkpoint["config"], "checkpoint")
    splits = build_data(trained.data, trained.run.seed, spec=checkpoint["data_spec"])
    dataset = splits.split(split)
    dataset.transform = data_lib.transforms.build("eval", **checkpoint["data_spec"])
    embeddings, labels = compute_embeddings(model, dataset, batch_size=512)
    return embeddings, labels, dataset.annotations


def revisited_fixture(
    folder: Path, queries: int, seed: int
) -> tuple[list[Path], list[int], list[int], list[dict[str, list[int]]]]:
    """(every drawing, query positions, gallery positions, revisitop-style gnd) of the Omniglot fixture."""
    paths = sorted(folder.glob("*/*/*.png"))
    characters = np.array([str(p.parent.relative_to(folder)) for p in paths])
    names = sorted(set(characters))
    chosen = np.random.default_rng(seed).choice(len(names), size=queries, replace=False)
    query_positions = [int(np.flatnonzero(characters == names[c])[0]) for c in chosen]
    taken = set(query_positions)
    gallery_positions = [i for i in range(len(paths)) if i not in taken]
    gallery_index = {position: g for g, position in enumerate(gallery_positions)}

    def pixels(i: int) -> np.ndarray:
        return np.asarray(
            Image.open(paths[i]).convert("L").resize((28, 28), Image.BILINEAR), dtype=np.float32
        )

    gnd = []
    for q in query_positions:
        positives = [i for i in np.flatnonzero(characters == characters[q]) if i != q]
        far = [float(np.linalg.norm(pixels(i) - pixels(q))) for i in positives]
        order = [positives[j] for j in np.argsort(far, kind="stable")]
        easy, hard = order[:10], order[10:]
        gnd.append(
            {"easy": [gallery_index[i] for i in easy], "hard": [gallery_index[i] for i in hard], "junk": []}
        )
    return paths, query_positions, gallery_positions, gnd


def run_revisited(
    model: torch.nn.Module,
    checkpoint: dict,
    folder: Path,
    specs: list[str],
    train: torch.Tensor,
    distance: str,
) -> list[dict]:
    paths, query_positions, gallery_positions, gnd = revisited_fixture(folder, 70, 0)
    embeddings, _ = compute_embeddings(model, FilesDataset.for_checkpoint(paths, checkpoint), batch_size=512)
    query, gallery = embeddings[query_positions], embeddings[gallery_positions]
    print(f"revisited protocol on Omniglot drawings: {len(query)} queries, {len(gallery)} gallery images")
    rows = []
    for spec in specs:
        steps = [s for s in spec.split("|") if s]
        started = time.perf_counter()
        ranked = rerank.search(
            query, gallery, steps=steps, k=len(gallery), distance=distance, fit_embeddings=train
        )
        found = revisited_map(gnd, ranked)
        row = {
            "steps": " → ".join(steps) or "none",
            **{name: float(found.metrics[f"{name}/map"]) for name in ("easy", "medium", "hard")},
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print()
    print("| steps | Easy mAP | Medium mAP | Hard mAP | Δ Medium | Δ Hard | time s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        deltas = f"{row['medium'] - base['medium']:+.4f} | {row['hard'] - base['hard']:+.4f}"
        print(
            f"| {row['steps']} | {row['easy']:.4f} | {row['medium']:.4f} | {row['hard']:.4f} | {deltas} | "
            f"{row['seconds']:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", nargs="*", default=list(DEFAULT_STEPS), help="'|'-separated step specs")
    parser.add_argument("--metrics", nargs="*", default=["recall@1", "map@r"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    parser.add_argument("--revisited-omniglot", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, checkpoint = load_model(args.checkpoint, torch.device("cpu"))
    trained = config_from_checkpoint(checkpoint["config"], args.checkpoint)
    distance = trained.eval.eval_distance
    test, test_labels, annotations = embed_split(model, checkpoint, "test")
    train, _, _ = embed_split(model, checkpoint, "train")
    assert annotations.is_query is None, "this script evaluates leave-one-out splits"
    n = len(test)
    print(
        f"{trained.data.dataset.name} test: {n} items, {int(test_labels.unique().numel())} classes, "
        f"d = {test.shape[1]}, {distance}; pcaw fitted on {len(train)} training items"
    )
    rows = []
    for spec in args.steps:
        steps = [s for s in spec.split("|") if s]
        watch = LargestTensor()
        started = time.perf_counter()
        with watch:
            scored = rerank.evaluate(
                test, test_labels, steps=steps, metrics=args.metrics, distance=distance, fit_embeddings=train
            )
        seconds = time.perf_counter() - started
        row = {
            "steps": " → ".join(steps) or "none",
            **{name: float(scored.metrics[name]) for name in args.metrics},
            "seconds": seconds,
            "largest_tensor": watch.largest,
            "largest_over_n2": watch.largest / (n * n),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print()
    print(
        "| steps | "
        + " | ".join(args.metrics)
        + " | Δ "
        + " | Δ ".join(args.metrics)
        + " | time s | largest tensor (elements) | / n² |"
    )
    print("|---|" + "---:|" * (2 * len(args.metrics) + 3))
    for row in rows:
        values = " | ".join(f"{row[m]:.4f}" for m in args.metrics)
        deltas = " | ".join(f"{row[m] - base[m]:+.4f}" for m in args.metrics)
        print(
            f"| {row['steps']} | {values} | {deltas} | {row['seconds']:.2f} | {row['largest_tensor']:,} "
            f"| {row['largest_over_n2']:.3f} |"
        )
    revisited = None
    if args.revisited_omniglot is not None:
        print()
        revisited = run_revisited(model, checkpoint, args.revisited_omniglot, args.steps, train, distance)
    if args.out:
        out = {"items": n, "distance": distance, "rows": rows, "revisited": revisited}
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
