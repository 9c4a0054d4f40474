"""RoMA (`moejax.tasks.roma`): the neighbour search and the manifold loss against numpy
references, and router-only fine-tuning of a tiny MoE LM trained on the multi-task proxy
(`moejax.tasks.routing_tasks`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models.moe_layer import RouterContext
from moejax.tasks import roma
from moejax.tasks import routing_tasks as rt

TASKS = rt.RoutingTasksConfig()
OPTIONS = roma.RomaOptions(steps=48, learning_rate=3e-3, manifold_weight=4.0, k=4)


def brute_force_neighbours(embeddings: np.ndarray, success: np.ndarray, k: int) -> np.ndarray:
    """A loop over samples: the k most cosine-similar other successful samples."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    result = []
    for i in range(len(embeddings)):
        candidates = [j for j in range(len(embeddings)) if success[j] and j != i]
        similarity = [float(unit[i] @ unit[j]) for j in candidates]
        order = np.argsort(similarity)[::-1][:k]
        result.append([candidates[j] for j in order])
    return np.asarray(result)


def test_successful_neighbours_match_a_brute_force_cosine_search():
    rng = np.random.default_rng(0)
    # Rows of very different lengths: a Euclidean search would pick other neighbours.
    embeddings = rng.normal(size=(40, 6)) * rng.uniform(0.1, 10.0, size=(40, 1))
    success = rng.random(40) < 0.5
    neighbours = np.asarray(roma.successful_neighbours(jnp.asarray(embeddings), success, 5))
    np.testing.assert_array_equal(neighbours, brute_force_neighbours(embeddings, success, 5))
    assert neighbours.shape == (40, 5)
    assert np.all(success[neighbours])
    assert not np.any(neighbours == np.arange(40)[:, None])


def test_neighbour_weights_are_clipped_similarities_that_sum_to_one():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(12, 4))
    neighbours = np.asarray(roma.successful_neighbours(embeddings, np.ones(12, bool), 3))
    weights = np.asarray(roma.neighbour_weights(jnp.asarray(embeddings), neighbours))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = np.maximum(np.einsum("ne,nke->nk", unit, unit[neighbours]), 0.0)
    expected = similarity / similarity.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)


def test_manifold_loss_matches_a_float64_reference_and_vanishes_on_shared_signatures():
    rng = np.random.default_rng(2)
    signatures = rng.random((6, 8)).astype(np.float32)
    neighbour_signatures = rng.random((6, 3, 8)).astype(np.float32)
    weights = rng.dirichlet(np.ones(3), size=6).astype(np.float32)
    s, n, w = (x.astype(np.float64) for x in (signatures, neighbour_signatures, weights))
    expected = np.mean(np.sum(w * np.sum((s[:, None, :] - n) ** 2, axis=-1), axis=-1))
    loss = roma.manifold_loss(signatures, neighbour_signatures, weights)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    shared = np.repeat(signatures[:, None, :], 3, axis=1)
    assert float(roma.manifold_loss(signatures, shared, weights)) == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("learning_rate", 0.0),
        ("manifold_weight", -1.0),
        ("k", 0),
    ],
)
def test_bad_options_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RomaOptions\.{field}: got {value!r}; allowed"):
        roma.RomaOptions(**{field: value})


def test_too_few_successful_samples_for_k_raise_naming_k():
    success = np.array([True, True, False, False])
    with pytest.raises(ValueError, match=r"k: got 2; allowed: .*successful samples - 1 = 1"):
        roma.successful_neighbours(jnp.ones((4, 3)), success, 2)


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(123)
    finetune = [rt.routing_tasks_batch(TASKS, 64, rng) for _ in range(4)]
    test = [rt.routing_tasks_batch(TASKS, 64, rng) for _ in range(4)]
    return finetune, test


@pytest.fixture(scope="module")
def trained():
    """The tiny MoE LM, trained briefly on all tasks: most but not all answers right."""
    model = rt.routing_tasks_model(TASKS, seed=0)
    rt.train_lm(model, TASKS, steps=250, seed=0)
    return model


@pytest.fixture(scope="module")
def comparison(trained, splits):
    before = nnx.to_pure_dict(nnx.state(trained))
    result = roma.compare_fits(trained, *splits, OPTIONS, rt.task_accuracy)
    after = nnx.to_pure_dict(nnx.state(trained))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    return result


