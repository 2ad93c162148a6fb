"""Registry: keyword arguments are checked against the constructor's signature and type annotations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pytest
import torch

from dmlkit import distances, losses, miners, samplers
from dmlkit.errors import ConfigError, UnknownNameError
from dmlkit.registry import Registry

if TYPE_CHECKING:
    from collections.abc import Iterator  # resolvable by type checkers only


class Named(Protocol):
    name: str


def make_registry() -> Registry[dict[str, Any]]:
    """Factories that return their arguments as received (so a test sees what was passed on)."""
    registry: Registry[dict[str, Any]] = Registry("widget")

    @registry.register("plain")
    def plain(
        rate: float = 1.0,
        count: int = 1,
        flag: bool = False,
        pair: tuple[float, float] = (0.0, 1.0),
        names: Sequence[str] = (),
        mode: int | Literal["all"] = "all",
        label: str | None = None,
    ) -> dict[str, Any]:
        return dict(rate=rate, count=count, flag=flag, pair=pair, names=names, mode=mode, label=label)

    @registry.register("odd")
    def odd(
        untyped=None,  # no annotation: not checked
        hidden: Iterator[int] | None = None,  # only under TYPE_CHECKING: not checked
        named: Named | None = None,  # a Protocol: pydantic cannot isinstance-check it
        data: torch.Tensor | Sequence[int] = (),  # takes tensors: data, left to the constructor
    ) -> dict[str, Any]:
        return dict(untyped=untyped, hidden=hidden, named=named, data=data)

    return registry


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rate": "abc"}, ["widget 'plain'", "rate must be a number (float)", "got 'abc' (str)"]),
        ({"rate": "0.5"}, ["rate must be a number", "'0.5' is a string"]),
        ({"rate": True}, ["True is a bool, not a number"]),
        ({"count": 2.0}, ["count must be an integer (int)", "2.0 is a float, not an int"]),
        ({"count": 2.5}, ["count must be an integer", "fractional part"]),
        ({"flag": "yes"}, ["flag must be a bool", "'yes' is a string"]),
        ({"pair": [0.1, "x"]}, ["pair must be a list (tuple[float, float])"]),
        ({"pair": [0.1]}, ["pair must be a list"]),
        ({"names": "abc"}, ["names must be a list (Sequence[str])"]),
        ({"names": ["a", 1]}, ["names must be a list"]),
        ({"mode": "alll"}, ["mode must be an integer or one of 'all' (int | Literal['all'])"]),
        ({"label": 3}, ["label must be a string or none (str | None)"]),
    ],
)
def test_a_value_of_the_wrong_type_is_a_config_error_naming_it(kwargs, words) -> None:
    registry = make_registry()
    for check in (lambda: registry.build("plain", **kwargs), lambda: registry.check_kwargs("plain", kwargs)):
        with pytest.raises(ConfigError) as err:
            check()
        message = str(err.value)
        assert all(word in message for word in words), message


def test_values_that_fit_are_passed_on_as_given() -> None:
    registry = make_registry()
    built = registry.build("plain", rate=1, pair=[0, 2], names=("a",), mode=3, label=None)
    assert built["rate"] == 1 and type(built["rate"]) is int  # checked as a float, not converted
    assert built["pair"] == [0, 2] and type(built["pair"]) is list
    assert registry.build("plain", rate=np.float32(0.5), count=np.int64(3))["count"] == 3


def test_unannotated_unresolvable_and_data_parameters_are_not_checked() -> None:
    registry = make_registry()
    thing = object()
    built = registry.build("odd", untyped="x", hidden="anything", named=thing, data=torch.arange(3))
    assert built["named"] is thing and torch.equal(built["data"], torch.arange(3))
    assert registry.build("odd", data=np.arange(3))["data"].shape == (3,)


def test_check_kwargs_with_keys_only_checks_names() -> None:
    registry = make_registry()
    registry.check_kwargs("plain", ["rate"])
    with pytest.raises(UnknownNameError, match="did you mean 'rate'"):
        registry.check_kwargs("plain", {"rat": 1.0})


def test_library_registries_check_their_arguments() -> None:
    with pytest.raises(ConfigError, match=r"loss 'contrastive': argument pos_margin must be a number"):
        losses.build("contrastive", pos_margin="abc")
    # shared options are declared on the family's base class, in another module
    with pytest.raises(ConfigError, match=r"loss 'contrastive': argument distance must be a string or none"):
        losses.build("contrastive", distance=0.5)
    with pytest.raises(ConfigError, match=r"miner 'batch_hard': argument allowed_pos_range"):
        miners.build("batch_hard", allowed_pos_range=(0.1, "x"))
    with pytest.raises(ConfigError, match=r"distance 'cosine': argument normalize_embeddings must be a bool"):
        distances.build("cosine", normalize_embeddings="no")


def test_legitimate_arguments_are_accepted() -> None:
    """Data code passes (tensor or array labels, numpy scalars) and lax-compatible values are not refused."""
    losses.build("contrastive", pos_margin=0, neg_margin=np.float64(1))
    losses.build("triplet", triplets_per_anchor="all", swap=True)
    miners.build("batch_hard", allowed_pos_range=[0, 1])
    labels = torch.arange(8).repeat_interleave(4)
    samplers.build("m_per_class", labels, 16, samples_per_class=4)
    samplers.build("m_per_class", labels.numpy(), 16, samples_per_class=4)
    samplers.build("m_per_class", labels.tolist(), 16, samples_per_class=4)
