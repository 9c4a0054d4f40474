"""GQSA: each output column keeps exactly its share of groups, removed groups are whole and
zero, kept groups are plain per-group quantisation, and the score (weight norm or Wanda-style
with input norms) decides which groups go."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.quantization import dequantize, gqsa, group_scores, quantize


def _weight(seed: int, shape=(32, 6)) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize(("sparsity", "kept"), [(0.0, 8), (0.25, 6), (0.5, 4), (0.75, 2)])
def test_every_column_keeps_exactly_its_share_of_whole_groups(sparsity, kept):
    w = _weight(0)
    w_hat, group_mask = gqsa(w, None, sparsity, 4, 4)
    assert group_mask.shape == (8, 6) and group_mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.sum(group_mask, axis=0), kept)
    element_mask = np.repeat(np.asarray(group_mask), 4, axis=0)
    np.testing.assert_array_equal(np.asarray(w_hat)[~element_mask], 0.0)
    # Kept groups are exactly per-group quantisation: removed groups never enter their scales.
    quantised = np.asarray(dequantize(quantize(w, 4, 4)))
    np.testing.assert_array_equal(np.asarray(w_hat)[element_mask], quantised[element_mask])


def test_the_lowest_norm_groups_are_removed():
    w = np.ones((16, 2), np.float32)
    w[4:8, 0] = 0.01  # group 1 of column 0
    w[12:16, 1] = -0.02  # group 3 of column 1
    _, group_mask = gqsa(jnp.asarray(w), None, 0.25, 8, 4)
    np.testing.assert_array_equal(
        np.asarray(group_mask), [[True, True], [False, True], [True, True], [True, False]]
    )


def test_input_norms_make_a_small_group_important():
    w = np.ones((16, 1), np.float32)
    w[0:4] = 0.1  # the smallest weights ...
    sq_norms = np.ones(16, np.float32)
    sq_norms[0:4] = 1e4  # ... on the loudest inputs: score 0.1 * 100 = 10 per input
    _, by_weight = gqsa(jnp.asarray(w), None, 0.25, 4, 4)
    _, by_activation = gqsa(jnp.asarray(w), jnp.asarray(sq_norms), 0.25, 4, 4)
    assert not by_weight[0, 0] and by_activation[0, 0]
    scores = np.asarray(group_scores(jnp.asarray(w), jnp.asarray(sq_norms), 4))[:, 0]
    np.testing.assert_allclose(scores, [20.0, 2.0, 2.0, 2.0], rtol=1e-6)


def test_stacked_experts_are_pruned_and_quantised_each_on_its_own():
    w = _weight(1, (3, 16, 4))  # [experts, d_model, d_ff]
    sq_norms = jax.random.uniform(jax.random.key(2), (3, 16))
    stacked, masks = gqsa(w, sq_norms, 0.5, 3, 4)
    for e in range(3):
        alone, mask = gqsa(w[e], sq_norms[e], 0.5, 3, 4)
        np.testing.assert_array_equal(np.asarray(stacked[e]), np.asarray(alone))
        np.testing.assert_array_equal(np.asarray(masks[e]), np.asarray(mask))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"group_size": 5}, "group_size"),
        ({"bits": 1}, "bits"),
        ({"sq_norms": jnp.ones(7)}, "sq_norms.shape"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"w": _weight(3), "sq_norms": None, "sparsity": 0.5, "bits": 4, "group_size": 4}
    with pytest.raises(ValueError, match=field):
        gqsa(**{**args, **kwargs})