def test_routing_signature_holds_each_layers_mean_router_probabilities(trained, splits):
    inputs = splits[0][0]["inputs"][:8]
    signature = np.asarray(roma.routing_signature(trained, inputs))
    experts = trained.config.moe.num_experts
    assert signature.shape == (8, len(trained.blocks) * experts)
    np.testing.assert_allclose(signature.reshape(8, -1, experts).sum(-1), 1.0, rtol=1e-5)
    # A mask of one position gives that token's router probabilities.
    mask = np.zeros(inputs.shape, bool)
    mask[:, 3] = True
    first_layer = np.asarray(roma.routing_signature(trained, inputs, mask))[:, :experts]
    expected = np.asarray(first_layer_probs(trained, inputs))[:, 3]
    np.testing.assert_allclose(first_layer, expected, rtol=1e-5, atol=1e-6)


@nnx.jit
def first_layer_probs(model, inputs):
    """Block 0's router probabilities `[batch, length, experts]`, its feed-forward input
    rebuilt by hand from the embedding and the attention."""
    block = model.blocks[0]
    x = model.embed(inputs)
    h = x + block.attention(block.attention_norm(x))
    routing = block.ffn.route(block.ffn_norm(h), RouterContext(token_ids=inputs), train=False)
    return routing.router_probs.reshape(*inputs.shape, -1)


def test_fit_moves_only_the_routers(trained, comparison):
    before = nnx.to_flat_state(nnx.state(trained))
    for name, model in comparison.models.items():
        after = dict(nnx.to_flat_state(nnx.state(model)))
        assert set(after) == {path for path, _ in before}
        moved = []
        for path, variable in before:
            old, new = np.asarray(variable.get_value()), np.asarray(after[path].get_value())
            if path[-2:] == ("ffn", "router"):
                moved.append(not np.array_equal(old, new))
            else:
                np.testing.assert_array_equal(old, new, err_msg=f"{name}: {path}")
        assert moved and all(moved), name


def test_task_embedding_is_untouched_by_router_fine_tuning(trained, comparison, splits):
    batch = splits[0][0]
    before = roma.task_embedding(trained, batch["inputs"], batch["prompt_mask"])
    after = roma.task_embedding(comparison.models["roma"], batch["inputs"], batch["prompt_mask"])
    np.testing.assert_array_equal(before, after)


def test_fit_lowers_the_combined_loss(comparison, splits):
    cycle = len(splits[0])
    for name, history in comparison.histories.items():
        first = np.mean([h["loss"] for h in history[:cycle]])
        last = np.mean([h["loss"] for h in history[-cycle:]])
        assert last < first, (name, first, last)


def neighbour_distance(model, reference, batches, *, fixed_targets: bool) -> float:
    """`manifold_loss` of the samples of `batches` under `model`'s routing against the
    reference neighbours' signatures: as they were at the reference pass (`fixed_targets`), or
    under `model`'s routing too."""
    signatures = jnp.concatenate([roma.routing_signature(model, b["inputs"]) for b in batches])
    targets = reference.signatures if fixed_targets else signatures
    return float(roma.manifold_loss(signatures, targets[reference.neighbours], reference.weights))


@pytest.mark.parametrize("fixed_targets", [True, False])
def test_manifold_weight_pulls_neighbouring_routings_together(
    trained, comparison, splits, fixed_targets
):
    reference = roma.reference_pass(trained, splits[0], OPTIONS.k)
    before = neighbour_distance(trained, reference, splits[0], fixed_targets=fixed_targets)
    with_roma = neighbour_distance(
        comparison.models["roma"], reference, splits[0], fixed_targets=fixed_targets
    )
    without = neighbour_distance(
        comparison.models["router_only"], reference, splits[0], fixed_targets=fixed_targets
    )
    assert with_roma < before, (with_roma, before)
    assert with_roma < without, (with_roma, without)


def test_multi_task_accuracies_of_trained_router_only_and_roma(comparison, capsys):
    """The fast version of `benchmarks/roma.py`: reports the three accuracies and checks only
    that they are sane (what RoMA gains at this scale is the benchmark's question)."""
    accuracy = comparison.accuracy
    with capsys.disabled():
        for run in ("trained", "router_only", "roma"):
            print(
                f"\n{run}: test {accuracy[run]['test']['all']:.3f}, "
                f"finetune {accuracy[run]['finetune']['all']:.3f}"
            )
    assert 0.3 < accuracy["trained"]["test"]["all"] < 1.0
    for run in ("router_only", "roma"):
        assert accuracy[run]["test"]["all"] > 0.5 * accuracy["trained"]["test"]["all"]
