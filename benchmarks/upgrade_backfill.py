"""Model upgrades end to end, from the command line: train the old and new models, a BCT model, a
metric-compatible model and the reverse transformation ρ, then simulate online backfilling; seeds averaged.

    python benchmarks/upgrade_backfill.py --setting omniglot --seeds 0 1 2 --out runs/upgrade
    python benchmarks/upgrade_backfill.py --setting omniglot-extended --seeds 0 1 2 --out runs/upgrade
    python benchmarks/upgrade_backfill.py --setting clothing --root ../shared/data/clothing --seeds 0 1 2

Settings (every model is trained with ``dmlkit train`` / ``dmlkit upgrade``, no validation split):

- ``omniglot``: homogeneous upgrade, ``small_cnn`` widths 16,32,32,32 → 32,64,128,128 (128-d embeddings),
  trained on the 964 background characters, evaluated on the 659 evaluation characters (leave-one-out);
- ``omniglot-extended``: the same, the old model trained on half of the training classes
  (``--train-classes 0.5``), the new ones on all of them;
- ``clothing``: heterogeneous upgrade on the clothing photos, MobileNetV2 → EfficientNet-Lite0, each from its
  offline ImageNet weights and fine-tuned (pooled 1280-d features, no head), 9 classes trained, the other 9
  evaluated.

``compatible`` is trained jointly with the new model (``train-compatible``); ``compatible (after)`` is the
same loss on heads trained after it (``train-compatible --mode after``), simulated apart with the same
order. Per seed: ``upgrade simulate`` with 20 steps (the fractions 0, 0.05, ..., 1 include 0.25 and
0.75); the AUC is the trapezoid over t ∈ {0, 0.1, ..., 1} (every other step), as the paper defines it.
Prints markdown tables (mean ± std over seeds) and writes ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from dmlkit.cli import main as dmlkit
from dmlkit.upgrade.simulate import auc

SETTINGS: dict[str, dict[str, Any]] = {
    "omniglot": {
        "data": shlex.split("--dataset omniglot"),
        "common": shlex.split("--embedding-size 128 --epochs 4 --batch-size 128 --lr 1e-3"),
        "old": shlex.split("--backbone small_cnn --backbone-args '{widths: [16, 32, 32, 32]}'"),
        "new": shlex.split("--backbone small_cnn --backbone-args '{widths: [32, 64, 128, 128]}'"),
        "old_extra": [],
        "metrics": "map@100,recall@1,map@r",
    },
    "clothing": {
        "data": shlex.split(
            "--dataset csv --dataset-args "
            "'{exclude_labels: [Not sure, Skip], test_classes: 0.5, image_size: 224}'"
        ),
        "common": shlex.split(
            "--embedding-size 0 --epochs 2 --batch-size 32 --lr 1e-4 --freeze-bn --trainable-blocks 2 "
            "--eval-batch-size 64"
        ),
        "old": shlex.split("--backbone torchvision:mobilenet_v2 --pretrained-weights package:mobilenet_v2"),
        "new": shlex.split(
            "--backbone timm:tf_efficientnet_lite0 --pretrained-weights package:efficientnet-lite0"
        ),
        "old_extra": [],
        "metrics": "map@1000,recall@1,map@r",
    },
}
SETTINGS["omniglot-extended"] = {**SETTINGS["omniglot"], "old_extra": ["--train-classes", "0.5"]}
STEPS = 20
SHOWN = (0.0, 0.25, 0.5, 0.75, 1.0)


def run(argv: list[str]) -> None:
    started = time.perf_counter()
    code = dmlkit([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"dmlkit {' '.join(map(str, argv))}: exit {code}")
    words = [str(a) for a in argv]
    label = " ".join(words[:2] if words[0] == "upgrade" else words[:1])
    if "--name" in words:
        label += f" {words[words.index('--name') + 1]}"
    print(f"  {label}: {time.perf_counter() - started:.0f} s", flush=True)


def one_seed(
    setting: dict[str, Any], root: str | None, seed: int, out: Path, reuse: bool = False
) -> dict[str, Any]:
    """Train every model of one seed and simulate; with ``reuse``, a run whose ``results.json`` exists (it
    finished, test evaluation included) is kept, so a killed benchmark resumes at the step it stopped in."""
    folder = out / f"seed{seed}"
    data = setting["data"] + (["--data-root", root] if root else [])
    common = [*data, *setting["common"], *f"--seed {seed} --val-fraction 0 --no-progress --overwrite".split()]
    common += ["--output-dir", folder]
    old, new, bct, comp = (folder / name for name in ("old", "new", "bct", "compatible"))
    transform, report = folder / "transform.pt", folder / "backfill.json"
    if not _finished(old, reuse):
        run(["train", *common, *setting["old"], *setting["old_extra"], "--name", "old"])
    if not _finished(new, reuse):
        run(["train", *common, *setting["new"], "--name", "new"])
    if not _finished(bct, reuse):
        run(["upgrade", "train-bct", "--old", old, *common, *setting["new"], "--name", "bct"])
    if not _finished(comp, reuse):
        run(["upgrade", "train-compatible", "--old", old, *common, *setting["new"], "--name", "compatible"])
    quiet = ["--no-progress", "--device", "cpu", "--seed", seed]
    if not (reuse and transform.exists()):
        run(["upgrade", "train-transform", "--old", old, "--new", new, "--out", transform, *quiet])
    models = ["--old", old, "--new", new, "--transform", transform, "--bct", bct, "--compatible", comp]
    outputs = ["--json", report, "--plot", folder / "backfill.png", "--metrics", setting["metrics"]]
    run(["upgrade", "simulate", *models, "--steps", STEPS, *outputs, *quiet])
    return json.loads(report.read_text())


def _finished(run_dir: Path, reuse: bool) -> bool:
    return reuse and (run_dir / "results.json").exists()


def compatible_after(setting: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """The curve of metric-compatible heads trained *after* the new model (``--mode after``), simulated
    with the same order and steps; merged into the seed's report as ``compatible (after)``."""
    folder = out / f"seed{seed}"
    report = folder / "backfill_after.json"
    if not report.exists():
        old, new, heads = folder / "old", folder / "new", folder / "heads_after.pt"
        run(["upgrade", "train-compatible", "--mode", "after", "--old", old, "--new", new, "--out", heads,
             "--seed", seed])  # fmt: skip
        models = ["--old", old, "--new", new, "--compatible", new, "--compatible-heads", heads]
        outputs = ["--json", report, "--metrics", setting["metrics"], "--methods", "compatible"]
        quiet = ["--no-progress", "--device", "cpu", "--seed", seed]
        run(["upgrade", "simulate", *models, "--steps", STEPS, *outputs, *quiet])
    return json.loads(report.read_text())["curves"]["compatible"]


