"""Forward + backward time of dmlkit's losses against pytorch-metric-learning (PML), issue 3.

For every loss, on the same inputs and with PML's default hyperparameters on both sides::

    python benchmarks/losses.py                       # CPU, 2 threads, every row; prints a Markdown table
    python benchmarks/losses.py --write BENCHMARKS.md # also writes the table into BENCHMARKS.md
    python benchmarks/losses.py --device cuda --threads 8
    python benchmarks/losses.py --losses circle supcon --shapes b112 --budget 2

Shapes: ``b112`` (B=112, D=128), ``b256`` (B=256, D=512), both with B/4 classes of 4 samples drawn
from 100 classes, and ``ref`` (B=112, D=128 against a 60,000 × 128 reference set with 1,000 classes of
60: the cross-batch-memory case; the batch's 28 classes are among the reference set's). Embeddings are
standard normal, seeded. Proxy/classification losses use ``num_classes=100``; PML's initialised
parameters are copied into ours, and they take no reference set (row marked ``n/a``).

Before timing, each row checks that both sides compute the same thing: the loss value and the gradient
of the embeddings (and of the loss's parameters) must agree (``torch.testing.assert_close``); a row
that disagrees aborts the run. One timed call is ``loss(...)`` then ``backward()``, gradients reset
to None before each call on both sides. The two sides run in interleaved blocks (see
``benchmarks/common.py``); the table gives the median time per call of each side and the median over
rounds of the PML/ours ratio of adjacent blocks.

The semi-hard rows use ``dmlkit.miners.build("triplet_margin", type_of_triplets="semihard")`` and PML's
``TripletMarginMiner(type_of_triplets="semihard")`` (margin 0.2, the default of both) with the default
triplet loss (margin 0.05): "miner + loss" times mining and the loss together, "loss on mined
triplets" times the loss alone on one fixed set of mined triplets given to both sides.

The process's data segment is capped (``--mem-limit-gb``) so that a computation that would need more
memory than the (shared) machine has fails cleanly; such a side is reported as out of memory.
"""

from __future__ import annotations

import argparse
import datetime
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
from common import compare, is_out_of_memory, limit_memory, machine_description, replace_section  # noqa: E402

import dmlkit  # noqa: E402
from dmlkit import losses as dml_losses  # noqa: E402
from dmlkit import miners as dml_miners  # noqa: E402

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
        torch.testing.assert_close(
            g_ours, g_theirs, rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{what}: {name} gradient: {m}"
        )


def same_triplets(a: tuple, b: tuple) -> bool:
    """Whether two triplet index tuples hold the same set (orders may differ)."""

    def keys(t: tuple) -> torch.Tensor:
        a_, p, n = (x.long().cpu() for x in t)
        return torch.sort((a_ * (1 << 21) + p) * (1 << 21) + n).values

    ka, kb = keys(a), keys(b)
    return ka.shape == kb.shape and bool(torch.equal(ka, kb))


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
    if row.mining == "given":
        miner_ref = (inputs["ref_emb"], inputs["ref_labels"])
        try:
            indices = _semihard_pml()(inputs["emb"], inputs["labels"], *miner_ref)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            indices = _semihard_ours()(inputs["emb"], inputs["labels"], *miner_ref)
            notes.append("triplets mined by dmlkit's miner (PML's miner runs out of memory)")
        notes.append(f"{indices[0].numel():,} triplets")

    if row.mining == "miner+loss":
        miner_ref = (inputs["ref_emb"], inputs["ref_labels"])
        try:
            mined_theirs = _semihard_pml()(inputs["emb"], inputs["labels"], *miner_ref)
            mined_ours = _semihard_ours()(inputs["emb"], inputs["labels"], *miner_ref)
            if not same_triplets(mined_ours, mined_theirs):
                raise AssertionError(f"{row.label} / {shape.label}: the miners return different triplets")
            notes.append(f"{mined_ours[0].numel():,} triplets")
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise

    # one call each: checks and warm-up; a side that fails is reported, not timed
    errors: dict[str, str] = {}
    values: dict[str, torch.Tensor] = {}
    for name, side in (("ours", ours), ("pml", theirs)):
        try:
            values[name] = side.step(inputs, indices)
        except (RuntimeError, MemoryError, IndexError) as e:
            if args.verbose:
                traceback.print_exc()
            errors[name] = failure(e)
            side.emb.grad = None
    if "ours" in errors:
        result.note = "; ".join([f"dmlkit: {errors['ours']}"] + ([f"PML: {errors['pml']}"] if "pml" in errors else []))
        return result
    if "pml" not in errors:
        check_same(ours, theirs, values["ours"], values["pml"], f"{row.label} / {shape.label}")

    fns = {"ours": lambda: ours.step(inputs, indices)}
    if "pml" not in errors:
        fns["pml"] = lambda: theirs.step(inputs, indices)
    comparison = compare(fns, device, warmup=args.warmup, min_block_s=args.min_block, budget_s=args.budget)
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
    return result


# ---------------------------------------------------------------------------------------------- report


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


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
        lines.append(f"| {r.row} | {r.shape} | {fmt_ms(r.ours_ms)} | {fmt_ms(r.pml_ms)} | {speed} | {r.note} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--losses", nargs="+", choices=list(ROW_KEYS), default=list(ROW_KEYS))
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per row (both sides)")
    parser.add_argument("--min-block", type=float, default=0.05, help="minimum seconds per timed block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per side before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mem-limit-gb", type=float, default=8.0, help="cap on the process's data segment (0: none)"
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
    limit_memory(args.mem_limit_gb)
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
                f"{result.spread}] {result.note}",
                file=sys.stderr,
                flush=True,
            )
    markdown = table(results)
    print(markdown)
    if args.write:
        misses = [r for r in results if r.speedup is not None and r.speedup < TARGET]
        body = "\n".join(
            [
                f"Command: `{command}`",
                "",
                f"- Machine: {machine_description(device, args.threads)}, device `{device}`",
                f"- torch {torch.__version__}, pytorch-metric-learning {pytorch_metric_learning.__version__}, "
                f"dmlkit {getattr(dmlkit, '__version__', 'dev')}, Python {sys.version.split()[0]}",
                f"- Date: {datetime.date.today().isoformat()}",
                "",
                markdown,
                "",
                f"Target: ours ≥ {TARGET}× faster than PML on every row"
                + (f"; {len(misses)} row(s) below it." if misses else "; met on every row that PML can run."),
            ]
        )
        replace_section(args.write, SECTION, body)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
