"""Forward + backward time of dmlkit's losses against pytorch-metric-learning (PML), issue 3.

For every loss, on the same inputs and with PML's default hyperparameters on both sides::

    python benchmarks/losses.py                       # CPU, 2 threads, every row; prints a Markdown table
    python benchmarks/losses.py --write BENCHMARKS.md # also writes it into BENCHMARKS.md (own section)
    python benchmarks/losses.py --threads 1 --clock cpu   # CPU time: robust on a busy shared machine
    python benchmarks/losses.py --device cuda --threads 8
    python benchmarks/losses.py --losses circle supcon --shapes b112 --budget 2

Shapes: ``b112`` (B=112, D=128), ``b256`` (B=256, D=512), both with B/4 classes of 4 samples drawn
from 100 classes, and ``ref`` (B=112, D=128 against a 60,000 × 128 reference set with 1,000 classes of
60: the cross-batch-memory case; the batch's 28 classes are among the reference set's, the reference
set gets no gradient). Embeddings are standard normal, seeded. Proxy/classification losses use
``num_classes=100``; PML's initialised parameters are copied into ours, and they take no reference set
(row marked ``n/a``).

Before timing, each row checks that both sides compute the same thing: the loss value and the gradient
of the embeddings (and of the loss's parameters) must agree (``torch.testing.assert_close``); a row
that disagrees aborts the run. One timed call is ``loss(...)`` then ``backward()``, gradients reset
to None before each call on both sides. The two sides run in interleaved blocks (see
``benchmarks/common.py``); the table gives the median time per call of each side and the median over
rounds of the PML/ours ratio of adjacent blocks. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (see
below); ``--max-foreign N`` discards and repeats rounds during which other processes kept more than N
cores busy; ``--clock cpu`` times this process's CPU time instead of elapsed time.

The semi-hard rows use ``dmlkit.miners.build("triplet_margin", type_of_triplets="semihard")`` and PML's
``TripletMarginMiner(type_of_triplets="semihard")`` (margin 0.2, the default of both) with the default
triplet loss (margin 0.05): "miner + loss" times mining and the loss together, "loss on mined
triplets" times the loss alone on one fixed set of mined triplets given to both sides.

The process's data segment is capped (``--mem-limit-gb``, CPU only) so that a computation that would
need more memory than the (shared) machine has fails cleanly; such a side is reported as out of memory.
"""

from __future__ import annotations

import os

# Read when libgomp loads, so before torch is imported; set it in the environment to override. On a
# machine whose cores are busy with other jobs, OpenMP's default spin-waiting makes an idle worker thread
# compete with the main thread for a core: with 2 threads a sub-millisecond call then takes 10–100 ms
# at random. Passive waiting gives stable times; both sides run under the same setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import gc
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, fmt_ms, is_out_of_memory, limit_memory, machine_description, next_heading

from dmlkit import losses as dml_losses
from dmlkit import miners as dml_miners

try:
    import pytorch_metric_learning
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
except ImportError as e:  # pragma: no cover - the benchmark needs PML
    raise SystemExit(f"benchmarks/losses.py needs pytorch-metric-learning: {e}") from None

SECTION = "## Losses: forward + backward vs pytorch-metric-learning"
TARGET = 1.5
NUM_CLASSES = 100  # proxy/classification losses, and the label pool of the batch shapes


# ---------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One loss configuration: our factory, PML's, parameters to copy PML → ours, and how it is fed."""

    label: str
    ours: Callable[[int], nn.Module]  # embedding size → module
    pml: Callable[[int], nn.Module]
    params: tuple[tuple[str, str], ...] = ()  # (our attribute, PML attribute)
    accepts_ref: bool = True
    mining: str | None = None  # None, "miner+loss" (both timed) or "given" (fixed mined triplets)


def _semihard_ours() -> nn.Module:
    return dml_miners.build("triplet_margin", type_of_triplets="semihard")


def _semihard_pml() -> nn.Module:
    return pml_miners.TripletMarginMiner(type_of_triplets="semihard")


