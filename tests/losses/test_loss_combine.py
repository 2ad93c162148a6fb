"""The ``multiple`` combinator: a weighted sum of losses, each optionally fed by its own miner. Checked
against the weighted sum of individually built losses and miners, and against PML's ``MultipleLosses``."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import yaml
from proxy_checks import TOL, grads_close, make_batch

from dmlkit import losses, miners
from dmlkit.config import add_config_arguments, config_from_args, validate_names
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.losses.combine import check_members, declared_attributes

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

C, D = 5, 8

MEMBERS = [
    {"name": "contrastive", "args": {"pos_margin": 0.1}, "miner": "batch_hard"},
    {"name": "arcface", "weight": 0.5, "args": {"scale": 16.0}},
    {"name": "multisimilarity", "weight": 2.0, "miner": "multisimilarity", "miner_args": {"epsilon": 0.2}},
]


def build_multiple(members: list, dtype: torch.dtype = torch.float64, **kwargs) -> torch.nn.Module:
    return losses.build("multiple", losses=members, num_classes=C, embedding_size=D, **kwargs).to(dtype)


def test_equals_the_weighted_sum_of_its_members_with_their_miners() -> None:
    emb, labels = make_batch(24, D, C, torch.float64, seed=1)
    combined = build_multiple(MEMBERS)
    separate = [
        (losses.build("contrastive", pos_margin=0.1), miners.build("batch_hard"), 1.0),
        (losses.build("arcface", num_classes=C, embedding_size=D, scale=16.0).double(), None, 0.5),
        (losses.build("multisimilarity"), miners.build("multisimilarity", epsilon=0.2), 2.0),
    ]
    with torch.no_grad():
        separate[1][0].W.copy_(combined.losses[1].W)
    x = emb.clone().requires_grad_(True)
    value = combined(x, labels)
    value.backward()
    x_ref = emb.clone().requires_grad_(True)
    expected = sum(
        weight * loss(x_ref, labels, None if miner is None else miner(x_ref, labels))
        for loss, miner, weight in separate
    )
    expected.backward()
    torch.testing.assert_close(value, expected, **TOL[torch.float64])
    grads_close(x.grad, x_ref.grad, x, TOL[torch.float64])
    grads_close(combined.losses[1].W.grad, separate[1][0].W.grad, separate[1][0].W, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_pml_multiple_losses_with_miners(dtype) -> None:
    emb, labels = make_batch(24, D, C, dtype, seed=2)
    ours = build_multiple(
        [{"name": "contrastive", "miner": "batch_hard"}, {"name": "arcface", "weight": 0.5}], dtype
    )
    arcface = pml_losses.ArcFaceLoss(C, D).to(dtype)
    with torch.no_grad():
        ours.losses[1].W.copy_(arcface.W)
    theirs = pml_losses.MultipleLosses(
        [pml_losses.ContrastiveLoss(), arcface], miners=[pml_miners.BatchHardMiner(), None], weights=[1, 0.5]
    )
    _compare_with_pml(ours, theirs, arcface, emb, labels)


def test_outer_indices_tuple_reaches_every_member_that_can_use_it_as_in_pml() -> None:
    """PML passes its indices_tuple to every member; arcface uses it as sample weights, as PML does."""
    emb, labels = make_batch(24, D, C, torch.float64, seed=3)
    tuples = pml_miners.MultiSimilarityMiner()(emb, labels)
    ours = build_multiple([{"name": "multisimilarity"}, {"name": "arcface", "weight": 0.25}])
    arcface = pml_losses.ArcFaceLoss(C, D).double()
    with torch.no_grad():
        ours.losses[1].W.copy_(arcface.W)
    theirs = pml_losses.MultipleLosses([pml_losses.MultiSimilarityLoss(), arcface], weights=[1, 0.25])
    _compare_with_pml(ours, theirs, arcface, emb, labels, tuples)


def _compare_with_pml(ours, theirs, pml_arcface, emb, labels, tuples=None) -> None:
    tol = TOL[emb.dtype]
    x, x_ref = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    value, expected = ours(x, labels, tuples), theirs(x_ref, labels, tuples)
    torch.testing.assert_close(value, expected, **tol)
    value.backward()
    expected.backward()
    grads_close(x.grad, x_ref.grad, x, tol)
    grads_close(ours.losses[1].W.grad, pml_arcface.W.grad, pml_arcface.W, tol)


def test_tuple_kinds_are_the_union_over_members_without_their_own_miner() -> None:
    assert losses.REGISTRY.get("multiple").tuple_kinds == {"pairs", "triplets"}  # permissive class value
    assert build_multiple(["contrastive", "p2sgrad"]).tuple_kinds == {"pairs", "triplets"}
    only_own = build_multiple([{"name": "contrastive", "miner": "batch_hard"}, "p2sgrad"])
    assert only_own.tuple_kinds == frozenset()
    with pytest.raises(ConfigError, match="takes no miner"):
        miners.check_compatible(only_own, "batch_hard")
    emb, labels = make_batch(16, D, C, torch.float32, seed=0)
    with pytest.raises(ConfigError, match="cannot use an indices_tuple"):
        only_own(emb, labels, miners.build("batch_hard")(emb, labels))


def test_members_that_cannot_use_the_outer_tuples_are_computed_without_them() -> None:
    emb, labels = make_batch(16, D, C, torch.float64, seed=4)
    combined = build_multiple(["contrastive", {"name": "p2sgrad", "weight": 3.0}])
    tuples = miners.build("batch_hard")(emb, labels)
    p2sgrad = losses.build("p2sgrad", num_classes=C, embedding_size=D).double()
    with torch.no_grad():
        p2sgrad.weight.copy_(combined.losses[1].weight)
    expected = losses.build("contrastive")(emb, labels, tuples) + 3.0 * p2sgrad(emb, labels)
    torch.testing.assert_close(combined(emb, labels, tuples), expected, **TOL[torch.float64])


def test_a_reference_set_call_is_answered_by_the_members_that_accept_one() -> None:
    """Members without ``accepts_ref`` are skipped in a reference-set call: a cross-batch memory objective
    ``L(batch) + w·L(batch, memory)`` then counts them once, in the batch term."""
    emb, labels = make_batch(12, D, C, torch.float64, seed=5)
    ref, ref_labels = make_batch(20, D, C, torch.float64, seed=6)
    members = [
        {"name": "contrastive", "miner": "batch_hard"},
        {"name": "arcface"},
        {"name": "multisimilarity", "weight": 0.5},
    ]
    combined = build_multiple(members)
    assert combined.accepts_ref is True
    mined = miners.build("batch_hard")(emb, labels, ref, ref_labels)
    outer = miners.build("multisimilarity")(emb, labels, ref, ref_labels)
    expected = losses.build("contrastive")(emb, labels, mined, ref, ref_labels) + 0.5 * losses.build(
        "multisimilarity"
    )(emb, labels, outer, ref, ref_labels)
    value = combined(emb, labels, outer, ref_emb=ref, ref_labels=ref_labels)
    torch.testing.assert_close(value, expected, **TOL[torch.float64])
    assert not any(key.startswith("1_arcface/") for key in combined.last_stats)
    combined(emb, labels)  # the batch alone: every member
    assert "1_arcface/loss" in combined.last_stats
    proxies_only = build_multiple(["arcface", "proxyanchor"])
    assert proxies_only.accepts_ref is False
    with pytest.raises(ConfigError, match="does not accept ref_emb"):
        proxies_only(emb, labels, ref_emb=ref, ref_labels=ref_labels)


@pytest.mark.parametrize(
    "members",
    [
        ["contrastive", "p2sgrad"],
        [{"name": "contrastive", "miner": "batch_hard"}, "p2sgrad"],
        ["arcface", "proxyanchor"],
        ["p2sgrad", {"name": "multiple", "args": {"losses": ["triplet", "manifold"]}}],
        ["manifold", {"name": "multiple", "args": {"losses": [{"name": "triplet", "miner": "batch_hard"}]}}],
    ],
)
def test_declared_attributes_match_the_built_instance(members) -> None:
    built = build_multiple(members)
    assert declared_attributes(members) == (built.tuple_kinds, built.accepts_ref)


def test_capabilities_of_a_configuration_without_building_it() -> None:
    for name in losses.available():
        cls = losses.REGISTRY.get(name)
        if name != "multiple":
            assert losses.capabilities(name, {}) == (cls.tuple_kinds, cls.accepts_ref)
    members = [{"name": "contrastive", "miner": "batch_hard"}, "p2sgrad"]
    assert losses.capabilities("multiple", {"losses": members}) == declared_attributes(members)
    assert losses.capabilities("multiple", {"losses": members}) == (frozenset(), True)
    with pytest.raises(ConfigError, match=re.escape("loss 'multiple' needs loss_args {losses: ")):
        losses.capabilities("multiple", {})
    with pytest.raises(UnknownNameError, match="did you mean 'multisimilarity'"):
        losses.capabilities("multisimilarty", {})


def test_a_miner_is_checked_against_the_configured_kinds() -> None:
    multiple = losses.REGISTRY.get("multiple")
    only_own = [{"name": "contrastive", "miner": "batch_hard"}, "p2sgrad"]
    kinds, _ = losses.capabilities("multiple", {"losses": only_own})
    with pytest.raises(
        ConfigError,
        match="miner 'batch_hard' outputs triplets, which no member of this 'multiple' loss without its own "
        "miner can use",
    ):
        miners.check_fits(multiple, kinds, "batch_hard")
    miners.check_fits(multiple, losses.capabilities("multiple", {"losses": ["contrastive"]})[0], "batch_hard")
    for name in ("contrastive", "p2sgrad"):  # the class's kinds: check_compatible's messages
        cls = losses.REGISTRY.get(name)
        for miner in miners.available():
            try:
                miners.check_compatible(cls, miner)
            except ConfigError as expected:
                with pytest.raises(ConfigError, match=re.escape(str(expected))):
                    miners.check_fits(cls, losses.capabilities(name, {})[0], miner)
            else:
                miners.check_fits(cls, losses.capabilities(name, {})[0], miner)


def test_num_classes_and_embedding_size_go_to_the_members_that_need_them() -> None:
    assert losses.REGISTRY.get("multiple").needs == {"num_classes", "embedding_size"}
    combined = build_multiple(
        ["contrastive", "proxyanchor", {"name": "softtriple", "args": {"num_classes": 7}}]
    )
    assert combined.losses[1].num_classes == C and combined.losses[1].embedding_size == D
    assert combined.losses[2].num_classes == 7  # the member's own args win
    # without them, pair losses alone are fine; a member that needs them is named
    assert losses.build("multiple", losses=["contrastive", "triplet"])(*make_batch(8, D, C, torch.float32, 0))
    with pytest.raises(ConfigError, match=r"losses\[1\] \('arcface'\) needs num_classes"):
        losses.build("multiple", losses=["contrastive", "arcface"], embedding_size=D)


def test_nested_multiple_receives_what_it_needs() -> None:
    inner = {"name": "multiple", "weight": 0.5, "args": {"losses": ["arcface", "contrastive"]}}
    combined = build_multiple(["triplet", inner], torch.float32)
    emb, labels = make_batch(16, D, C, torch.float32, seed=0)
    assert torch.isfinite(combined(emb, labels))
    assert "1_multiple/0_arcface/avg_angle" in combined.last_stats


def test_parameters_are_exposed_and_one_step_reduces_the_loss() -> None:
    combined = build_multiple(MEMBERS, torch.float32)
    assert isinstance(combined.losses, torch.nn.ModuleList)
    params = list(combined.parameters())
    assert len(params) == 1 and params[0] is combined.losses[1].W
    emb, labels = make_batch(24, D, C, torch.float32, seed=7)
    before = combined(emb, labels)
    optimizer = torch.optim.SGD(params, lr=0.05)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert combined(emb, labels).item() < before.item()


def test_last_stats_are_prefixed_by_member() -> None:
    combined = build_multiple(MEMBERS, torch.float32)
    emb, labels = make_batch(24, D, C, torch.float32, seed=8)
    combined(emb, labels)
    stats = combined.last_stats
    contrastive = combined.losses[0].last_stats
    assert stats["0_contrastive/num_pos_pairs"] == contrastive["num_pos_pairs"]
    assert stats["0_contrastive/miner/num_triplets"] == combined.miners["0"].last_stats["num_triplets"]
    assert "1_arcface/avg_angle" in stats and "2_multisimilarity/miner/num_pos_pairs" in stats
    members = [stats[f"{k}_{m['name']}/loss"] for k, m in enumerate(MEMBERS)]
    value = combined(emb, labels)
    assert value.item() == pytest.approx(
        sum(m.get("weight", 1.0) * v for m, v in zip(MEMBERS, members, strict=True))
    )


def test_bf16_autocast_is_finite_and_close_to_float32() -> None:
    combined = build_multiple(MEMBERS, torch.float32)
    emb, labels = make_batch(24, D, C, torch.float32, seed=9)
    reference = combined(emb, labels)
    x = emb.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = combined(x, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(x.grad.float()).all()
    torch.testing.assert_close(value, reference, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        ([], ConfigError, "losses is empty"),
        ("contrastive", ConfigError, "must be a list"),
        ([{"name": "contrastiv"}], UnknownNameError, "did you mean 'contrastive'"),
        ([{"name": "contrastive", "wieght": 2}], UnknownNameError, "'wieght'.*did you mean 'weight'"),
        ([{"name": "contrastive", "args": {"neg_margn": 1}}], UnknownNameError, "did you mean 'neg_margin'"),
        ([{"name": "contrastive", "miner": "batch_hardd"}], UnknownNameError, "did you mean 'batch_hard'"),
        ([{"name": "contrastive", "miner": "batch_hard", "miner_args": {"x": 1}}], UnknownNameError, "'x'"),
        (
            [{"name": "contrastive", "miner_args": {"epsilon": 1}}],
            ConfigError,
            "miner_args given but no miner",
        ),
        ([{"name": "p2sgrad", "miner": "batch_hard"}], ConfigError, "cannot use miner 'batch_hard'"),
        ([{"name": "contrastive", "weight": "1"}], ConfigError, "weight must be a finite number"),
        ([{"weight": 1.0}], ConfigError, "needs a 'name'"),
        ([3], ConfigError, r"losses\[0\] must be a loss name or a mapping"),
        ([{"name": "contrastive", "args": [1]}], ConfigError, "args must be a mapping"),
    ],
)
def test_configuration_errors_name_the_culprit(members, error, match) -> None:
    with pytest.raises(error, match=match):
        check_members(members)
    with pytest.raises(error, match=match):
        losses.build("multiple", losses=members, num_classes=C, embedding_size=D)


def test_built_from_the_command_line_through_the_trainer_objective() -> None:
    from dmlkit.train.objective import build_objective

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    loss_args = (
        "{losses: [{name: contrastive, miner: batch_hard}, {name: arcface, weight: 0.5, args: {scale: 30}}]}"
    )
    config = config_from_args(parser.parse_args(["--loss", "multiple", "--loss-args", loss_args]))
    validate_names(config)
    objective = build_objective(config, num_classes=C, embedding_size=D)
    assert objective.loss.losses[1].num_classes == C and objective.loss.losses[1].scale == 30.0
    emb, labels = make_batch(16, D, C, torch.float32, seed=0)
    value, stats = objective(emb, labels)
    assert torch.isfinite(value) and "loss/0_contrastive/miner/num_triplets" in stats


def test_yaml_configuration() -> None:
    text = """
    losses:
      - {name: contrastive, weight: 1.0, miner: batch_hard}
      - name: proxyanchor
        weight: 0.1
        args: {margin: 0.2}
    """
    combined = losses.build("multiple", **yaml.safe_load(text), num_classes=C, embedding_size=D)
    assert combined.weights == [1.0, 0.1] and combined.losses[1].margin == 0.2


def test_cross_batch_memory_objective_counts_proxy_members_once() -> None:
    """With a memory, the objective adds ``w · multiple(batch, memory)``: only the pair member answers it."""
    from dmlkit.config import make_config
    from dmlkit.train.objective import build_objective

    members = [{"name": "contrastive"}, {"name": "arcface", "weight": 0.5}]
    config = make_config({"loss": "multiple", "loss_args": {"losses": members}, "xbm_size": 64})
    validate_names(config)
    objective = build_objective(config, num_classes=C, embedding_size=D, train_size=1000)
    emb1, labels1 = make_batch(16, D, C, torch.float32, seed=1)
    emb2, labels2 = make_batch(16, D, C, torch.float32, seed=2)
    objective(emb1, labels1, torch.arange(16))  # fills the memory
    value, stats = objective(emb2, labels2, torch.arange(16, 32))
    batch_term = objective.loss(emb2, labels2)
    memory_term = losses.build("contrastive")(emb2, labels2, ref_emb=emb1, ref_labels=labels1)
    torch.testing.assert_close(value, batch_term + memory_term)
    assert "xbm/loss/0_contrastive/loss" in stats and "xbm/loss/1_arcface/loss" not in stats
