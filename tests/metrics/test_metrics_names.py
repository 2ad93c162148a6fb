"""Every metric name parses, is listed, and reaches ``dmlkit train`` validation and ``dmlkit eval``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dmlkit.cli import main
from dmlkit.config import make_config, validate_names
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.metrics import available, check_metric, evaluate, higher_is_better, parse_metric
from tests_support import tiny_argv

#: One concrete name per pattern of ``available()``.
EVERY_METRIC = (
    "ami",
    "dists@inter",
    "dists@intra",
    "dists@intra_over_inter",
    "f1",
    "fnmr@fmr=0.1",
    "map@5",
    "map@r",
    "map_1000",
    "map_c",
    "map_lim",
    "map_pml@5",
    "mrr",
    "mrr@5",
    "nmi",
    "pcf@0.5",
    "precision@2",
    "r_precision",
    "recall@1",
    "rho_spectrum@1",
    "rho_spectrum@-2",
)


def test_every_pattern_has_a_concrete_name():
    patterns = {parse_metric(name)[0] for name in EVERY_METRIC}
    assert patterns == set(available())
    for name in EVERY_METRIC:
        check_metric(name)
    assert parse_metric("rho_spectrum@-2") == ("rho_spectrum@K", -2)
    assert parse_metric("map_pml@10") == ("map_pml@K", 10)


def test_bad_names():
    with pytest.raises(UnknownNameError, match="did you mean 'map_pml@5'"):
        check_metric("map_plm@5")
    with pytest.raises(UnknownNameError, match="did you mean 'dists@intra'"):
        check_metric("dists@intr")
    with pytest.raises(ConfigError, match="positive integer"):
        check_metric("map@-3")
    with pytest.raises(ConfigError, match="non-zero"):
        check_metric("rho_spectrum@0")


def test_higher_is_better():
    assert higher_is_better("map@5") and higher_is_better("dists@inter") and higher_is_better("f1")
    assert not higher_is_better("dists@intra")
    assert not higher_is_better("dists@intra_over_inter")
    assert not higher_is_better("rho_spectrum@1")
    assert not higher_is_better("fnmr@fmr=0.1") and higher_is_better("pcf@0.5")


def test_evaluate_computes_every_metric_at_once():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(10)
    x = torch.randn(6, 8, generator=gen)[labels] + 0.8 * torch.randn(60, 8, generator=gen)
    for distance in ("cosine", "euclidean"):
        results = evaluate(x, labels, metrics=EVERY_METRIC, distance=distance)
        assert list(results.metrics) == list(EVERY_METRIC)
        assert all(math.isfinite(v) for v in results.metrics.values())
        assert set(results.per_class) == {n for n in EVERY_METRIC if parse_metric(n)[0] not in NON_RANKING}


NON_RANKING = {"ami", "nmi", "f1", "rho_spectrum@K", "dists@intra", "dists@inter", "dists@intra_over_inter"}
NON_RANKING |= {"pcf@F", "fnmr@fmr=F"}  # an embedding diagnostic and a whole-results value: no per class


def test_train_config_accepts_every_metric(tiny_config):
    config = tiny_config(metrics=list(EVERY_METRIC), select_metric="map@5")
    validate_names(config)
    with pytest.raises(UnknownNameError, match="did you mean 'map_lim'"):
        validate_names(make_config({"metrics": ["map_lmi"], "select_metric": "map_lmi"}))


def test_train_and_eval_commands_accept_every_metric(tmp_path, capsys):
    argv = tiny_argv(tmp_path / "runs", name="names", epochs=1)
    argv[argv.index("recall@1,map@r")] = ",".join(EVERY_METRIC)
    argv[argv.index("--select-metric") + 1] = "map@5"
    assert main(["train", *argv]) == 0
    results = json.loads((tmp_path / "runs" / "names" / "results.json").read_text())
    assert set(results["test_after"]) == set(EVERY_METRIC)
    capsys.readouterr()
    metrics = "map_c,map_pml@3,mrr@2,f1,rho_spectrum@1,dists@intra_over_inter"
    run = str(tmp_path / "runs" / "names")
    assert main(["eval", "--checkpoint", run, "--metrics", metrics, "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["metrics"]) == metrics.split(",")
