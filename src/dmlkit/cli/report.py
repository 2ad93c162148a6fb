"""dmlkit report: one self-contained report.html for a run directory — its resolved configuration,
training curves (loss, learning rate, images/s, every validation metric per epoch), the test table before
and after training, per-class metrics worst first and a grid of the worst test queries (the test split
re-embedded with the run's checkpoint, as dmlkit eval does). Open it in any browser: no network, no
script. The curves need matplotlib: pip install 'dmlkit[plot]'. See docs/reports.md."""

from __future__ import annotations

import argparse

from dmlkit.cli.common import add_embedding_arguments
from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.report import REPORT_FILE, write_report
from dmlkit.report.run import CHECKPOINTS


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("report", help="write a run's report.html", description=__doc__)
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run directory (the folder holding config.yaml)"
    )
    parser.add_argument("--out", default=None, help=f"the page to write (default: RUN_DIR/{REPORT_FILE})")
    parser.add_argument(
        "--worst", type=positive_int, default=8, help="worst test queries shown with their results (8)"
    )
    parser.add_argument("--top", type=positive_int, default=5, help="results shown per worst query (5)")
    parser.add_argument(
        "--max-classes", type=positive_int, default=100, help="rows of the per-class table, worst first (100)"
    )
    parser.add_argument(
        "--no-examples",
        action="store_true",
        help="do not re-embed the test split: no worst queries; per-class metrics only if results.json "
        "holds them",
    )
    parser.add_argument(
        "--checkpoint",
        choices=tuple(CHECKPOINTS),
        default=None,
        help="the checkpoint that re-embeds the test split (default: best, else last)",
    )
    add_embedding_arguments(parser)  # --batch-size, --num-workers, --device, --no-progress
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    path = write_report(
        args.run_dir,
        args.out,
        worst=args.worst,
        top=args.top,
        examples=not args.no_examples,
        checkpoint=args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        max_classes=args.max_classes,
    )
    print(f"wrote {path}")
    return 0
