"""Configuration: YAML + flags, unknown keys with suggestions, invalid values rejected before data loading."""

from __future__ import annotations

import pytest
import yaml

from dmlkit.cli import build_parser, main
from dmlkit.config import (
    ComponentSpec,
    TrainConfig,
    config_from_args,
    dump_yaml,
    flag_names,
    load_yaml,
    make_config,
)
from dmlkit.config.flags import CHOICES
from dmlkit.errors import ConfigError, UnknownNameError


def parse(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_are_valid() -> None:
    config = make_config({})
    assert config.data.dataset.name == "synthetic" and config.objective.loss.name == "multisimilarity"
    assert config.data.sampler.name == "m_per_class" and config.optim.scheduler == "warmup_cosine"


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
    sections = {"optim": {"lr": 0.01, "epochs": 3}, "objective": {"loss": {"name": "multisimilarity"}}}
    sections["objective"]["loss"]["args"] = {"alpha": 1.5}
    path.write_text(yaml.safe_dump(sections))
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
    assert (
        config.optim.lr == 0.01 and config.optim.epochs == 5 and config.objective.loss.args == {"alpha": 1.5}
    )
    assert config.eval.metrics == ["recall@1", "map@r"] and config.model.normalize is False
    out = tmp_path / "resolved.yaml"
    dump_yaml(config, out)
    assert parse(["--config", str(out)]) == config


def test_mapping_flags_accept_yaml_and_key_value() -> None:
    assert parse(["--loss-args", "{alpha: 2, beta: 40}"]).objective.loss.args == {"alpha": 2, "beta": 40}
    assert parse(["--loss-args", "alpha=2,beta=40.5"]).objective.loss.args == {"alpha": 2, "beta": 40.5}


def test_help_lists_every_option_with_default(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in flag_names():
        assert flag in text, flag
    assert "(default: 0.001)" in text  # lr
    assert text.count("(default:") >= len(flag_names())


def test_eval_options_offer_every_distance_and_backend() -> None:
    """The training configuration's choices are exactly what the search accepts."""
    from dmlkit.distances import available
    from dmlkit.metrics import BACKENDS

    assert set(CHOICES["eval_distance"]()) == set(available(indexable=True))
    assert set(CHOICES["eval_backend"]()) == set(BACKENDS)
    config = parse(["--eval-distance", "euclidean", "--eval-backend", "faiss-ivf", "--metrics", "mrr@10",
                    "--select-metric", "mrr@10"])  # fmt: skip
    assert (config.eval.eval_distance, config.eval.eval_backend) == ("euclidean", "faiss-ivf")


@pytest.mark.parametrize(("key", "value"), [("eval_distance", "manhattan"), ("eval_backend", "faiss")])
def test_unknown_eval_options_name_the_key(key: str, value: str, capsys) -> None:
    with pytest.raises(ConfigError) as err:
        make_config({key: value})
    assert key in str(err.value) and value in str(err.value)
    with pytest.raises(SystemExit):  # the flag lists its choices
        parse([f"--{key.replace('_', '-')}", value])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Sections


def test_yaml_in_sections_with_component_specs(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"embedding_size": 32},
                "objective": {"loss": {"name": "triplet", "args": {"margin": 0.1}}, "miner": "batch_hard"},
                "optim": {"lr": 0.01},
            }
        )
    )
    config = parse(["--config", str(path), "--miner-args", "{distance: cosine}"])
    assert config.model.embedding_size == 32 and config.optim.lr == 0.01
    assert (config.objective.loss.name, config.objective.loss.args) == ("triplet", {"margin": 0.1})
    assert (config.objective.miner.name, config.objective.miner.args) == (
        "batch_hard",
        {"distance": "cosine"},
    )


