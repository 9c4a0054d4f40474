"""The "lottery" pruning method: per-layer rates, a magnitude round, the random control's
masks, and the registered method's round."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models import small
from moejax.pruning import get_method, lottery


def _lenet_params(seed=0):
    return nnx.to_pure_dict(nnx.state(small.make_model("lenet", jax.random.key(seed))))


def test_a_round_prunes_20_percent_per_layer_and_10_percent_of_the_output_layer():
    params = _lenet_params()
    rates = lottery.layer_rates(params, 0.2, 0.1, output_layer=small.OUTPUT_LAYER)
    assert rates == {"fc1/kernel": 0.2, "fc2/kernel": 0.2, "out/kernel": 0.1}
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    masks = lottery.magnitude_round(params, masks, rates)
    masks = lottery.magnitude_round(params, masks, rates)
    kept = {name: int(np.sum(masks[name.split("/")[0]]["kernel"])) for name in rates}
    assert kept["fc1/kernel"] == 235200 - round(0.2 * 235200) - round(0.2 * 188160)
    assert kept["out/kernel"] == 1000 - 100 - 90
    assert bool(masks["fc1"]["bias"].all())
    kernel = np.abs(np.asarray(params["fc2"]["kernel"]))
    survivors = np.asarray(masks["fc2"]["kernel"])
    assert kernel[survivors].min() >= kernel[~survivors].max()


def test_random_masks_keep_the_per_layer_counts():
    params = _lenet_params()
    masks = lottery.magnitude_round(
        params, jax.tree.map(lambda p: jnp.ones(p.shape, bool), params), {"fc1/kernel": 0.5}
    )
    shuffled = lottery.random_like(masks, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(shuffled), strict=True):
        assert int(np.sum(a)) == int(np.sum(b))
    assert not np.array_equal(np.asarray(masks["fc1"]["kernel"]), shuffled["fc1"]["kernel"])


def test_the_registered_method_refines_masks_by_one_magnitude_round_at_its_rates():
    params = _lenet_params()
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    options = lottery.LotteryOptions(prune_rate=0.2, output_prune_rate=0.1, output_layer="out")
    refined = get_method("lottery").refine(params, masks, prunable=None, options=options)
    rates = {"fc1/kernel": 0.2, "fc2/kernel": 0.2, "out/kernel": 0.1}
    expected = lottery.magnitude_round(params, masks, rates)
    for a, b in zip(jax.tree.leaves(refined), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(np.sum(refined["out"]["kernel"])) == 1000 - 100
