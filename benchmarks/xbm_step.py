"""Extra cost of a cross-batch memory per training step: the objective's forward + backward time and
its extra memory, without and with a full memory, for the losses of the XBM measurement.

    python benchmarks/xbm_step.py --threads 1

The model's own forward and backward pass does not change with a memory, so the difference between
the rows is the memory's whole extra step time. Memory = the stored buffers (embeddings, int64 labels and
indices) plus the ``B × M`` matrices the loss and its backward pass hold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dmlkit import losses
from dmlkit.memory import CrossBatchMemory
from dmlkit.train.objective import Objective

LOSSES = {
    "contrastive": ("contrastive", {"pos_margin": 1.0, "neg_margin": 0.5, "distance": "cosine"}),
    "multi-similarity": ("multisimilarity", {}),
}


def step_ms(name: str, batch: int, dim: int, memory_size: int, repeats: int) -> float:
    loss_name, kwargs = LOSSES[name]
    memory = CrossBatchMemory(memory_size, dim) if memory_size else None
    objective = Objective(losses.build(loss_name, **kwargs), memory=memory)
    gen = torch.Generator().manual_seed(0)
    if memory is not None:
        memory.enqueue(
            torch.randn(memory_size, dim, generator=gen),
            torch.randint(0, memory_size // 20 + 1, (memory_size,), generator=gen),
            torch.arange(memory_size),
        )
    times = []
    for _ in range(repeats):
        x = torch.randn(batch, dim, generator=gen, requires_grad=True)
        labels = torch.randint(0, memory_size // 20 + 1, (batch // 4,), generator=gen).repeat_interleave(4)
        indices = torch.randint(0, max(memory_size, 1), (batch,), generator=gen)
        started = time.perf_counter()
        value, _ = objective(x, labels, indices)
        value.backward()
        times.append(time.perf_counter() - started)  # the batch was enqueued: the memory stays full
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 1542, 15420, 60000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| loss | d | memory items | stored MiB | objective fwd+bwd ms (median) |")
    print("|---|---|---|---|---|")
    for name in LOSSES:
        for dim in args.dims:
            for size in args.sizes:
                ms = step_ms(name, args.batch_size, dim, size, args.repeats)
                mib = size * (dim * 4 + 16) / 2**20
                print(f"| {name} | {dim} | {size:,} | {mib:.1f} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