def test_flat_yaml_is_converted_with_a_warning_naming_each_move(tmp_path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.01, "loss": "triplet", "loss_args": {"margin": 0.1}}))
    with pytest.warns(FutureWarning) as caught:
        config = parse(["--config", str(path)])
    message = str(caught[0].message)
    assert (
        str(path) in message and "lr → optim.lr" in message and "loss_args → objective.loss.args" in message
    )
    assert config.optim.lr == 0.01 and config.objective.loss.args == {"margin": 0.1}
    resolved = tmp_path / "resolved.yaml"
    dump_yaml(config, resolved)
    assert set(yaml.safe_load(resolved.read_text())) == {
        "run", "data", "model", "objective", "memory", "optim", "eval", "log"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "bad", "suggestion"),
    [
        ("optm:\n  lr: 0.1\n", "optm", "optim"),
        ("optim:\n  lrr: 0.1\n", "optim.lrr", "optim.lr"),
        ("model:\n  embeding_size: 8\n", "model.embeding_size", "model.embedding_size"),
    ],
)
def test_unknown_section_or_key_is_named_with_suggestion(tmp_path, text, bad, suggestion) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(UnknownNameError) as err:
        load_yaml(path)
    assert bad in str(err.value) and suggestion in str(err.value) and str(path) in str(err.value)


def test_make_config_takes_sections_and_flag_names_alike() -> None:
    assert make_config({"optim": {"lr": 0.5}}) == make_config({"lr": 0.5})
    config = make_config({"loss": "arcface", "loss_args": {"margin": 20}, "miner": None})
    assert config.objective.loss == ComponentSpec(name="arcface", args={"margin": 20})


def test_miner_args_without_a_miner_are_an_error() -> None:
    with pytest.raises(ConfigError, match="no miner"):
        parse(["--miner-args", "{margin: 0.1}"])
    with pytest.raises(ConfigError, match="no miner"):
        parse(["--miner", "none", "--miner-schedule", "linear:start=0.5,end=0.1"])


def test_help_shows_each_default_once_and_names_real_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: a timestamp)" in text and "(default: a timestamp) (default" not in text
    assert "dmlkit list losses" in text and "`dmlkit losses`" not in text


def test_configuration_doc_lists_every_key_with_its_flag() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for flag in flag_names():
        assert f"`{flag}`" in text, flag


# ------------------------------------------------------------------ YAML 1.2 numbers, malformed flag values


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-40", 1e-40),
        ("1E5", 1e5),
        (".5", 0.5),
        ("-1e3", -1e3),
        ("+2.5e-1", 0.25),
        ("1.", 1.0),
        ("1_000.5", 1000.5),
        ("inf", float("inf")),
        ("-.inf", float("-inf")),
        ("1", 1),
        ("0x1f", 31),
        ("yes", True),
        ("'1e5'", "1e5"),
        ("1e5x", "1e5x"),
        ("e5", "e5"),
        ("Infinity", "Infinity"),
        ("{margin: 1e-1, lr: 3E-4}", {"margin": 0.1, "lr": 3e-4}),
    ],
)
def test_yaml_numbers_are_read_as_yaml_1_2(text, expected) -> None:
    from dmlkit.config.loading import parse_yaml

    value = parse_yaml(text)
    assert value == expected and type(value) is type(expected)


def test_yaml_nan_is_a_float() -> None:
    import math

    from dmlkit.config.loading import parse_yaml

    assert all(math.isnan(parse_yaml(text)) for text in ("nan", ".nan", ".NaN"))