def per_method(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The closing table's numbers of one seed's report."""
    primary = report["metrics"][0]
    fractions = report["fractions"]
    tenths = [j for j, t in enumerate(fractions) if abs(t * 10 - round(t * 10)) < 1e-9]
    grid = report["grid"]
    rows: dict[str, dict[str, float]] = {}
    for name, curve in report["curves"].items():
        values = curve["values"][primary]
        area = auc([fractions[j] for j in tenths], [values[j] for j in tenths])
        old, new = grid["old/old"][primary], grid["new/new"][primary]
        row = {
            "old/old": old,
            "new/old": _num(grid["new/old"][primary]),
            "new/new": new,
            **{f"t={t:g}": values[round(t * (len(fractions) - 1))] for t in SHOWN},
            "AUC": area,
            "relative gain": (area - old) / (new - old) if new != old else math.nan,
            "worst NFR": max(_num(x) for x in curve["negative_flip_rate"]),
            "passes/query": curve["forward_passes"],
            "search s/step": statistics.fmean(curve["search_seconds"]),
            "monotone": float(all(b >= a - 1e-9 for a, b in itertools.pairwise(values))),
            "never below old/old": float(min(values) >= old - 1e-9),
        }
        rows[name] = row
    return rows


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def table(seeds: list[dict[str, dict[str, float]]], primary: str) -> str:
    methods = list(seeds[0])
    columns = list(seeds[0][methods[0]])
    lines = [f"| method | {' | '.join(columns)} |", "|---|" + "---:|" * len(columns)]
    for method in methods:
        cells = []
        for column in columns:
            values = [s[method][column] for s in seeds]
            if column in ("monotone", "never below old/old"):
                cells.append(f"{sum(values):.0f}/{len(values)}")
            elif column == "passes/query":
                cells.append(f"{values[0]:g}")
            else:
                mean = statistics.fmean(values)
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{mean:.4f} ± {spread:.4f}")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return f"{primary}, mean ± std over {len(seeds)} seed(s)\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=list(SETTINGS), required=True)
    parser.add_argument("--root", default=None, help="the dataset folder or file (clothing: its folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/upgrade"))
    parser.add_argument(
        "--no-after",
        action="store_true",
        help="skip 'compatible (after)' (heads trained after the new model)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep every finished step (trained runs, ρ, backfill.json) of an earlier call",
    )
    args = parser.parse_args()
    out = args.out / args.setting
    reports = []
    for seed in args.seeds:
        done = out / f"seed{seed}" / "backfill.json"
        if args.reuse and done.exists():
            print(f"seed {seed}: reusing {done}")
            reports.append(json.loads(done.read_text()))
        else:
            reports.append(one_seed(SETTINGS[args.setting], args.root, seed, out, args.reuse))
        if args.no_after:
            reports[-1]["curves"].pop("compatible (after)", None)
        else:
            reports[-1]["curves"]["compatible (after)"] = compatible_after(SETTINGS[args.setting], seed, out)
    rows = [per_method(report) for report in reports]
    text = table(rows, reports[0]["metrics"][0])
    print(text)
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")
    (out / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
