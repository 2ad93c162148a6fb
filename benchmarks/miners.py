"""Time of one call of dmlkit's miners against pytorch-metric-learning (PML), issue 4.

For every miner, on the same inputs and with the default hyperparameters of both libraries::

    python benchmarks/miners.py                       # CPU, 2 threads, every row; prints a Markdown table
    python benchmarks/miners.py --write BENCHMARKS.md # also writes the table into BENCHMARKS.md
    python benchmarks/miners.py --device cuda --threads 8
    python benchmarks/miners.py --miners semihard --settings ref --repeats 1

Miners (ours: ``dmlkit.miners.build(name)``; PML: ``pytorch_metric_learning.miners``):
``batch_hard`` / ``BatchHardMiner()``, ``triplet_margin`` with ``type_of_triplets="semihard"`` /
``TripletMarginMiner(type_of_triplets="semihard")`` (margin 0.2), ``multisimilarity`` /
``MultiSimilarityMiner()`` (cosine, epsilon 0.1) and ``distance_weighted`` / ``DistanceWeightedMiner()``
(cutoff 0.5, nonzero_loss_cutoff 1.4); both sides are called as ``miner(emb, labels, ref_emb, ref_labels)``.

Settings: ``b112`` and ``b256`` (B=112 / 256, D=128, B/4 classes of 4 samples, the batch is its own
reference set) and ``ref`` (B=112, D=128 against a 60,000 × 128 reference set of ``--ref-classes``
classes of equal size, default 10,000 classes of 6, about Stanford Online Products' 59,551 training
images of 11,318 products: the cross-batch-memory case; the batch's 28 classes are among the reference
set's). Embeddings are standard normal, seeded (an untrained network: every pair is about √2 apart
after normalisation, which is where semi-hard and multi-similarity mining return the most tuples).

Before timing, every deterministic miner must return the same set of tuples on both sides (pairs: the
sets of positive and of negative pairs; triplets: the set of triplets; with the same counts, so no
duplicate is lost or added): a row that disagrees aborts the run. ``distance_weighted`` draws random
tuples, so only the output's kind (triplets), dtypes, shapes and validity (anchor and positive share a
label, the negative does not, no anchor is its own positive) are checked on both sides.

Our miners compute their statistics (``last_stats``) lazily when read; the benchmark never reads them,
so the timed region holds the mining only (PML's miners collect no statistics by default either).
The two sides run in interleaved blocks (``benchmarks/common.py``), the whole comparison is repeated
``--repeats`` times, and the table gives the median over repeats of each side's median time per call
and of the median PML/ours ratio of adjacent blocks. A comparison whose blocks are noisy (interquartile
range above ``--max-spread`` of the median on either side) is run again, up to ``--retries`` times, and
the least noisy attempt is kept. The process's data segment is capped (``--mem-limit-gb``) so that a
side needing more memory than the shared machine has fails cleanly.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (set it in the environment to override): on a machine
whose cores are busy with other jobs, OpenMP's default spin-waiting lets an idle worker thread compete
with the main thread for a core, and a call of well under a millisecond then takes 10–200 ms at random
(measured with 2 threads on the shared 2-core machine); passive waiting gives stable times. Both sides
run under the same setting.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when libgomp loads: before importing torch

import argparse
import datetime
import gc
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, fmt_ms, is_out_of_memory, limit_memory, machine_description, replace_section

import dmlkit
from dmlkit import miners as dml_miners

try:
    import pytorch_metric_learning
    from pytorch_metric_learning import miners as pml_miners
except ImportError as e:  # pragma: no cover - the benchmark needs PML
    raise SystemExit(f"benchmarks/miners.py needs pytorch-metric-learning: {e}") from None

SECTION = "## Miners vs pytorch-metric-learning"
TARGET = 1.5
BATCH_CLASS_POOL = 100  # label pool of the batch-only settings
SAMPLES_PER_CLASS = 4


@dataclass(frozen=True)
class Row:
    """One miner: its label, our factory, PML's factory, and whether it is deterministic."""

    label: str
    ours: Callable[[], nn.Module]
    pml: Callable[[], nn.Module]
    deterministic: bool = True


ROWS: dict[str, Row] = {
    "batch_hard": Row(
        "batch_hard", lambda: dml_miners.build("batch_hard"), lambda: pml_miners.BatchHardMiner()
    ),
    "semihard": Row(
        "triplet_margin (semihard)",
        lambda: dml_miners.build("triplet_margin", type_of_triplets="semihard"),
        lambda: pml_miners.TripletMarginMiner(type_of_triplets="semihard"),
    ),
    "multisimilarity": Row(
        "multisimilarity",
        lambda: dml_miners.build("multisimilarity"),
        lambda: pml_miners.MultiSimilarityMiner(),
    ),
    "distance_weighted": Row(
        "distance_weighted",
        lambda: dml_miners.build("distance_weighted"),
        lambda: pml_miners.DistanceWeightedMiner(),
        deterministic=False,
    ),
}


