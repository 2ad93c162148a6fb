"""dmlkit sweep: run a study over training factors (Optuna), or report one (docs/sweeps.md).

dmlkit sweep SPEC.yaml [--out DIR] [--workers N] [--dry-run]   run (or continue) the study of SPEC
dmlkit sweep report STUDY_DIR [--out DIR] [--no-plots]         trials.csv, mean ± std tables, influence plots
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dmlkit.cli.parser import SuggestingParser, positive_int
from dmlkit.errors import ConfigError


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("sweep", help="run or report a sweep over training factors", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("target", nargs="+", metavar="SPEC | report STUDY_DIR")
    parser.add_argument("--out", type=Path, default=None, help="the study folder (default: sweeps/<name>); "
                        "with report: where the report goes (default: STUDY_DIR/report)")  # fmt: skip
    parser.add_argument("--workers", type=positive_int, default=1, help="trials run at the same time (1)")
    parser.add_argument("--dry-run", action="store_true", help="validate every configuration and stop")
    parser.add_argument("--no-plots", action="store_true", help="report: skip the influence plots")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dmlkit.sweep import report, runner
    from dmlkit.sweep.spec import load_spec

    words = list(args.target)
    if words[0] == "report":
        if len(words) != 2:
            raise ConfigError("usage: dmlkit sweep report STUDY_DIR")
        study_dir = Path(words[1])
        if not (study_dir / runner.SPEC).is_file():
            raise ConfigError(
                f"'{study_dir}' is not a study folder (no {runner.SPEC}); run dmlkit sweep SPEC first"
            )
        done = report.write_report(study_dir, args.out, plots=not args.no_plots)
        print(f"{len(done.runs)} run(s), {len(done.failed)} failed trial(s); wrote:")
        for path in done.files:
            print(f"  {path}")
        for failure in done.failed:
            print(f"failed trial {failure['trial']}: {failure['error']}")
        return 0
    if len(words) != 1:
        raise ConfigError("usage: dmlkit sweep SPEC.yaml (or: dmlkit sweep report STUDY_DIR)")
    spec = load_spec(words[0])
    checked = spec.validate_all()
    study_dir = args.out or Path("sweeps") / spec.name
    print(f"sweep '{spec.name}': {checked} configuration(s) valid; {spec.sampler} search, {spec.max_trials} "
          f"trial(s) × {len(spec.seeds)} seed(s) in {study_dir}")  # fmt: skip
    if args.dry_run:
        return 0
    study = runner.run_sweep(spec, study_dir, workers=args.workers)
    trials = runner.done_trials(study)
    failed = [t for t in trials if t.state.name == "FAIL"]
    for trial in failed:
        print(
            f"failed trial {trial.number} ({trial.user_attrs.get('labels')}): {trial.user_attrs.get('error')}"
        )
    print(
        f"{len(trials) - len(failed)} trial(s) complete, {len(failed)} failed; report: dmlkit sweep report "
        f"{study_dir}"
    )
    return 0
