"""Run a benchmark of this repository on two checkouts, alternately, and put their rows side by side.

A refactor must not slow anything down. This script runs the same benchmark script (``losses``, ``miners``
or ``eval``) of two source trees — ``--before`` (e.g. ``git worktree add /tmp/before <commit>``) and
``--after`` (default: this checkout) — each with its own ``src`` on ``PYTHONPATH``, in alternating order
over ``--rounds`` rounds (before, after, after, before, ...), and joins their Markdown tables row by row:
dmlkit's time before and after, their ratio, and (losses, miners) the PML time and speed-up each run
measured, so a slower machine during one run shows in PML's column too. Each tree runs its own copy of the
benchmark script (the "before" one imports the old module layout).

    python benchmarks/before_after.py losses --before /tmp/before -- --threads 1 --clock cpu
    python benchmarks/before_after.py miners --before /tmp/before --write BENCHMARKS.md
    python benchmarks/before_after.py eval --before /tmp/before -- --cases ours-60k-pml-set --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import replace_section

ROOT = Path(__file__).resolve().parents[1]
#: Benchmark → (columns that identify a row, the dmlkit time column, the PML time column or None).
LAYOUTS: dict[str, tuple[tuple[str, ...], str, str | None]] = {
    "losses": (("loss", "shape"), "ours ms", "PML ms"),
    "miners": (("miner", "setting"), "ours ms", "PML ms"),
    "eval": (("data", "what"), "time", None),
}
#: Heading of each benchmark's section (under BENCHMARKS.md's "Refactor check" section).
HEADING = "### Before / after {change}: {bench}"


def run_tree(tree: Path, bench: str, extra: list[str]) -> str:
    """The benchmark's Markdown table, as ``tree``'s own script writes it."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "table.md"
        write = [] if bench == "eval" else ["--write", str(out)]
        done = subprocess.run(
            [sys.executable, f"benchmarks/{bench}.py", *extra, *write],
            cwd=tree,
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        return done.stdout if bench == "eval" else out.read_text()


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in ``text`` as column → cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=False)))
    return rows


def seconds(cell: str) -> float | None:
    """A time cell in seconds: ``1,151`` or ``0.466`` (milliseconds), ``80.6 s``, ``22.5 min``; None if
    there is none."""
    text = cell.replace(",", "").strip()
    scale = 1e-3
    for unit, factor in ((" min", 60.0), (" s", 1.0)):
        if text.endswith(unit):
            text, scale = text.removesuffix(unit), factor
    try:
        return float(text) * scale
    except ValueError:
        return None


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    ms = value * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def join(bench: str, runs: dict[str, list[list[dict[str, str]]]]) -> str:
    """One row per benchmark row: medians over rounds of each side's times, and after/before."""
    keys, ours, pml = LAYOUTS[bench]
    by_key: dict[tuple[str, ...], dict[str, list[float]]] = {}
    for side, tables in runs.items():
        for table in tables:
            for row in table:
                entry = by_key.setdefault(tuple(row.get(k, "") for k in keys), {})
                for column, name in ((ours, f"{side} ours"), (pml, f"{side} pml")):
                    value = seconds(row.get(column, "")) if column else None
                    if value is not None:
                        entry.setdefault(name, []).append(value)

    def median(entry: dict[str, list[float]], name: str) -> float | None:
        return statistics.median(entry[name]) if entry.get(name) else None

    header = [*keys, "before ms", "after ms", "after / before"]
    if pml:
        header += ["PML ms (before run)", "PML ms (after run)", "speed-up vs PML before → after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(keys) + "---:|" * (len(header) - len(keys))]
    for key, entry in by_key.items():
        before, after = median(entry, "before ours"), median(entry, "after ours")
        ratio = f"{after / before:.2f}" if before and after else "—"
        cells = [*key, fmt(before), fmt(after), ratio]
        if pml:
            pml_before, pml_after = median(entry, "before pml"), median(entry, "after pml")
            speedups = [
                f"{p / o:.2f}×" if p and o else "—" for p, o in ((pml_before, before), (pml_after, after))
            ]
            cells += [fmt(pml_before), fmt(pml_after), " → ".join(speedups)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bench", choices=sorted(LAYOUTS))
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old commit")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout of the new code (default: here)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating")
    parser.add_argument("--write", metavar="MARKDOWN", help="write the joined table into this file's section")
    parser.add_argument(
        "--change", default="issue 11", help="the section is named ### Before / after CHANGE: BENCH"
    )
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]  # the benchmark script's own arguments
    runs: dict[str, list[list[dict[str, str]]]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
        for side in order:
            tree = args.before if side == "before" else args.after
            print(f"round {round_ + 1}: {side} ({tree})", file=sys.stderr, flush=True)
            runs[side].append(parse_table(run_tree(tree, args.bench, args.extra)))
    table = join(args.bench, runs)
    print(table)
    if args.write:
        command = "python benchmarks/before_after.py " + " ".join(argv)
        body = f"Command: `{command}`\n\n{table}"
        replace_section(args.write, HEADING.format(change=args.change, bench=args.bench), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
