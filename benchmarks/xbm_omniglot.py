"""XBM on Omniglot zero-shot: contrastive / multi-similarity, with and without a cross-batch memory.

Train on the 964 background characters (20% of them held out, class-disjoint, for validation and
checkpoint selection), leave-one-out retrieval on the 659 evaluation characters (13,180 queries). Every
configuration uses the same model, batch size, iteration count and seeds; the table reports R@1 and
MAP@R as mean ± std over the seeds, the training time per iteration and the memory's size.

    python benchmarks/xbm_omniglot.py --data ../shared/data/omniglot/omniglot28.npz --seeds 0 1 2

Writes the table to stdout (Markdown) and every run's numbers to ``--out`` (JSON).

Two contrastive forms are compared: PML's default reduction (``avg_non_zero``: each of the positive and
negative terms is the mean over its active pairs) and the XBM paper's (a sum over pairs, divided by the
batch size; with Adam the constant divisor does not matter, so ``reduction="sum"``). With the mean, the
memory's thousands of extra negatives replace the batch's in an average, so their share of the gradient
does not grow; with the sum it grows with their number.

Feature drift (the paper's Fig. 3) is measured at the last iteration of each memory run: the stored
embedding of each memory item against the same item embedded by the current model, as a cosine
similarity, by the item's age in iterations. Stored embeddings were taken in training mode, the fresh
ones in eval mode, so age 0 shows that gap and older ages show drift on top of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from dmlkit.config import make_config
from dmlkit.inference import compute_embeddings
from dmlkit.train.loop import Trainer

# The XBM paper's contrastive loss: cosine similarity, positives pulled to 1, negatives pushed below 0.5.
CONTRASTIVE = {
    "loss": "contrastive",
    "loss_args": {"pos_margin": 1.0, "neg_margin": 0.5, "distance": "cosine"},
}
MULTISIMILARITY = {"loss": "multisimilarity", "loss_args": {}}

CONTRASTIVE_SUM = {
    "loss": "contrastive",
    "loss_args": {**CONTRASTIVE["loss_args"], "reduction": "sum"},
}

CONFIGS: dict[str, dict[str, Any]] = {
    "contrastive": {**CONTRASTIVE},
    "contrastive + XBM (ratio 1.0)": {**CONTRASTIVE, "xbm_size": 1.0},
    "contrastive + XBM (ratio 0.1)": {**CONTRASTIVE, "xbm_size": 0.1},
    "contrastive, paper's sum": {**CONTRASTIVE_SUM},
    "contrastive, paper's sum + XBM (ratio 1.0)": {**CONTRASTIVE_SUM, "xbm_size": 1.0},
    "contrastive, paper's sum + XBM (ratio 0.1)": {**CONTRASTIVE_SUM, "xbm_size": 0.1},
    "multi-similarity": {**MULTISIMILARITY},
    "multi-similarity + XBM (ratio 1.0)": {**MULTISIMILARITY, "xbm_size": 1.0},
}
#: Ablations (run with --configs): the memory term of the sum-reduced loss down-weighted.
ABLATIONS: dict[str, dict[str, Any]] = {
    "contrastive, paper's sum + XBM (ratio 1.0, weight 0.1)": {
        **CONTRASTIVE_SUM,
        "xbm_size": 1.0,
        "xbm_weight": 0.1,
    },
}

#: Age buckets (iterations since the item was stored) for the drift measurement.
DRIFT_AGES = [(0, 1), (1, 10), (10, 40), (40, 80), (80, 1_000_000)]


def measure_drift(trainer: Trainer, batch_size: int) -> dict[str, float]:
    """Mean cosine similarity between stored and freshly computed embeddings, by age bucket."""
    memory = trainer.objective.memory
    stored, _, indices = memory.ordered()
    fresh, _ = compute_embeddings(
        trainer.model, Subset(trainer.train_set, indices.tolist()), batch_size=512, device=trainer.device
    )
    cosine = F.cosine_similarity(stored.float(), fresh, dim=1)
    age = (len(indices) - 1 - torch.arange(len(indices))) // batch_size  # newest batch: age 0
    out = {}
    for low, high in DRIFT_AGES:
        chosen = (age >= low) & (age < high)
        if chosen.any():
            out[f"drift_cos_age_{low}_{high}"] = float(cosine[chosen].mean())
    return out


def run_one(name: str, overrides: dict[str, Any], seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    batches_per_epoch = args.iterations // args.epochs
    config = make_config(
        {
            "name": f"{''.join(c if c.isalnum() else '_' for c in name)}-s{seed}",
            "output_dir": str(workdir),
            "dataset": "omniglot",
            "data_root": args.data,
            "seed": seed,
            "epochs": args.epochs,
            "sampler_args": {"batches_per_epoch": batches_per_epoch},
            "batch_size": args.batch_size,
            "samples_per_class": 4,
            "embedding_size": 64,
            "lr": 1e-3,
            "warmup_epochs": 0.5,
            "val_every": 1,
            "metrics": ["recall@1", "map@r"],
            "select_metric": "map@r",
            "progress": False,
            "xbm_start": args.xbm_start,
            "xbm_weight": 1.0,
            **overrides,
        }
    )
    started = time.perf_counter()
    drift: dict[str, float] = {}
    total_steps = batches_per_epoch * args.epochs

    def drift_hook(trainer: Trainer, step: int) -> None:
        if step == total_steps and trainer.objective.memory is not None:
            was_training = trainer.model.training
            drift.update(measure_drift(trainer, args.batch_size))
            trainer.model.train(was_training)

    trainer = Trainer(config, step_hooks=[drift_hook])
    result = trainer.run()
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    train_seconds = sum(r["epoch_time_s"] for r in rows)
    # step time once the memory is in use and (ratio 1.0) full: the last two epochs
    late = rows[-2:]
    memory = trainer.objective.memory
    return {
        "config": name,
        "seed": seed,
        "recall@1": result.after["recall@1"],
        "map@r": result.after["map@r"],
        "recall@1_before": result.before["recall@1"],
        "best_epoch": result.best_epoch,
        "iterations": trainer.global_step,
        "ms_per_iteration": 1000 * train_seconds / max(trainer.global_step, 1),
        "ms_per_iteration_late": 1000
        * sum(r["epoch_time_s"] for r in late)
        / (batches_per_epoch * len(late)),
        **drift,
        "memory_items": len(memory) if memory is not None else 0,
        "memory_mib": (memory.embeddings.numel() * memory.embeddings.element_size() / 2**20)
        if memory
        else 0.0,
        "valid_neg_pairs_batch": statistics.fmean(
            r.get("xbm/valid_neg_pairs_batch", float("nan")) for r in rows
        ),
        "valid_neg_pairs_memory": statistics.fmean(r.get("xbm/valid_neg_pairs_memory", 0.0) for r in rows),
        "wall_s": time.perf_counter() - started,
    }


def pairs_cell(group: list[dict]) -> str:
    if not group[0]["memory_items"]:
        return "–"
    batch = statistics.fmean(r["valid_neg_pairs_batch"] for r in group)
    memory = statistics.fmean(r["valid_neg_pairs_memory"] for r in group)
    return f"{batch:.0f} · {memory:.0f}"


def drift_cell(group: list[dict]) -> str:
    cells = []
    for low, high in DRIFT_AGES:
        values = [r[f"drift_cos_age_{low}_{high}"] for r in group if f"drift_cos_age_{low}_{high}" in r]
        cells.append(f"{statistics.fmean(values):.3f}" if values else "–")
    return " · ".join(cells) if any(c != "–" for c in cells) else "–"


def summarise(runs: list[dict]) -> str:
    def mean_std(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"

    lines = [
        "| configuration | R@1 | MAP@R | ms / iteration (last 2 epochs) | memory items (MiB) "
        "| valid neg. pairs / it. (batch · memory) "
        "| drift: cos(stored, now) at age 0 · 1–9 · 10–39 · 40–79 · ≥80 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in [*CONFIGS, *ABLATIONS]:
        group = [r for r in runs if r["config"] == name]
        if not group:
            continue
        lines.append(
            f"| {name} | {mean_std([r['recall@1'] for r in group])} | "
            f"{mean_std([r['map@r'] for r in group])} | "
            f"{statistics.fmean(r.get('ms_per_iteration_late', r['ms_per_iteration']) for r in group):.1f} | "
            f"{group[0]['memory_items']} ({group[0]['memory_mib']:.2f}) | "
            f"{pairs_cell(group)} | "
            f"{drift_cell(group)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="omniglot28.npz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--xbm-start", type=int, default=200)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *ABLATIONS])
    parser.add_argument("--out", default="benchmarks/results/xbm_omniglot.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.configs:
                runs.append(run_one(name, {**CONFIGS, **ABLATIONS}[name], seed, args, Path(tmp)))
                out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
                print(json.dumps(runs[-1]), flush=True)
    print(summarise(runs))


if __name__ == "__main__":
    main()
