"""The reverse transformation ρ: new-model embeddings mapped into the old model's space.

During backfilling (Seo et al., "Metric Compatible Training for Online Backfilling in Large-Scale
Retrieval", arXiv 2301.03767) a query embedded once by the new model searches the new-space part of the
gallery with φ_new(q) and the old-space part with ρ(φ_new(q)), instead of running the old model too. ρ is a
small network trained with both encoders frozen, on precomputed features (:func:`fit_features`).

Architecture (:class:`ReverseTransform`): ``depth`` Linear layers, ``in_dim → hidden → … → hidden →
out_dim``, each hidden one followed by an optional LayerNorm and a ReLU (depth 1: a linear map). LayerNorm
rather than BatchNorm: a per-item normalisation makes ρ of one query independent of the batch it came in,
and needs no running statistics. ``residual=True`` (``in_dim == out_dim``): ``x + MLP(x)`` with the last
layer zero-initialised, so the map starts as the identity (the new-space head ψ of
:mod:`dmlkit.upgrade.compatible`).

Loss (:func:`transform_loss`), for a batch of B items with labels y, r_i = normalize(ρ(φ_new(x_i))) and
o_i = normalize(φ_old(x_i)):

    L = (1/B) Σ_i (1 − r_i·o_i)                                                    (regression)
      + w · (1/B) Σ_i −(1/|P_i|) Σ_{p∈P_i} log( exp(r_i·o_p/τ) / Σ_{j=1..B} exp(r_i·o_j/τ) )   (InfoNCE)

with P_i = {j : y_j = y_i} (its own old embedding included), w = ``contrastive_weight`` and
τ = ``temperature``: the regression pulls ρ(φ_new(x)) onto φ_old(x); the supervised InfoNCE (one softmax
over the batch's old embeddings) makes it rank the old embeddings of its class above the others', which is
what searching an old gallery with it needs.

Files (:func:`save_transform` / :func:`load_transform`) hold tensors and plain values only (loaded with
``weights_only``): ``{"format": "dmlkit-upgrade-module", "version", "kind", "config", "state_dict",
"meta"}``; :mod:`dmlkit.upgrade.compatible` saves its heads in the same format with another ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.errors import ConfigError, DataError, NonFiniteLossError
from dmlkit.train.checkpoint import load_weights_only, save_atomic

FILE_FORMAT = "dmlkit-upgrade-module"
FILE_VERSION = 1
TRANSFORM_KIND = "reverse_transform"

#: ``loss_fn(module, *batch_tensors) -> (loss, stats)`` for :func:`fit_features`.
FeatureLoss = Callable[..., tuple[torch.Tensor, dict[str, float]]]


class ReverseTransform(nn.Module):
    """MLP ``in_dim → [hidden] × (depth − 1) → out_dim`` (Linear, optional LayerNorm, ReLU per hidden
    layer); ``residual``: ``x + MLP(x)``, starting as the identity. See the module docstring."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 512,
        depth: int = 2,
        *,
        layer_norm: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"transform {name} must be a positive int, got {value!r}")
        if residual and in_dim != out_dim:
            raise ConfigError(f"a residual transform needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.in_dim, self.out_dim, self.hidden, self.depth = in_dim, out_dim, hidden, depth
        self.layer_norm, self.residual = bool(layer_norm), bool(residual)
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth - 1):
            layers.append(nn.Linear(width, hidden))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden))
            layers.append(nn.ReLU())
            width = hidden
        last = nn.Linear(width, out_dim)
        if residual:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return x + out if self.residual else out  # type: ignore[no-any-return]

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (plain values): ``ReverseTransform(**config())`` rebuilds it."""
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "layer_norm": self.layer_norm,
            "residual": self.residual,
        }


def check_temperature(temperature: float) -> None:
    """``ConfigError`` unless ``temperature`` > 0 (shared by the losses of this package)."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")