ROWS: dict[str, Row] = {
    row.label: row
    for row in [
        Row("contrastive", lambda d: dml_losses.build("contrastive"), lambda d: pml_losses.ContrastiveLoss()),
        Row("triplet", lambda d: dml_losses.build("triplet"), lambda d: pml_losses.TripletMarginLoss()),
        Row(
            "triplet + semihard miner",
            lambda d: dml_losses.build("triplet"),
            lambda d: pml_losses.TripletMarginLoss(),
            mining="miner+loss",
        ),
        Row(
            "triplet on semihard triplets",
            lambda d: dml_losses.build("triplet"),
            lambda d: pml_losses.TripletMarginLoss(),
            mining="given",
        ),
        Row("margin", lambda d: dml_losses.build("margin"), lambda d: pml_losses.MarginLoss()),
        Row(
            "multisimilarity",
            lambda d: dml_losses.build("multisimilarity"),
            lambda d: pml_losses.MultiSimilarityLoss(),
        ),
        Row("circle", lambda d: dml_losses.build("circle"), lambda d: pml_losses.CircleLoss()),
        Row("supcon", lambda d: dml_losses.build("supcon"), lambda d: pml_losses.SupConLoss()),
        Row("ntxent", lambda d: dml_losses.build("ntxent"), lambda d: pml_losses.NTXentLoss()),
        Row(
            "proxyanchor",
            lambda d: dml_losses.build("proxyanchor", num_classes=NUM_CLASSES, embedding_size=d),
            lambda d: pml_losses.ProxyAnchorLoss(NUM_CLASSES, d),
            params=(("proxies", "proxies"),),
            accepts_ref=False,
        ),
        Row(
            "arcface",
            lambda d: dml_losses.build("arcface", num_classes=NUM_CLASSES, embedding_size=d),
            lambda d: pml_losses.ArcFaceLoss(NUM_CLASSES, d),
            params=(("W", "W"),),
            accepts_ref=False,
        ),
        Row(
            "softtriple",
            lambda d: dml_losses.build("softtriple", num_classes=NUM_CLASSES, embedding_size=d),
            lambda d: pml_losses.SoftTripleLoss(NUM_CLASSES, d),
            params=(("fc", "fc"),),
            accepts_ref=False,
        ),
    ]
}

ROW_KEYS = {
    "contrastive": "contrastive",
    "triplet": "triplet",
    "semihard": "triplet + semihard miner",
    "semihard_given": "triplet on semihard triplets",
    "margin": "margin",
    "multisimilarity": "multisimilarity",
    "circle": "circle",
    "supcon": "supcon",
    "ntxent": "ntxent",
    "proxyanchor": "proxyanchor",
    "arcface": "arcface",
    "softtriple": "softtriple",
}


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    batch: int
    dim: int
    ref_size: int = 0
    ref_classes: int = 0


SHAPES: dict[str, Shape] = {
    "b112": Shape("b112", "B=112, D=128", 112, 128),
    "b256": Shape("b256", "B=256, D=512", 256, 512),
    "ref": Shape("ref", "B=112, D=128, ref 60,000", 112, 128, 60_000, 1_000),
}


