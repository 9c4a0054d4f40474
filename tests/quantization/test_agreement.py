"""Top-k agreement against a brute-force count of shared experts per token."""

import jax
import numpy as np
import pytest

from moejax.quantization import topk_agreement


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_topk_agreement_equals_a_brute_force_set_intersection(top_k):
    a = np.asarray(jax.random.normal(jax.random.key(0), (50, 8)))
    b = a + np.asarray(jax.random.normal(jax.random.key(1), (50, 8)))
    expected = np.mean(
        [
            len(set(np.argsort(-ra)[:top_k]) & set(np.argsort(-rb)[:top_k])) / top_k
            for ra, rb in zip(a, b, strict=True)
        ]
    )
    assert 0.2 < expected < 0.9  # the planted noise swaps some experts, not all
    np.testing.assert_allclose(float(topk_agreement(a, b, top_k)), expected, rtol=1e-6)


def test_agreement_ignores_order_and_monotone_transforms():
    a = np.asarray(jax.random.normal(jax.random.key(2), (20, 6)))
    assert float(topk_agreement(a, np.exp(3 * a), 2)) == 1.0
    assert float(topk_agreement(a, -a, 3)) == 0.0  # top half against bottom half


@pytest.mark.parametrize(
    ("shapes", "top_k", "field"),
    [
        (((4, 6), (4, 5)), 2, "logits_b.shape"),
        (((4,), (4,)), 1, "logits_a.shape"),
        (((4, 6), (4, 6)), 7, "top_k"),
        (((4, 6), (4, 6)), 0, "top_k"),
    ],
)
def test_bad_arguments_name_the_field(shapes, top_k, field):
    with pytest.raises(ValueError, match=field):
        topk_agreement(np.zeros(shapes[0]), np.zeros(shapes[1]), top_k)
