"""``dmlkit list KIND``: the names each registry accepts."""

from __future__ import annotations

import argparse
import json

KINDS = ("losses", "miners", "samplers", "datasets", "metrics", "backbones")


def names(kind: str) -> list[str]:
    from dmlkit import data, losses, metrics, miners, models, samplers

    return {
        "losses": losses.available,
        "miners": miners.available,
        "samplers": samplers.available,
        "datasets": data.available,
        "metrics": metrics.available,
        "backbones": models.available_backbones,
    }[kind]()


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "list",
        allow_abbrev=False,
        help="list the names of losses, miners, ...",
        description="List what can be chosen by name.",
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    found = names(args.kind)
    print(json.dumps(found) if args.json else "\n".join(found))
    return 0
