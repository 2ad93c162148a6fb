"""The backfill simulator at scale: 1,000,000 synthetic gallery vectors (d = 128) per model, a faiss backend.

    python benchmarks/upgrade_scale.py --gallery 1000000 --queries 1000 --steps 10 --backend faiss-flat

Synthetic data: ``--classes`` class centres on the unit sphere; an item is its centre plus Gaussian noise,
embedded by the old model as ``normalize(x + noise_old)`` and by the new one as ``normalize(R·x +
noise_new)`` (R a random rotation: the spaces are incompatible; the new model is less noisy). Queries are
further items of the same classes (query/gallery protocol). Methods ``old``, ``rank-merge`` and
``new-naive``; metrics recall@1 and map@100 (k = 100). Prints the time per step of each method's searches
(both parts and the merge), the simulation's total, and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from dmlkit.upgrade import simulate


def synthetic(
    gallery: int, queries: int, classes: int, dim: int, seed: int, noise: tuple[float, float]
) -> tuple[simulate.BackfillInputs, float]:
    """Old and new embeddings of a clustered gallery and query set, generated in chunks (float32)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    started = time.perf_counter()

    def embed(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.randint(classes, (n,), generator=generator)
        old = torch.empty(n, dim)
        new = torch.empty(n, dim)
        for start in range(0, n, 100_000):
            end = min(n, start + 100_000)
            x = centres[labels[start:end]]
            old[start:end] = F.normalize(
                x + noise[0] * torch.randn(end - start, dim, generator=generator), dim=1
            )
            new[start:end] = F.normalize(
                x @ rotation.T + noise[1] * torch.randn(end - start, dim, generator=generator), dim=1
            )
        return old, new, labels

    g_old, g_new, g_labels = embed(gallery)
    q_old, q_new, q_labels = embed(queries)
    inputs = simulate.BackfillInputs(
        old=simulate.Side(q_old, g_old),
        query_labels=q_labels,
        gallery_labels=g_labels,
        leave_one_out=False,
        new=simulate.Side(q_new, g_new),
    )
    return inputs, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--noise", type=float, nargs=2, default=(0.16, 0.12), help="per-dimension σ, old new")
    parser.add_argument("--backend", default="faiss-flat")
    parser.add_argument("--methods", nargs="+", default=["old", "rank-merge", "new-naive"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs, made = synthetic(args.gallery, args.queries, args.classes, args.dim, 0, tuple(args.noise))
    print(f"data: {args.gallery:,} gallery × {args.dim} per model, {args.queries:,} queries ({made:.1f} s)")
    started = time.perf_counter()
    report = simulate.simulate(
        inputs, args.methods, steps=args.steps, metrics=("recall@1", "map@100"), k=100, backend=args.backend
    )
    total = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(report.table())
    print("\n| method | search s/step (mean) | slowest step s |\n|---|---:|---:|")
    for name, curve in report.curves.items():
        seconds = curve.search_seconds
        print(f"| {name} | {sum(seconds) / len(seconds):.2f} | {max(seconds):.2f} |")
    print(
        f"\nsimulation: {total:.0f} s for {args.steps + 1} steps × {len(args.methods)} methods "
        f"(metrics included); peak resident memory {peak_gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()
