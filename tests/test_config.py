"""Configuration: YAML + flags, unknown keys with suggestions, invalid values rejected before data loading."""

from __future__ import annotations

import pytest
import yaml

from dmlkit.cli import build_parser, main
from dmlkit.config import TrainConfig, config_from_args, dump_yaml, load_yaml, make_config
from dmlkit.errors import ConfigError, UnknownNameError


def parse(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_are_valid() -> None:
    config = make_config({})
    assert config.dataset == "synthetic" and config.loss == "multisimilarity"
    assert config.sampler == "m_per_class" and config.scheduler == "warmup_cosine"


def test_unknown_yaml_key_names_key_and_suggests(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("embeding_size: 32\n")
    with pytest.raises(UnknownNameError) as err:
        load_yaml(path)
    message = str(err.value)
    assert "embeding_size" in message and "embedding_size" in message and str(path) in message


def test_unknown_flag_suggests_closest(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "--embeding-size", "32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--embeding-size" in err and "--embedding-size" in err


def test_flag_prefixes_are_not_silently_accepted(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--embedding", "32"])


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["--lr", "-0.1"], "lr"),
        (["--batch-size", "30", "--samples-per-class", "4"], "samples_per_class"),
        (["--val-fraction", "1.5"], "val_fraction"),
        (["--epochs", "ten"], "epochs"),
        (["--select-metric", "recall@16"], "select_metric"),
        (["--eval-backend", "faiss-flat", "--metrics", "recall@1,mrr", "--select-metric", "recall@1"], "mrr"),
        (
            ["--eval-distance", "dot", "--metrics", "recall@1,dists@intra", "--select-metric", "recall@1"],
            "dot",
        ),
    ],
)
def test_invalid_values_name_the_key(argv: list[str], culprit: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(argv)
    assert culprit in str(err.value)


@pytest.mark.parametrize(
    ("argv", "bad", "suggestion"),
    [
        (["--loss", "multisimilarty"], "multisimilarty", "multisimilarity"),
        (["--loss-args", "alpah=2"], "alpah", "alpha"),
        (["--sampler", "m_per_clas"], "m_per_clas", "m_per_class"),
        (["--dataset", "synthetik"], "synthetik", "synthetic"),
        (["--metrics", "recall@1,map@rr", "--select-metric", "recall@1"], "map@rr", "map@r"),
        (["--backbone", "small_cn"], "small_cn", "small_cnn"),
    ],
)
def test_unknown_names_are_rejected_with_suggestion(argv: list[str], bad: str, suggestion: str) -> None:
    with pytest.raises(UnknownNameError) as err:
        parse(argv)
    assert bad in str(err.value) and suggestion in str(err.value)


def test_config_errors_come_before_data_loading(tmp_path, capsys) -> None:
    missing = tmp_path / "does-not-exist"
    code = main(
        [
            "train",
            "--dataset",
            "folder",
            "--data-root",
            str(missing),
            "--loss",
            "multisimilarty",
            "--output-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "multisimilarty" in err and "does-not-exist" not in err
    assert not (tmp_path / "runs").exists()


def test_flags_override_yaml_and_dump_round_trips(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.01, "epochs": 3, "loss_args": {"alpha": 1.5}}))
    config = parse(
        [
            "--config",
            str(path),
            "--epochs",
            "5",
            "--metrics",
            "recall@1,map@r",
            "--select-metric",
            "recall@1",
            "--no-normalize",
        ]
    )
    assert config.lr == 0.01 and config.epochs == 5 and config.loss_args == {"alpha": 1.5}
    assert config.metrics == ["recall@1", "map@r"] and config.normalize is False
    out = tmp_path / "resolved.yaml"
    dump_yaml(config, out)
    assert parse(["--config", str(out)]) == config


def test_mapping_flags_accept_yaml_and_key_value() -> None:
    assert parse(["--loss-args", "{alpha: 2, beta: 40}"]).loss_args == {"alpha": 2, "beta": 40}
    assert parse(["--loss-args", "alpha=2,beta=40.5"]).loss_args == {"alpha": 2, "beta": 40.5}


def test_help_lists_every_option_with_default(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name, _info in TrainConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text, name
    assert "(default: 0.001)" in text  # lr
    assert text.count("(default:") >= len(TrainConfig.model_fields)


def test_eval_options_offer_every_distance_and_backend() -> None:
    """The training configuration's choices are exactly what the search accepts."""
    import typing

    from dmlkit.distances import DISTANCES
    from dmlkit.metrics import BACKENDS

    fields = TrainConfig.model_fields
    assert set(typing.get_args(fields["eval_distance"].annotation)) == set(DISTANCES)
    assert set(typing.get_args(fields["eval_backend"].annotation)) == set(BACKENDS)
    config = parse(["--eval-distance", "euclidean", "--eval-backend", "faiss-ivf", "--metrics", "mrr@10",
                    "--select-metric", "mrr@10"])  # fmt: skip
    assert (config.eval_distance, config.eval_backend) == ("euclidean", "faiss-ivf")


@pytest.mark.parametrize(("key", "value"), [("eval_distance", "manhattan"), ("eval_backend", "faiss")])
def test_unknown_eval_options_name_the_key(key: str, value: str, capsys) -> None:
    with pytest.raises(ConfigError) as err:
        make_config({key: value})
    assert key in str(err.value) and value in str(err.value)
    with pytest.raises(SystemExit):  # the flag lists its choices
        parse([f"--{key.replace('_', '-')}", value])
    assert "invalid choice" in capsys.readouterr().err