@dataclass(frozen=True)
class Setting:
    key: str
    batch: int
    dim: int
    ref_size: int = 0

    def label(self, ref_classes: int) -> str:
        text = f"B={self.batch}, D={self.dim}"
        if self.ref_size:
            text += f", ref {self.ref_size:,} ({ref_classes:,} classes)"
        return text


SETTINGS: dict[str, Setting] = {
    "b112": Setting("b112", 112, 128),
    "b256": Setting("b256", 256, 128),
    "ref": Setting("ref", 112, 128, 60_000),
}


def make_inputs(setting: Setting, ref_classes: int, seed: int, device: torch.device) -> dict[str, Any]:
    """Embeddings (B × D, standard normal), labels (B/4 classes × 4), optional reference set."""
    g = torch.Generator().manual_seed(seed)
    pool = ref_classes if setting.ref_size else BATCH_CLASS_POOL
    num_classes = setting.batch // SAMPLES_PER_CLASS
    if num_classes > pool:
        raise SystemExit(f"{setting.key}: {num_classes} batch classes but only {pool} labels")
    classes = torch.randperm(pool, generator=g)[:num_classes]
    labels = classes.repeat_interleave(SAMPLES_PER_CLASS)[torch.randperm(setting.batch, generator=g)]
    out: dict[str, Any] = {
        "emb": torch.randn(setting.batch, setting.dim, generator=g).to(device),
        "labels": labels.to(device),
        "ref_emb": None,
        "ref_labels": None,
    }
    if setting.ref_size:
        if setting.ref_size % ref_classes:
            raise SystemExit(f"--ref-classes {ref_classes} does not divide {setting.ref_size}")
        per_class = setting.ref_size // ref_classes
        ref_labels = torch.arange(ref_classes).repeat_interleave(per_class)
        out["ref_labels"] = ref_labels[torch.randperm(setting.ref_size, generator=g)].to(device)
        out["ref_emb"] = torch.randn(setting.ref_size, setting.dim, generator=g).to(device)
    return out


# ---------------------------------------------------------------------------------------------- checks


def _keys(columns: tuple[torch.Tensor, ...], width: int) -> torch.Tensor:
    """Sorted int64 keys encoding each row of parallel index columns (each index < 2**width)."""
    key = torch.zeros_like(columns[0], dtype=torch.long, device="cpu")
    for c in columns:
        key = key * (1 << width) + c.long().cpu()
    return torch.sort(key).values


def same_tuples(ours: tuple, theirs: tuple) -> str:
    """'' if both index tuples hold the same multiset of tuples (order aside), else what differs."""
    if len(ours) != len(theirs):
        return f"kinds differ: {len(ours)}-tuple vs {len(theirs)}-tuple"
    groups = [(0, 1, 2)] if len(ours) == 3 else [(0, 1), (2, 3)]
    names = ["triplets"] if len(ours) == 3 else ["positive pairs", "negative pairs"]
    for cols, name in zip(groups, names, strict=True):
        for t in (*ours, *theirs):
            assert t.numel() == 0 or int(t.max()) < (1 << 21), "indices too large for the 21-bit keys"
        ka = _keys(tuple(ours[i] for i in cols), 21)
        kb = _keys(tuple(theirs[i] for i in cols), 21)
        if ka.shape != kb.shape or not torch.equal(ka, kb):
            return f"{name}: ours {ka.numel():,}, PML {kb.numel():,}, not the same set"
    return ""


def check_kind(out: tuple, inputs: dict[str, Any], who: str) -> str:
    """'' if ``out`` is a valid triplet tuple for ``inputs``, else what is wrong."""
    if not isinstance(out, tuple | list) or len(out) != 3:
        return f"{who}: expected triplets (a, p, n), got {type(out).__name__} of length {len(out)}"
    if any(not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype != torch.long for t in out):
        return f"{who}: expected 1-D int64 tensors, got {[(t.dtype, tuple(t.shape)) for t in out]}"
    if len({t.numel() for t in out}) != 1:
        return f"{who}: mismatched lengths {[t.numel() for t in out]}"
    a, p, n = (t.cpu() for t in out)
    labels = inputs["labels"].cpu()
    ref = labels if inputs["ref_labels"] is None else inputs["ref_labels"].cpu()
    if a.numel() == 0:
        return f"{who}: no triplet mined"
    if not bool((labels[a] == ref[p]).all()) or not bool((labels[a] != ref[n]).all()):
        return f"{who}: a triplet's positive or negative has the wrong label"
    if inputs["ref_labels"] is None and bool((a == p).any()):
        return f"{who}: an anchor is its own positive"
    return ""


