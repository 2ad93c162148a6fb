"""``dmlkit list [KIND]``: the names every registry accepts (everything that is chosen by name)."""

from __future__ import annotations

import argparse
import json
from typing import Protocol

from dmlkit.cli.parser import SuggestingParser


class Listed(Protocol):
    """What ``dmlkit list`` reads of a registry."""

    kind: str

    def available(self) -> list[str]: ...


def registries() -> dict[str, Listed]:
    """Every registry a configuration or a command line chooses from, under its ``dmlkit list`` name."""
    from dmlkit import data, distances, losses, miners, models, samplers, search
    from dmlkit.losses import reducers, regularizers
    from dmlkit.metrics import retrieval
    from dmlkit.train import optim

    return {
        "datasets": data.REGISTRY,
        "augmentations": data.augment.REGISTRY,
        "samplers": samplers.REGISTRY,
        "backbones": models.backbones.REGISTRY,
        "pooling": models.pooling.REGISTRY,
        "heads": models.heads.REGISTRY,
        "weights": models.weights.REGISTRY,
        "losses": losses.REGISTRY,
        "reducers": reducers.REGISTRY,
        "regularizers": regularizers.REGISTRY,
        "miners": miners.REGISTRY,
        "distances": distances.REGISTRY,
        "optimizers": optim.OPTIMIZERS,
        "schedulers": optim.SCHEDULERS,
        "metrics": retrieval.METRICS,
        "backends": search.REGISTRY,
    }


def add_parser(cli: SuggestingParser) -> None:
    parser = cli.add_parser("list", help="list what can be chosen by name", description=__doc__)
    parser.add_argument("kind", nargs="?", choices=list(registries()), help="one kind (default: every kind)")
    parser.add_argument("--json", action="store_true", help="print JSON (a list, or kind → list)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    found = registries()
    if args.kind is not None:
        names = found[args.kind].available()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    every = {kind: registry.available() for kind, registry in found.items()}
    if args.json:
        print(json.dumps(every, indent=2))
    else:
        for kind, names in every.items():
            print(f"{kind} ({found[kind].kind}): {', '.join(names)}")
    return 0