def supcon_rows(logits: torch.Tensor, positives: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per-row ``log Σ_{j kept} exp(logits_ij) − mean_{p∈P_i} logits_ip`` (= −mean_p log softmax_kept).

    ``positives`` ⊆ ``kept`` (bool masks like ``logits``); every row needs a positive (callers include an
    item's own counterpart, so one always exists).
    """
    lse = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), dim=1)
    num_pos = positives.sum(dim=1).clamp_min(1)
    return lse - torch.where(positives, logits, 0.0).sum(dim=1) / num_pos


def check_features(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, labels: torch.Tensor) -> None:
    """``DataError`` naming the shapes unless ``a`` is [N, d], ``b`` [N, d'] and ``labels`` [N]."""
    if a.dim() != 2 or b.dim() != 2 or labels.dim() != 1 or not a.shape[0] == b.shape[0] == labels.shape[0]:
        raise DataError(
            f"{name_a} [N, d], {name_b} [N, d'] and N labels expected, got shapes {tuple(a.shape)}, "
            f"{tuple(b.shape)} and {tuple(labels.shape)}"
        )


def transform_loss(
    mapped: torch.Tensor,
    old_targets: torch.Tensor,
    labels: torch.Tensor,
    *,
    contrastive_weight: float = 1.0,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Regression + ``contrastive_weight`` × supervised InfoNCE (formula in the module docstring).

    ``mapped`` = ρ(φ_new(x)) ``[B, d_old]``, ``old_targets`` = φ_old(x) ``[B, d_old]`` (both normalised
    here). Stats: ``regression`` (mean 1 − cos) and ``contrastive`` (the InfoNCE), unweighted.
    """
    check_features("mapped", mapped, "old_targets", old_targets, labels)
    if mapped.shape[1] != old_targets.shape[1]:
        raise ConfigError(
            f"the transform outputs {mapped.shape[1]} dimensions, the old embeddings have "
            f"{old_targets.shape[1]}"
        )
    check_temperature(temperature)
    r = F.normalize(mapped.float(), dim=1)
    o = F.normalize(old_targets.float(), dim=1)
    regression = (1.0 - (r * o).sum(dim=1)).mean()
    loss = regression
    stats = {"regression": float(regression.detach())}
    if contrastive_weight != 0:
        positives = labels[:, None] == labels[None, :]
        kept = torch.ones_like(positives)
        contrastive = supcon_rows(r @ o.T / temperature, positives, kept).mean()
        loss = loss + contrastive_weight * contrastive
        stats["contrastive"] = float(contrastive.detach())
    return loss, stats


def fit_features(
    module: nn.Module,
    loss_fn: FeatureLoss,
    tensors: Sequence[torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    class_labels: torch.Tensor | None = None,
    samples_per_class: int | None = None,
) -> list[dict[str, float]]:
    """Adam on ``module`` over precomputed feature tensors; returns one row per epoch.

    Every epoch visits all N items once in a seeded random order (``seed``; the global RNG is untouched),
    in batches of ``batch_size`` (the last one smaller) — or, with ``samples_per_class`` K and the items'
    ``class_labels``, in the P×K batches of dmlkit's ``m_per_class`` sampler (``batch_size`` / K classes,
    K items each, seeded per epoch), so that a contrastive loss sees positives of other items in every
    batch; each batch is ``loss_fn(module, *(t[batch] for t in tensors))``. Rows: ``epoch``, ``loss`` and
    each stat, as means weighted by batch size. The module is moved to the tensors' device, trained in
    train mode and left in eval mode. A non-finite loss raises ``NonFiniteLossError`` naming the epoch.
    """
    if not tensors:
        raise ConfigError("fit_features needs at least one tensor")
    size = tensors[0].shape[0]
    if size == 0 or any(t.shape[0] != size for t in tensors):
        raise DataError(f"feature tensors need the same non-zero length, got {[t.shape[0] for t in tensors]}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0 or not weight_decay >= 0:
        raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got {lr} and {weight_decay}")
    device = tensors[0].device
    module.to(device).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    batches = _batches(size, batch_size, seed, class_labels, samples_per_class)
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        totals: dict[str, float] = {}
        seen = 0
        for chosen in batches(epoch):
            chosen = chosen.to(device)
            seen += len(chosen)
            loss, stats = loss_fn(module, *(t[chosen] for t in tensors))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({float(loss)}) in epoch {epoch} of feature training"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in {"loss": float(loss.detach()), **stats}.items():
                totals[key] = totals.get(key, 0.0) + value * len(chosen)
        history.append({"epoch": float(epoch), **{k: v / max(seen, 1) for k, v in totals.items()}})
    module.eval()
    return history


def _batches(
    size: int, batch_size: int, seed: int, class_labels: torch.Tensor | None, samples_per_class: int | None
) -> Callable[[int], Iterator[torch.Tensor]]:
    """The batches of an epoch (1-based): a seeded shuffle, or P×K batches of the m_per_class sampler."""
    if samples_per_class is None:
        generator = torch.Generator().manual_seed(seed)

        def shuffled(epoch: int) -> Iterator[torch.Tensor]:
            order = torch.randperm(size, generator=generator)
            return iter(order.split(batch_size))

        return shuffled
    from dmlkit import samplers

    if class_labels is None or len(class_labels) != size:
        raise ConfigError("samples_per_class needs class_labels, one per feature row")
    sampler = samplers.build(
        "m_per_class",
        labels=class_labels.cpu().numpy(),
        batch_size=batch_size,
        samples_per_class=samples_per_class,
        seed=seed,
    )

    def balanced(epoch: int) -> Iterator[torch.Tensor]:
        sampler.set_epoch(epoch - 1)
        return (torch.as_tensor(batch, dtype=torch.int64) for batch in sampler)

    return balanced


def seeded_module(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``seed`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def train_transform(
    new_features: torch.Tensor,
    old_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    hidden: int = 512,
    depth: int = 2,
    layer_norm: bool = False,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    contrastive_weight: float = 1.0,
    temperature: float = 0.1,
    seed: int = 0,
    samples_per_class: int | None = None,
) -> tuple[ReverseTransform, list[dict[str, float]]]:
    """Train ρ: ``new_features`` ``[N, d_new]`` → ``old_features`` ``[N, d_old]`` with :func:`transform_loss`
    (``labels``: N class codes), by :func:`fit_features`. Returns the module (eval mode, on the features'
    device) and the per-epoch history."""
    check_features("new_features", new_features, "old_features", old_features, labels)
    check_temperature(temperature)
    module = seeded_module(
        seed,
        lambda: ReverseTransform(
            new_features.shape[1], old_features.shape[1], hidden, depth, layer_norm=layer_norm
        ),
    )

    def loss_fn(
        rho: nn.Module, new: torch.Tensor, old: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mapped = rho(new)
        return transform_loss(mapped, old, y, contrastive_weight=contrastive_weight, temperature=temperature)

    history = fit_features(
        module,
        loss_fn,
        [new_features.float(), old_features.float(), labels.long()],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        class_labels=labels,
        samples_per_class=samples_per_class,
        weight_decay=weight_decay,
        seed=seed,
    )
    return module, history  # type: ignore[return-value]


def _check_plain(value: Any, where: str) -> None:
    """Meta must load with ``weights_only``: tensors, str/int/float/bool/None, lists, tuples and dicts
    with string keys."""
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}.{key}")
        return
    raise ConfigError(
        f"{where} ({type(value).__name__}) cannot be saved: only tensors and plain Python values can"
    )


def save_module_file(
    path: str | Path, kind: str, config: dict[str, Any], module: nn.Module, meta: Mapping[str, Any]
) -> None:
    """Write ``{"format", "version", "kind", "config", "state_dict", "meta"}`` atomically."""
    _check_plain(dict(meta), "meta")
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    save_atomic(
        {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "kind": kind,
            "config": dict(config),
            "state_dict": state,
            "meta": dict(meta),
        },
        path,
    )


def load_module_file(path: str | Path, kind: str, what: str) -> dict[str, Any]:
    """The contents of a :func:`save_module_file` file of ``kind``; ``DataError`` naming the file
    otherwise."""
    data = load_weights_only(path, what)
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise DataError(f"{path} is not a dmlkit {what} file (no '{FILE_FORMAT}' format marker)")
    if data.get("version") != FILE_VERSION:
        raise DataError(f"{what} {path} has format version {data.get('version')}, expected {FILE_VERSION}")
    if data.get("kind") != kind:
        raise DataError(f"{path} holds a {data.get('kind')}, not a {kind}")
    for key, typ in (("config", dict), ("state_dict", dict), ("meta", dict)):
        if not isinstance(data.get(key), typ):
            raise DataError(f"{what} {path} lacks its '{key}' entry")
    return data


def load_state(module: nn.Module, state: dict[str, Any], path: str | Path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{what} {path} does not match its config: {first}") from exc


def save_transform(path: str | Path, module: ReverseTransform, meta: Mapping[str, Any] | None = None) -> None:
    """Save ρ (config, weights) and ``meta`` (plain values: e.g. the two models' checkpoints) atomically."""
    save_module_file(path, TRANSFORM_KIND, module.config(), module, meta or {})


def load_transform(path: str | Path) -> tuple[ReverseTransform, dict[str, Any]]:
    """``(ρ in eval mode on the CPU, meta)`` from a :func:`save_transform` file; ``DataError`` naming the
    file for anything else."""
    what = "reverse transform"
    data = load_module_file(path, TRANSFORM_KIND, what)
    try:
        module = ReverseTransform(**data["config"])
    except (TypeError, ConfigError) as exc:
        raise DataError(f"{what} {path} has an invalid config {data['config']}: {exc}") from exc
    load_state(module, data["state_dict"], path, what)
    return module.eval(), data["meta"]


__all__ = [
    "ReverseTransform",
    "fit_features",
    "load_transform",
    "save_transform",
    "train_transform",
    "transform_loss",
]