def make_inputs(shape: Shape, seed: int, device: torch.device) -> dict[str, Any]:
    """Embeddings (B × D, standard normal), labels (B/4 classes × 4), optional reference set."""
    g = torch.Generator().manual_seed(seed)
    pool = shape.ref_classes or NUM_CLASSES
    classes = torch.randperm(pool, generator=g)[: shape.batch // 4]
    labels = classes.repeat_interleave(4)[torch.randperm(shape.batch, generator=g)]
    out: dict[str, Any] = {
        "emb": torch.randn(shape.batch, shape.dim, generator=g).to(device),
        "labels": labels.to(device),
        "ref_emb": None,
        "ref_labels": None,
    }
    if shape.ref_size:
        per_class = shape.ref_size // shape.ref_classes
        ref_labels = torch.arange(shape.ref_classes).repeat_interleave(per_class)
        out["ref_labels"] = ref_labels[torch.randperm(shape.ref_size, generator=g)].to(device)
        out["ref_emb"] = torch.randn(shape.ref_size, shape.dim, generator=g).to(device)
    return out


# ---------------------------------------------------------------------------------------------- one row


@dataclass
class Side:
    """One implementation set up for a row: the loss, its miner, and the leaf embeddings it differentiates."""

    loss: nn.Module
    miner: nn.Module | None
    emb: torch.Tensor

    def params(self) -> list[torch.Tensor]:
        return [p for p in self.loss.parameters() if p.requires_grad]

    def step(self, inputs: dict[str, Any], indices: tuple | None) -> torch.Tensor:
        """Zero the gradients, compute the loss (mining first if there is a miner) and backpropagate."""
        self.emb.grad = None
        for p in self.params():
            p.grad = None
        ref_emb, ref_labels = inputs["ref_emb"], inputs["ref_labels"]
        if self.miner is not None:
            indices = self.miner(self.emb, inputs["labels"], ref_emb, ref_labels)
        value = self.loss(self.emb, inputs["labels"], indices, ref_emb, ref_labels)
        value.backward()
        return value.detach()


def check_same(ours: Side, theirs: Side, v_ours: torch.Tensor, v_theirs: torch.Tensor, what: str) -> None:
    """Assert that value and gradients agree (float32 tolerances, gradients relative to their scale)."""
    torch.testing.assert_close(v_ours, v_theirs, rtol=1e-4, atol=1e-6, msg=lambda m: f"{what}: value: {m}")
    pairs = [(ours.emb.grad, theirs.emb.grad, "embeddings")]
    pairs += [(a.grad, b.grad, "parameters") for a, b in zip(ours.params(), theirs.params(), strict=True)]
    for g_ours, g_theirs, name in pairs:
        assert g_ours is not None and g_theirs is not None, f"{what}: no gradient for the {name}"
        scale = float(g_theirs.abs().max()) or 1.0
        where = f"{what}: {name} gradient"
        torch.testing.assert_close(
            g_ours, g_theirs, rtol=1e-3, atol=1e-4 * scale, msg=lambda m, where=where: f"{where}: {m}"
        )


def same_triplets(a: tuple, b: tuple) -> bool:
    """Whether two triplet index tuples hold the same set (orders may differ)."""

    def keys(t: tuple) -> torch.Tensor:
        a_, p, n = (x.long().cpu() for x in t)
        return torch.sort((a_ * (1 << 21) + p) * (1 << 21) + n).values

    ka, kb = keys(a), keys(b)
    return ka.shape == kb.shape and bool(torch.equal(ka, kb))


def _try(miner: nn.Module, inputs: dict[str, Any]) -> tuple[tuple | None, str]:
    """Mine once; on an allocation failure return ``(None, reason)`` (after the exception is released, so
    whatever it held is freed)."""
    reason = ""
    try:
        return miner(inputs["emb"], inputs["labels"], inputs["ref_emb"], inputs["ref_labels"]), ""
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        reason = failure(e)
    gc.collect()
    return None, reason


def count_semihard(inputs: dict[str, Any], margin: float = 0.2) -> int:
    """How many triplets the semi-hard miner selects (``0 < d(a,n) − d(a,p) ≤ margin``), counted per
    anchor from its sorted negative distances without listing them (for the notes of rows where the
    list itself does not fit in memory)."""
    x = torch.nn.functional.normalize(inputs["emb"].detach(), dim=1)
    ref = x if inputs["ref_emb"] is None else torch.nn.functional.normalize(inputs["ref_emb"], dim=1)
    ref_labels = inputs["labels"] if inputs["ref_labels"] is None else inputs["ref_labels"]
    dist = torch.cdist(x, ref)  # the miners' distances
    total = 0
    for i in range(x.shape[0]):
        d, label = dist[i], inputs["labels"][i]
        pos_mask = ref_labels == label
        if inputs["ref_emb"] is None:
            pos_mask[i] = False
        neg = torch.sort(d[ref_labels != label]).values
        pos = d[pos_mask]
        lo = torch.searchsorted(neg, pos, right=True)  # d(a,n) ≤ d(a,p): not semi-hard
        hi = torch.searchsorted(neg, pos + margin, right=True)
        total += int((hi - lo).sum())
    return total


def failure(error: BaseException) -> str:
    if is_out_of_memory(error):
        return "out of memory"
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


@dataclass
class Result:
    row: str
    shape: str
    ours_ms: float | None = None
    pml_ms: float | None = None
    speedup: float | None = None
    note: str = ""
    spread: str = ""
    number: int = 0
    rounds: int = 0
    discarded: int = 0
    noisy: bool = False


def _given_triplets(inputs: dict[str, Any], notes: list[str]) -> tuple[Any, str | None]:
    """The triplets both sides get (PML's miner's, or dmlkit's, the same set, where PML's fails); or None
    and the note of a row that cannot run."""
    indices, error = _try(_semihard_pml(), inputs)
    if indices is None:
        indices, error_ours = _try(_semihard_ours(), inputs)
        if indices is None:
            return None, (
                f"{count_semihard(inputs):,} semi-hard triplets (counted, not listed); mining them runs "
                f"out of memory (PML: {error}; dmlkit: {error_ours})"
            )
        notes.append(f"triplets from dmlkit's miner (PML's: {error})")
    notes.append(f"{indices[0].numel():,} triplets")
    return indices, None


def _check_miners(inputs: dict[str, Any], notes: list[str], what: str) -> None:
    """Both semi-hard miners return the same triplets (when both can list them)."""
    mined_theirs, _ = _try(_semihard_pml(), inputs)
    mined_ours, _ = _try(_semihard_ours(), inputs)
    if mined_ours is not None:
        notes.append(f"{mined_ours[0].numel():,} triplets")
    else:
        notes.append(f"{count_semihard(inputs):,} semi-hard triplets (counted, not listed)")
    if mined_ours is not None and mined_theirs is not None and not same_triplets(mined_ours, mined_theirs):
        raise AssertionError(f"{what}: the miners return different triplets")


def _first_calls(
    sides: dict[str, Side], inputs: dict[str, Any], indices: Any, verbose: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One call each (checks and warm-up): the values, and the error of a side that fails."""
    errors: dict[str, str] = {}
    values: dict[str, torch.Tensor] = {}
    for name, side in sides.items():
        try:
            values[name] = side.step(inputs, indices)
        except (RuntimeError, MemoryError, IndexError) as e:
            if verbose:
                traceback.print_exc()
            errors[name] = failure(e)
        if name in errors:
            side.emb.grad = None
            gc.collect()
    return values, errors


def _record_timing(result: Result, comparison: Any, errors: dict[str, str], notes: list[str]) -> None:
    result.discarded = comparison.discarded
    result.noisy = comparison.noisy
    result.ours_ms = 1e3 * comparison.median("ours")
    result.number = comparison.number
    result.rounds = len(comparison.times["ours"])
    spreads = [f"ours ±{comparison.spread('ours'):.0%}"]
    if "pml" in errors:
        notes.insert(0, f"PML: {errors['pml']}")
    else:
        result.pml_ms = 1e3 * comparison.median("pml")
        result.speedup = comparison.ratio("pml", "ours")
        spreads.append(f"PML ±{comparison.spread('pml'):.0%}")
    result.spread = ", ".join(spreads)
    result.note = "; ".join(notes)


def run_row(row: Row, shape: Shape, args: argparse.Namespace, device: torch.device) -> Result:
    result = Result(row.label, shape.label)
    if shape.ref_size and not row.accepts_ref:
        result.note = "n/a (no reference set)"
        return result
    inputs = make_inputs(shape, args.seed, device)
    torch.manual_seed(args.seed)
    theirs_loss = row.pml(shape.dim).to(device)
    ours_loss = row.ours(shape.dim).to(device)
    with torch.no_grad():
        for ours_attr, pml_attr in row.params:
            getattr(ours_loss, ours_attr).copy_(getattr(theirs_loss, pml_attr))
    ours = Side(ours_loss, _semihard_ours() if row.mining == "miner+loss" else None, inputs["emb"].clone())
    theirs = Side(theirs_loss, _semihard_pml() if row.mining == "miner+loss" else None, inputs["emb"].clone())
    ours.emb.requires_grad_(True)
    theirs.emb.requires_grad_(True)

    indices = None
    notes: list[str] = []
    what = f"{row.label} / {shape.label}"
    if row.mining == "given":
        indices, cannot = _given_triplets(inputs, notes)
        if cannot is not None:
            result.note = cannot
            return result
    if row.mining == "miner+loss":
        _check_miners(inputs, notes, what)

    # one call each: checks and warm-up; a side that fails is reported, not timed
    values, errors = _first_calls({"ours": ours, "pml": theirs}, inputs, indices, args.verbose)
    if "ours" in errors:
        failures = [f"dmlkit: {errors['ours']}"] + ([f"PML: {errors['pml']}"] if "pml" in errors else [])
        result.note = "; ".join(notes + failures)
        return result
    if "pml" not in errors:
        check_same(ours, theirs, values["ours"], values["pml"], what)

    fns = {"ours": lambda: ours.step(inputs, indices)}
    if "pml" not in errors:
        fns["pml"] = lambda: theirs.step(inputs, indices)
    comparison = compare(
        fns,
        device,
        warmup=args.warmup,
        min_block_s=args.min_block,
        budget_s=args.budget,
        clock=args.clock,
        max_foreign=None if args.max_foreign < 0 else args.max_foreign,  # resolved in main()
        max_wait_s=args.max_wait,
    )
    _record_timing(result, comparison, errors, notes)
    return result


# ---------------------------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    lines = [
        "| loss | shape | ours ms | PML ms | speed-up | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        if r.speedup is not None:
            speed = f"{r.speedup:.2f}×" + ("" if r.speedup >= TARGET else " (below 1.5×)")
        elif r.ours_ms is not None:
            speed = "PML fails"
        else:
            speed = "—"
        note = (r.note + ("; measured under load (too few quiet rounds)" if r.noisy else "")).strip("; ")
        ours, pml = fmt_ms(r.ours_ms), fmt_ms(r.pml_ms)
        lines.append(f"| {r.row} | {r.shape} | {ours} | {pml} | {speed} | {note} |")
    return "\n".join(lines)


INTRO = """\
`benchmarks/losses.py` times one forward + backward pass of each dmlkit loss and of its
pytorch-metric-learning (PML) counterpart, PML's default hyperparameters on both sides, on the same
inputs: standard-normal embeddings, B/4 classes of 4 samples (drawn from 100 classes) for the batch
shapes; for the reference-set shape (a cross-batch memory), B = 112 queries from 28 classes against
60,000 × 128 reference embeddings of 1,000 classes × 60 (no gradient to the reference set). Proxy and
classification losses use `num_classes=100` with PML's initial parameters copied into ours; they take
no reference set. The semi-hard rows use `dmlkit.miners.build("triplet_margin",
type_of_triplets="semihard")` and PML's `TripletMarginMiner(type_of_triplets="semihard")` (margin 0.2)
with the default triplet loss: "miner + loss" times both, "on semihard triplets" the loss alone on one
fixed set of mined triplets given to both (the two miners are checked to return the same set).

Before timing, every row asserts that both sides compute the same thing: the loss value and the
gradients of the embeddings (and of the loss's parameters) must agree (`torch.testing.assert_close`,
float32). One timed call is the loss then `backward()`, gradients reset to None before each call. The
two sides run in alternating blocks (ours, PML, PML, ours, ...), each block long enough (≥ 0.1 s) to
average many calls; the table gives the median time per call of each side over the rounds and the
median over rounds of the PML/ours ratio of the two adjacent blocks of a round.

The machine is shared with other engineers' jobs, which ran throughout (load averages are given with
each table). The script sets `OMP_WAIT_POLICY=PASSIVE` (unless set): with OpenMP's default
spin-waiting an idle worker thread competes with the main thread for a busy core, and with 2 threads a
sub-millisecond call takes 10–100 ms at random. `--max-foreign N` would discard rounds during which
other processes kept more than N cores busy (never the case here, so not used); `--threads 1 --clock
cpu` measures this process's CPU time instead of elapsed time, the least load-sensitive figure (second
table, a cross-check). On CPU the process's data segment is capped (`--mem-limit-gb`, default 8 GB)
so that a computation needing more fails cleanly; it is reported as out of memory.

