"""The router registry: every router is a spec in one table, lives in the router package, takes
exactly the inputs it declares, and an unknown name is refused with the allowed names."""

import dataclasses
import inspect
from pathlib import Path

import jax
import pytest

from moejax import routers
from moejax.models.moe_layer import RouterContext
from moejax.routers.base import (
    CONTEXT_NEEDS,
    ROUTERS,
    RouterOptions,
    RouterSpec,
    TopKOptions,
    get,
    register,
)
from moejax.routers.base import get as get_router_spec
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.layer_helpers import hidden, make_layer

ROUTERS_DIR = Path(routers.__file__).parent
# Every router's file is named after it.
OWN_FILE = [
    "noisy_top_k",
    "softmax_top_k",
    "top_p",
    "bias_balanced",
    "kmeans",
    "cosine",
    "recurrent",
    "similarity_aware",
    "attention_aware",
    "expert_choice",
    "sinkhorn",
    "selective_sinkhorn",
    "hash_layer",
    "random_fixed",
    "relu_rmsnorm",
]
# The routers that came after softmax_top_k (the default, registered first).
NEW_ROUTERS = (
    "noisy_top_k",
    "sinkhorn",
    "selective_sinkhorn",
    "hash_layer",
    "random_fixed",
    "top_p",
)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_is_a_spec_from_a_file_in_the_router_package(name):
    spec = get(name)
    assert isinstance(spec, RouterSpec) and spec.name == name
    path = Path(inspect.getfile(spec.route))
    assert path.parent == ROUTERS_DIR, path
    if name in OWN_FILE:
        assert path.name == f"{name}.py"


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_declared_needs_are_context_the_layer_provides_and_route_keywords(name):
    spec = get(name)
    assert set(spec.needs) <= set(CONTEXT_NEEDS)
    keywords = set(inspect.signature(spec.route).parameters)
    assert set(spec.needs) | {"top_k"} <= keywords
    if spec.state is not None:
        assert spec.state.argument in keywords


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_options_are_frozen_defaults_whose_route_fields_are_route_keywords(name):
    spec = get(name)
    options = spec.options()  # every field has a default
    assert dataclasses.is_dataclass(options) and isinstance(options, RouterOptions)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.renormalize = False
    keywords = set(inspect.signature(spec.route).parameters)
    assert set(options.route_arguments()) <= keywords
    fields = {f.name for f in dataclasses.fields(options)}
    assert set(spec.options.layer_fields) <= fields
    assert set(options.route_arguments()) == fields - set(spec.options.layer_fields)


def test_spec_with_a_loss_weight_it_does_not_have_is_refused():
    with pytest.raises(ValueError, match=r"loss_weights: got \['entropy_weight'\]"):
        RouterSpec("bad", softmax_top_k, loss_weights={"router_entropy": "entropy_weight"})


def test_spec_whose_route_lacks_an_option_keyword_is_refused():
    def route(router_logits, *, top_k):
        return softmax_top_k(router_logits, top_k=top_k)

    with pytest.raises(ValueError, match=r"options: got \['renormalize'\]; allowed: option"):
        RouterSpec("bad", route, options=TopKOptions)
    assert RouterSpec("fine", route).options is RouterOptions  # no options by default


def test_unknown_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"router: got 'nope'; allowed: softmax_top_k, .*top_p"):
        get("nope")


def test_spec_with_an_undeclared_context_is_refused():
    with pytest.raises(ValueError, match=r"needs: got \['hidden_states'\]; allowed: names from"):
        RouterSpec("bad", softmax_top_k, needs=("router_logits", "hidden_states"))


def test_layer_hands_a_router_exactly_its_declared_needs():
    received = {}

    def recording_route(router_logits, *, top_k, token_ids, train):
        received.update(router_logits=router_logits, top_k=top_k, token_ids=token_ids, train=train)
        return softmax_top_k(router_logits, top_k=top_k)

    spec = RouterSpec("recording", recording_route, needs=("router_logits", "token_ids", "train"))
    register(spec)
    try:
        layer = make_layer("recording")
        x = hidden(batch=2, length=3)
        tokens = jax.numpy.arange(6).reshape(2, 3)
        layer(x, RouterContext(token_ids=tokens), train=False)
    finally:
        del ROUTERS["recording"]
    assert set(received) == {"router_logits", "top_k", "token_ids", "train"}
    assert received["token_ids"].tolist() == list(range(6))
    assert received["train"] is False
    assert received["router_logits"].shape == (6, 4)


def test_new_routers_are_registered_after_softmax_top_k() -> None:
    assert list(ROUTERS)[0] == "softmax_top_k"
    assert set(NEW_ROUTERS) <= set(ROUTERS)
    with pytest.raises(ValueError, match=r"allowed: softmax_top_k, .*top_p"):
        get_router_spec("nope")


def test_get_router_names_unknown_router_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"router: got 'foo'; allowed: softmax_top_k, "):
        get_router_spec("foo")


def test_register_rejects_duplicate_names() -> None:
    with pytest.raises(
        ValueError, match="router: got 'softmax_top_k'; allowed: a name not already"
    ):
        register(RouterSpec("softmax_top_k", softmax_top_k))