def describe(out: tuple) -> str:
    if len(out) == 3:
        return f"{out[0].numel():,} triplets"
    return f"{out[0].numel():,} pos + {out[2].numel():,} neg pairs"


# ---------------------------------------------------------------------------------------------- one row


def failure(error: BaseException) -> str:
    if is_out_of_memory(error):
        return "out of memory"
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


@dataclass
class Result:
    row: str
    setting: str
    ours_ms: float | None = None
    pml_ms: float | None = None
    speedup: float | None = None
    note: str = ""
    ours_runs: list[float] = field(default_factory=list)
    pml_runs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)
    reruns: int = 0


def _check_outputs(row: Row, outputs: dict[str, tuple], inputs: dict[str, Any], what: str) -> str:
    """The note of the equal-work check: deterministic miners return PML's very set, random ones tuples of
    the declared kind and shape."""
    note = describe(outputs["ours"])
    if row.deterministic:
        if "pml" in outputs:
            diff = same_tuples(outputs["ours"], outputs["pml"])
            if diff:
                raise AssertionError(f"{what}: the miners return different tuples: {diff}")
            note += ", same set as PML"
        return note
    for name, out in outputs.items():
        problem = check_kind(out, inputs, name)
        if problem:
            raise AssertionError(f"{what}: {problem}")
    if "pml" in outputs:
        note = f"{note} (PML {outputs['pml'][0].numel():,}); random draws, kinds checked"
    return note


def _least_noisy(
    fns: dict[str, Callable[[], object]], device: torch.device, args: argparse.Namespace, result: Result
) -> Any:
    """One comparison, re-run (up to ``--retries``) while its spread exceeds ``--max-spread``; the least
    noisy one."""
    comparison = None
    for attempt in range(args.retries + 1):
        candidate = compare(
            fns,
            device,
            warmup=args.warmup,
            min_block_s=args.min_block,
            budget_s=args.budget,
            clock=args.clock,
        )
        noise = max(candidate.spread(name) for name in fns)
        if comparison is None or noise < max(comparison.spread(name) for name in fns):
            comparison = candidate
        if noise <= args.max_spread:
            break
        result.reruns += attempt < args.retries
    return comparison


def run_row(row: Row, setting: Setting, args: argparse.Namespace, device: torch.device) -> Result:
    result = Result(row.label, setting.label(args.ref_classes))
    what = f"{row.label} / {result.setting}"
    inputs = make_inputs(setting, args.ref_classes, args.seed, device)
    torch.manual_seed(args.seed)
    ours, theirs = row.ours().to(device), row.pml().to(device)

    def call(miner: nn.Module) -> tuple:
        return miner(inputs["emb"], inputs["labels"], inputs["ref_emb"], inputs["ref_labels"])

    # one call each: the equal-work check (and a first warm-up); a failing side is reported, not timed
    outputs: dict[str, tuple] = {}
    errors: dict[str, str] = {}
    for name, miner in (("ours", ours), ("pml", theirs)):
        try:
            outputs[name] = call(miner)
        except (RuntimeError, MemoryError) as e:
            errors[name] = failure(e)
            gc.collect()
    if "ours" in errors:
        result.note = f"dmlkit: {errors['ours']}" + (f"; PML: {errors['pml']}" if "pml" in errors else "")
        return result
    notes = [_check_outputs(row, outputs, inputs, what)]
    del outputs
    gc.collect()

    fns: dict[str, Callable[[], object]] = {"ours": lambda: call(ours)}
    if "pml" not in errors:
        fns["pml"] = lambda: call(theirs)
    else:
        notes.insert(0, f"PML: {errors['pml']}")
    for _ in range(args.repeats):
        comparison = _least_noisy(fns, device, args, result)
        result.ours_runs.append(comparison.median("ours"))
        detail = f"{comparison.number}x{len(comparison.times['ours'])} ours ±{comparison.spread('ours'):.0%}"
        if "pml" in fns:
            result.pml_runs.append(comparison.median("pml"))
            result.ratios.append(comparison.ratio("pml", "ours"))
            detail += f" PML ±{comparison.spread('pml'):.0%} ratio {result.ratios[-1]:.2f}"
        result.detail.append(detail)
    if result.reruns:
        result.detail.append(f"{result.reruns} noisy comparison(s) re-run")
    result.ours_ms = 1e3 * statistics.median(result.ours_runs)
    if result.pml_runs:
        result.pml_ms = 1e3 * statistics.median(result.pml_runs)
        result.speedup = statistics.median(result.ratios)
    result.note = "; ".join(notes)
    return result


