"""Online k-means routing: a token goes to its most similar centroids, and the centroids follow
a running mean of their tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.kmeans import kmeans_router, update_centroids


def test_kmeans_routes_to_most_similar_centroid():
    hidden = jax.random.normal(jax.random.key(3), (20, 8))
    centroids = jax.random.normal(jax.random.key(4), (5, 8))
    routing = kmeans_router(jnp.zeros((20, 5)), top_k=2, hidden=hidden, centroids=centroids)
    h = np.asarray(hidden, np.float64)
    c = np.asarray(centroids, np.float64)
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (
        c / np.linalg.norm(c, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(routing.expert_index[:, 0], cos.argmax(1))
    np.testing.assert_allclose(np.sum(routing.combine_weights, 1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="centroids"):
        kmeans_router(jnp.zeros((20, 5)), top_k=2, hidden=hidden)


def test_centroid_update_is_a_running_mean_and_keeps_empty_clusters():
    centroids = jnp.eye(3, 4)
    hidden = jnp.array([[2.0, 0, 0, 0], [0, 0, 0, 3.0]])
    index = jnp.array([[0, 1], [0, 2]])
    new = np.asarray(update_centroids(centroids, hidden, index, momentum=0.5))
    np.testing.assert_allclose(new[0], 0.5 * np.eye(3, 4)[0] + 0.5 * np.array([0.5, 0, 0, 0.5]))
    np.testing.assert_array_equal(new[1:], np.eye(3, 4)[1:])
