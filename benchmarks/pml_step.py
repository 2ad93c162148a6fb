"""Study 2's speed, measured alone: the training step of each dmlkit-vs-PML pair of ``pml.yaml``.

    python benchmarks/pml_step.py --threads 1 [--rounds 5] [--steps 20]

The sweep's images/s (``history.jsonl``) is made while other runs share the machine, and the loss and miner
are a small part of a ``small_cnn`` step, so its pairs differ by noise. This measures the same thing without
the noise: for each level of ``benchmarks/sweeps/pml.yaml`` (the configuration the sweep trains, built by
``SweepSpec.config``), the whole training step of ``dmlkit train`` (model forward, miner, loss, backward,
optimizer step; ``build_model``, ``build_objective``, ``build_optimizer``) on real Omniglot batches (32
background characters × 4 drawings), and apart from it the objective alone (miner + loss, forward +
backward, on the step's embeddings). The 9 pairs are timed in a fresh random order in each round, every
level running ``--steps`` steps per round after one warm-up step, each pair's two sides in adjacent blocks;
the median step over all rounds gives images/s, and the ratios are the median over rounds of the two
adjacent blocks' ratio (a slow spell of the machine hits both sides of a pair). Prints a Markdown table: per
pair, each side's images/s and objective time, and the ratios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dmlkit import models
from dmlkit.sweep.spec import load_spec
from dmlkit.train.objective import build_objective
from dmlkit.train.optim import build_optimizer

SPEC = Path(__file__).resolve().parent / "sweeps" / "pml.yaml"


def omniglot_batches(
    path: Path, count: int, classes: int, per_class: int, num_classes: int, seed: int
) -> list[tuple]:
    """``count`` P × K batches (images in [0, 1], 1 × 28 × 28; labels 0 … ``num_classes`` − 1; indices) of
    the first ``num_classes`` characters of Omniglot's background split."""
    data = np.load(path)
    background = data["split"] == "background"
    images, labels = data["images"][background], data["label"][background]
    # as many classes as the sweep's training split (819): the proxy losses' size
    kept = np.unique(labels)[:num_classes]
    by_class = {rank: np.flatnonzero(labels == c) for rank, c in enumerate(kept)}
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        chosen = rng.choice(list(by_class), classes, replace=False)
        rows = np.concatenate([rng.choice(by_class[int(c)], per_class, replace=False) for c in chosen])
        x = torch.from_numpy(images[rows]).float().div_(255).unsqueeze(1)
        batch_labels = torch.tensor(chosen, dtype=torch.int64).repeat_interleave(per_class)
        batches.append((x, batch_labels, torch.from_numpy(rows)))
    return batches


class Level:
    """One level's model, objective and optimizer, built as ``dmlkit train`` builds them."""

    def __init__(self, label: str, value: dict, spec, num_classes: int) -> None:
        config = spec.config({"objective": value}, spec.seeds[0])
        torch.manual_seed(0)
        self.label = label
        self.model = models.build_model(**config.model.model_kwargs(), in_channels=1, image_size=28)
        self.objective = build_objective(config, num_classes, self.model.embedding_size)
        self.optimizer = build_optimizer(config.optim, self.model, self.objective)
        self.step_s: list[float] = []  # this block's
        self.objective_s: list[float] = []
        self.all_step_s: list[float] = []  # every round's
        self.all_objective_s: list[float] = []

    def step(self, batch: tuple) -> None:
        x, labels, indices = batch
        started = time.perf_counter()
        embeddings = self.model(x)
        value, _ = self.objective(embeddings, labels, indices)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        self.optimizer.step()
        self.step_s.append(time.perf_counter() - started)
        # the objective alone, on these embeddings as a leaf
        leaf = embeddings.detach().requires_grad_(True)
        started = time.perf_counter()
        value, _ = self.objective(leaf, labels, indices)
        value.backward()
        self.objective_s.append(time.perf_counter() - started)
        self.objective.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/omniglot/omniglot28.npz"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(SPEC)
    factor = spec.factors["objective"]
    num_classes = 819  # the sweep's training split: 964 background characters less 15 % for validation
    batches = omniglot_batches(args.data, args.steps, 32, 4, num_classes, seed=0)
    levels = [Level(label, value, spec, num_classes) for label, value in (factor.levels or {}).items()]
    for level in levels:  # one warm-up step each (allocations, first-call paths), not timed
        level.step(batches[0])
        level.step_s.clear()
        level.objective_s.clear()
    # each pair's two sides run in adjacent blocks (pairs in a fresh random order each round, the side that
    # goes first drawn too), so a slow spell of the machine hits both; the ratio is taken per round
    by_label = {level.label: level for level in levels}
    pairs = [
        (label, f"{label.rpartition(' / ')[0]} / PML") for label in by_label if label.endswith(" / dmlkit")
    ]
    ratios: dict[str, list[tuple[float, float]]] = {ours: [] for ours, _ in pairs}
    order = random.Random(0)
    for _ in range(args.rounds):
        order.shuffle(pairs)
        for ours, theirs in pairs:
            sides = [by_label[ours], by_label[theirs]]
            order.shuffle(sides)
            for level in sides:
                level.step_s.clear()
                level.objective_s.clear()
                for batch in batches:
                    level.step(batch)
            a, b = by_label[ours], by_label[theirs]
            ratios[ours].append(
                (
                    statistics.median(b.step_s) / statistics.median(a.step_s),
                    statistics.median(b.objective_s) / statistics.median(a.objective_s),
                )
            )
            for level in (a, b):
                level.all_step_s += level.step_s
                level.all_objective_s += level.objective_s
    by_label = {level.label: level for level in levels}
    batch_size = len(batches[0][1])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {batch_size}, ", end="")
    print(f"{args.rounds} rounds × {args.steps} steps per level; median step over all rounds; ratios: the")
    print("median over rounds of the ratio of each pair's two adjacent blocks")
    print()
    head = ["loss", "images/s dmlkit", "images/s PML", "dmlkit / PML"]
    head += ["objective ms dmlkit", "objective ms PML", "PML / dmlkit"]
    print("| " + " | ".join(head) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for ours, theirs in sorted(pairs):
        a, b = by_label[ours], by_label[theirs]
        speed = [batch_size / statistics.median(level.all_step_s) for level in (a, b)]
        objective_ms = [1000 * statistics.median(level.all_objective_s) for level in (a, b)]
        step_ratio = statistics.median(r[0] for r in ratios[ours])
        objective_ratio = statistics.median(r[1] for r in ratios[ours])
        cells = [ours.rpartition(" / ")[0], f"{speed[0]:.0f}", f"{speed[1]:.0f}", f"{step_ratio:.3f}"]
        cells += [f"{ms:.2f}" for ms in objective_ms] + [f"{objective_ratio:.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