# ---------------------------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    lines = [
        "| miner | setting | ours ms | PML ms | speed-up | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        if r.speedup is not None:
            speed = f"{r.speedup:.2f}×" + ("" if r.speedup >= TARGET else f" (below {TARGET}×)")
            if len(r.ratios) > 1:
                speed += f" ({min(r.ratios):.2f}–{max(r.ratios):.2f})"
        elif r.ours_ms is not None:
            speed = "PML fails"
        else:
            speed = "—"
        lines.append(
            f"| {r.row} | {r.setting} | {fmt_ms(r.ours_ms)} | {fmt_ms(r.pml_ms)} | {speed} | {r.note} |"
        )
    return "\n".join(lines)


def report(
    args: argparse.Namespace,
    device: torch.device,
    command: str,
    load: str,
    markdown: str,
    results: list[Result],
) -> str:
    """The Markdown body of the BENCHMARKS.md section."""
    misses = [r for r in results if r.speedup is not None and r.speedup < TARGET]
    versions = (
        f"torch {torch.__version__}, pytorch-metric-learning {pytorch_metric_learning.__version__}, "
        f"dmlkit {getattr(dmlkit, '__version__', 'dev')}, Python {sys.version.split()[0]}"
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"- Machine: {machine_description(device, args.threads)}, device `{device}`; shared with other "
        f"engineers' jobs while measured, with `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}` "
        "(see the script's docstring)",
        f"- {versions}",
        f"- Date: {datetime.date.today().isoformat()}; {load} (on {os.cpu_count()} cores)",
        "- Inputs: D=128 standard-normal embeddings (seeded), 4 samples per class; the reference set is "
        f"60,000 items of {args.ref_classes:,} equal classes (about Stanford Online Products' training "
        "set), the batch's classes among them.",
        "- Default hyperparameters on both sides; one call is `miner(emb, labels, ref_emb, ref_labels)`. "
        "Before timing, the deterministic miners were asserted to return the same set of tuples as PML; "
        "`distance_weighted` (random draws) only its output kind, dtypes, shapes and validity. Our "
        "miners' `last_stats` is lazy and never read, so its cost is not in the timed region.",
        f"- Times: median over {args.repeats} repeat(s) of each side's median per-call time in "
        "interleaved blocks (ours/PML alternating; noisy repeats re-run); speed-up: median of the "
        "per-round PML/ours ratios" + (" (range over the repeats in brackets)." if args.repeats > 1 else "."),
        "",
        markdown,
        "",
        f"Target: ours ≥ {TARGET}× faster than PML on every row"
        + (f"; {len(misses)} row(s) below it." if misses else "; met on every row."),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--miners", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument(
        "--ref-classes",
        type=int,
        default=10_000,
        help="classes of the 60,000-item reference set (default 10,000)",
    )
    parser.add_argument(
        "--budget", type=float, default=4.0, help="seconds of timing per comparison (both sides)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="comparisons per row; the table takes medians")
    parser.add_argument(
        "--max-spread", type=float, default=0.25, help="re-run a comparison whose IQR/median exceeds this"
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a noisy comparison (least noisy kept)"
    )
    parser.add_argument("--min-block", type=float, default=0.05, help="minimum seconds per timed block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per side before each comparison")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time (robust to load with --threads 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mem-limit-gb", type=float, default=8.0, help="CPU only: cap on the data segment (0: none)"
    )
    parser.add_argument("--write", metavar="MARKDOWN", help="write the table into this file's section")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    if device.type == "cpu":  # CUDA reserves large virtual mappings that a data-segment cap would refuse
        limit_memory(args.mem_limit_gb)
    command = "python benchmarks/miners.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    command = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} {command}"
    load_start = os.getloadavg()[0]
    results: list[Result] = []
    for setting_key in args.settings:
        for miner_key in args.miners:
            row, setting = ROWS[miner_key], SETTINGS[setting_key]
            result = run_row(row, setting, args, device)
            results.append(result)
            speed = f"{result.speedup:.2f}x" if result.speedup is not None else "-"
            print(
                f"# {row.label:<26} {result.setting:<38} ours {fmt_ms(result.ours_ms):>8} ms  "
                f"PML {fmt_ms(result.pml_ms):>8} ms  {speed:>7}  [{' | '.join(result.detail)}] {result.note}",
                file=sys.stderr,
                flush=True,
            )
    markdown = table(results)
    print(markdown)
    load = f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"# {load}", file=sys.stderr)
    if args.write:
        body = report(args, device, command, load, markdown, results)
        replace_section(args.write, SECTION, body)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
