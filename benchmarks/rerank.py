"""Re-ranking and post-processing steps on a trained checkpoint's test split: effect, time and memory.

    python benchmarks/rerank.py --checkpoint RUN/best.pt [--steps "aqe:k=2,alpha=3" ...] [--out FILE.json]

The checkpoint's test split (its dataset, data root and recorded preprocessing) and its training split
(what ``pcaw`` is fitted on) are embedded once; then each step list is evaluated under the split's protocol
(:func:`dmlkit.search.rerank.evaluate`, the code path of ``dmlkit eval --rerank``), timed, and its peak
memory measured: the largest tensor any torch operation returned while it ran (a TorchDispatchMode, as the
O(n·k) tests do), set against the n × n a dense re-ranking would hold. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dmlkit import data as data_lib
from dmlkit.config import config_from_checkpoint
from dmlkit.inference import compute_embeddings, load_model
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", nargs="*", default=list(DEFAULT_STEPS), help="'|'-separated step specs")
    parser.add_argument("--metrics", nargs="*", default=["recall@1", "map@r"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
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
    if args.out:
        Path(args.out).write_text(json.dumps({"items": n, "distance": distance, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
