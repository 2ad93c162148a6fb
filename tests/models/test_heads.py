"""Heads: linear (optionally batch-normalised), 2-layer MLP, none; sizes and arguments checked."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.models import build_model, heads


def test_registry() -> None:
    assert heads.available() == ["linear", "mlp", "none"]
    assert heads.build("linear", in_features=6, embedding_size=3)(torch.randn(2, 6)).shape == (2, 3)
    assert (
        heads.for_embedding_size(6, 3).out_features == 3
        and heads.for_embedding_size(6, None).out_features == 6
    )
    assert isinstance(heads.for_embedding_size(6, 0), heads.IdentityHead)


def test_linear_head_with_batchnorm_matches_its_formula() -> None:
    torch.manual_seed(0)
    head = heads.build("linear", in_features=6, embedding_size=3, bn=True)
    assert head.linear.bias is None  # cancelled by the BatchNorm's mean subtraction
    x = torch.randn(8, 6)
    head.train()
    reference = nn.functional.batch_norm(
        x @ head.linear.weight.T, None, None, head.bn.weight, head.bn.bias, training=True
    )
    torch.testing.assert_close(head(x), reference)
    assert heads.build("linear", in_features=6, embedding_size=3, bn=True, bias=True).linear.bias is not None
    assert heads.build("linear", in_features=6, embedding_size=3).bn is None


def test_mlp_head_matches_its_formula() -> None:
    torch.manual_seed(0)
    head = heads.build("mlp", in_features=6, embedding_size=3, hidden_size=5).eval()
    first, bn, _, second = head.mlp
    x = torch.randn(4, 6)
    hidden = torch.relu(
        (x @ first.weight.T - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    )
    torch.testing.assert_close(head(x), hidden @ second.weight.T + second.bias)
    plain = heads.build("mlp", in_features=6, embedding_size=3, bn=False)
    assert [type(m) for m in plain.mlp] == [nn.Linear, nn.ReLU, nn.Linear] and plain.mlp[0].out_features == 6
    with pytest.raises(ConfigError, match="hidden_size > 0"):
        heads.build("mlp", in_features=6, embedding_size=3, hidden_size=0)


def test_build_model_heads_and_checkpoint_config() -> None:
    model = build_model(
        "small_cnn", 12, head="mlp", head_args={"hidden_size": 32, "bn": False}, widths=[8, 16]
    )
    assert isinstance(model.head, heads.MLPHead) and model.embedding_size == 12
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 12)
    assert model.config["head"] == "mlp" and model.config["head_args"] == {"hidden_size": 32, "bn": False}
    assert json.loads(json.dumps(model.config)) == model.config
    rebuilt = build_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())  # same architecture
    raw = build_model("small_cnn", 0, head="none", widths=[8, 16], normalize=False)
    x = torch.randn(2, 3, 16, 16)
    raw.eval()
    torch.testing.assert_close(raw(x), raw.features(x))  # raw pooled features
    assert raw.embedding_size == raw.feature_dim == 16


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"head": "none", "embedding_size": 8}, ConfigError, "embedding_size must be 0"),
        ({"head": "mlp", "embedding_size": 0}, ConfigError, "needs an embedding_size > 0"),
        (
            {"head": "linear", "embedding_size": 0, "head_args": {"bn": True}},
            ConfigError,
            "needs an embedding",
        ),
        ({"head": "linear", "head_args": {"embedding_size": 3}}, ConfigError, "--embedding-size"),
        ({"head": "mlp", "head_args": {"hiden_size": 3}}, UnknownNameError, "hidden_size"),
        ({"head": "mpl"}, UnknownNameError, "mlp"),
        ({"head": "linear", "head_args": {"bn": "yes"}}, ConfigError, "bn"),
    ],
)
def test_head_errors_name_the_culprit(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        build_model("small_cnn", **{"embedding_size": 8, **kwargs})


def test_config_head_flags() -> None:
    from dmlkit.cli import build_parser
    from dmlkit.config import config_from_args, make_config

    def parse(argv: list[str]):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    config = parse(["--head", "mlp", "--head-args", "{hidden_size: 256}", "--embedding-size", "32"])
    assert config.model.model_kwargs()["head"] == "mlp"
    assert config.model.model_kwargs()["head_args"] == {"hidden_size": 256}
    assert parse(["--head", "none"]).model.embedding_size == 0  # no head: no size needed
    with pytest.raises(ConfigError, match="embedding_size must be 0"):
        parse(["--head", "none", "--embedding-size", "32"])
    with pytest.raises(ConfigError, match="hiden_size"):
        make_config({"head": "mlp", "head_args": {"hiden_size": 3}})
    assert make_config({}).model.head.name == "linear"