Target (issue 3): ours ≥ 1.5× faster than PML on every row, never slower."""


def write_report(path: str, sub_heading: str, body: str) -> None:
    """Put :data:`INTRO` under :data:`SECTION` in ``path`` and ``body`` under ``sub_heading`` (a level-3
    heading for this configuration) inside that section, replacing earlier versions of both; the rest of
    the file is left as it is."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = "# Benchmarks\n"
    lines = text.splitlines()
    section_start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    runs: dict[str, list[str]] = {}
    order: list[str] = []
    if section_start is not None:
        section_end = next_heading(lines, section_start, 2)
        current = None
        fenced = False
        for line in lines[section_start + 1 : section_end]:
            if line.lstrip().startswith("```"):
                fenced = not fenced
            if not fenced and line.startswith("### "):
                current = line.strip()
                order.append(current)
                runs[current] = []
            elif current is not None:
                runs[current].append(line)
        before, after = lines[:section_start], lines[section_end:]
    else:
        before, after = lines, []
    if sub_heading not in runs:
        order.append(sub_heading)
    runs[sub_heading] = ["", *body.strip("\n").splitlines(), ""]
    order.sort(key=lambda heading: "wall clock" not in heading)  # elapsed-time tables first (stable)
    section = [SECTION, "", *INTRO.splitlines(), ""]
    for heading in order:
        section += [heading, *runs[heading]]
    while section and not section[-1].strip():
        section.pop()
    while before and not before[-1].strip():
        before.pop()
    new = [*before, "", *section] + (["", *after] if after else [])
    Path(path).write_text("\n".join(new).strip("\n") + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--losses", nargs="+", choices=list(ROW_KEYS), default=list(ROW_KEYS))
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per row (both sides)")
    parser.add_argument("--min-block", type=float, default=0.1, help="minimum seconds per timed block")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=None,
        help="discard and repeat rounds during which other processes kept more than this many cores busy "
        "(default: keep every round)",
    )
    parser.add_argument(
        "--max-wait", type=float, default=300.0, help="seconds per row to wait for quiet rounds (default 300)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per side before timing")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time (robust to load with --threads 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="cap on the process's data segment in GB (0: none; default 8 on CPU, none with --device cuda)",
    )
    parser.add_argument("--write", metavar="MARKDOWN", help="write the table into this file's section")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing sides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    torch.set_num_threads(args.threads)
    if args.max_foreign is None:
        args.max_foreign = -1.0
    if args.mem_limit_gb is None:
        args.mem_limit_gb = 8.0 if device.type == "cpu" else 0.0
    limit_memory(args.mem_limit_gb)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python benchmarks/losses.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: list[Result] = []
    for shape_key in args.shapes:
        for loss_key in args.losses:
            row, shape = ROWS[ROW_KEYS[loss_key]], SHAPES[shape_key]
            result = run_row(row, shape, args, device)
            results.append(result)
            speed = f"{result.speedup:.2f}x" if result.speedup is not None else "-"
            print(
                f"# {row.label:<30} {shape.label:<26} ours {fmt_ms(result.ours_ms):>8} ms  "
                f"PML {fmt_ms(result.pml_ms):>8} ms  {speed:>7}  [{result.number}x{result.rounds}; "
                f"{result.spread}; {result.discarded} busy rounds discarded"
                f"{'; NOISY' if result.noisy else ''}] "
                f"{result.note}",
                file=sys.stderr,
                flush=True,
            )
    markdown = table(results)
    print(markdown)
    if args.write:
        misses = [r for r in results if r.speedup is not None and r.speedup < TARGET]
        clock = "wall-clock time" if args.clock == "wall" else "CPU time of the process (`--clock cpu`)"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        body = "\n".join(
            [
                f"Command: `{command}`",
                "",
                f"- Machine: {machine_description(device, args.threads)}; device `{device}`; {clock}; "
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
                f"- torch {torch.__version__}, pytorch-metric-learning "
                f"{pytorch_metric_learning.__version__}, Python {sys.version.split()[0]}",
                f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; 1-minute load average "
                f"{load_start:.1f} at the start, {load:.1f} at the end"
                + (
                    f"; busy rounds discarded: {sum(r.discarded for r in results)}"
                    if args.max_foreign >= 0
                    else ""
                ),
                "",
                markdown,
                "",
                (
                    f"{len(misses)} row(s) below the 1.5× target: "
                    + ", ".join(f"{r.row} ({r.shape})" for r in misses)
                    if misses
                    else "Every row that PML can run meets the 1.5× target."
                ),
            ]
        )
        heading = f"### {device.type.upper()}, {args.threads} thread{'s' if args.threads > 1 else ''}, "
        heading += "wall clock" if args.clock == "wall" else "CPU time"
        write_report(args.write, heading, body)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