def test_exponent_numbers_in_config_files_and_flags(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  weight_decay: 5E-5\n")
    config = parse(["--config", str(path), "--loss", "contrastive", "--loss-args", "{pos_margin: 1e-1}"])
    assert config.optim.lr == 1e-4 and config.optim.weight_decay == 5e-5
    assert config.objective.loss.args == {"pos_margin": 0.1}
    assert parse(["--loss-args", "alpha=2e0,beta=5E1"]).objective.loss.args == {"alpha": 2.0, "beta": 50.0}


@pytest.mark.parametrize(
    ("function", "text", "words"),
    [
        ("parse_list", "[recall@1, map@r", ["not a list", "'[recall@1, map@r'", "line 1, column 17"]),
        ("parse_list", "[1, [2]]", ["item 2 is [2]"]),
        ("parse_list", "[a] b", ["not a list", "'[a] b'"]),
        ("parse_mapping", "{a: 1", ["not a mapping", "'{a: 1'", "line 1, column 6"]),
        ("parse_mapping", "[1, 2]", ["not a mapping", "a list"]),
        ("parse_mapping", "{1: a}", ["key 1 is not a name"]),
        ("parse_mapping", "a=[1", ["value of 'a'", "'[1'"]),
        ("parse_mapping", "a=1,b", ["expected key=value", "'b'"]),
    ],
)
def test_malformed_flag_values_are_config_errors_quoting_the_text(function, text, words) -> None:
    import argparse

    from dmlkit.config import flags

    with pytest.raises(ConfigError) as err:
        getattr(flags, function)(text)
    assert isinstance(err.value, argparse.ArgumentTypeError)  # argparse names the flag
    message = str(err.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_malformed_yaml_file_names_the_line(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  lr: 0.1\n  milestones: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML: line 4") and "\n" not in message, message


def test_component_arguments_are_type_checked_at_config_time() -> None:
    with pytest.raises(ConfigError, match=r"loss 'contrastive': argument pos_margin must be a number.*'abc'"):
        make_config({"loss": "contrastive", "loss_args": {"pos_margin": "abc"}})
    with pytest.raises(ConfigError, match=r"miner 'batch_hard': argument allowed_pos_range"):
        make_config({"miner": "batch_hard", "miner_args": {"allowed_pos_range": [0.1, "x"]}})
    with pytest.raises(ConfigError, match=r"dataset 'synthetic': argument num_classes must be an integer"):
        make_config({"dataset_args": {"num_classes": 2.5}})
    # lax where nothing is lost: an int for a float, a list for a tuple
    make_config({"loss": "contrastive", "loss_args": {"pos_margin": 0, "neg_margin": 1}})
    make_config({"miner": "batch_hard", "miner_args": {"allowed_pos_range": [0, 1]}})


@pytest.mark.parametrize(
    ("values", "culprit"),
    [
        ({"lr": float("inf")}, "'optim.lr' (got inf)"),
        ({"grad_clip": "nan"}, "'optim.grad_clip' (got 'nan')"),
        ({"momentum": float("nan")}, "'optim.momentum'"),
        ({"warmup_start_factor": float("-inf")}, "'optim.warmup_start_factor'"),
        ({"xbm_weight": float("inf")}, "'memory.xbm_weight'"),
        ({"loss_args": {"alpha": float("inf")}}, "'objective.loss.args': alpha=inf is not a finite number"),
        ({"loss_args": {"nested": {"list": [1.0, float("nan")]}}}, "nested.list[1]=nan is not a finite"),
        ({"dataset_args": {"noise": float("nan")}}, "'data.dataset.args': noise=nan"),
    ],
)
def test_non_finite_floats_are_refused_naming_key_and_value(values, culprit) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(values, "test")
    assert culprit in str(err.value), str(err.value)


def test_metric_names_are_canonical_in_metrics_and_select_metric() -> None:
    config = make_config({"metrics": ["Recall@1", " MAP@R", "recall@1"], "select_metric": "Map@R"})
    assert config.eval.metrics == ["recall@1", "map@r"]
    assert config.eval.select_metric == "map@r"
    with pytest.raises(ConfigError, match="select_metric 'recall@2' must be one of metrics"):
        make_config({"metrics": ["recall@1"], "select_metric": "Recall@2"})


def test_paths_are_stored_absolute(tmp_path, monkeypatch) -> None:
    import os

    monkeypatch.chdir(tmp_path)
    config = make_config({"data_root": "data/set", "pretrained_weights": "w.pt"})
    assert config.data.data_root == str(tmp_path / "data" / "set")
    assert config.model.pretrained_weights == str(tmp_path / "w.pt")
    home = make_config({"data": {"data_root": "~/datasets"}}).data.data_root
    assert home == os.path.join(os.path.expanduser("~"), "datasets")
    assert make_config({}).data.data_root is None


def test_every_resumable_option_is_a_field() -> None:
    from dmlkit.config.sections import RESUMABLE, SECTIONS

    for path in RESUMABLE:
        section, field = path.split(".")
        assert field in SECTIONS[section].model_fields, path
