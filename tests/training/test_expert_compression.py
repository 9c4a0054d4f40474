"""Expert-level compression of the LM (expert pruning, MC-SMoE merging) and Read-ME's
refactoring of a dense LM into experts routed by token id."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from small_lm import small_lm

from moejax.config import MoEConfig, RouterConfig
from moejax.models.moe_layer import RouterContext
from moejax.models.transformer import TransformerLM
from moejax.pruning.read_me import (
    pregate,
)
from moejax.training.expert_compression import compress_experts, moefy_model

CONFIG = small_lm(MoEConfig(every=1, num_experts=4, top_k=2, expert_d_ff=16, num_shared_experts=1))
DENSE = dataclasses.replace(CONFIG, moe=MoEConfig(every=0))


def _calibration(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, (4, 16)).astype(np.int32) for _ in range(3)]


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _loaded(result) -> TransformerLM:
    model = TransformerLM(result.config, rngs=nnx.Rngs(99))
    nnx.update(model, result.params)
    return model


@nnx.jit
def _logits(model, tokens: jax.Array) -> jax.Array:
    """Evaluation-mode logits, compiled: op by op the forward takes seconds."""
    return model(tokens, train=False)[0]


@nnx.jit
def _block_inputs(model, tokens: jax.Array) -> list[jax.Array]:
    """Every block's feed-forward input `[batch, length, d_model]`."""
    forward = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, outputs = forward(tokens, train=False)
    return [block["ffn_norm"]["__call__"].get_value()[0] for block in outputs["blocks"].values()]


def _ffn_inputs(model, calibration) -> list[list[jax.Array]]:
    """Per block, its feed-forward inputs `[batch, length, d_model]`, one per batch."""
    per_batch = [_block_inputs(model, jnp.asarray(tokens)) for tokens in calibration]
    return [list(xs) for xs in zip(*per_batch, strict=True)]


def _flat(xs: list[jax.Array]) -> np.ndarray:
    return np.concatenate([np.asarray(x).reshape(-1, x.shape[-1]) for x in xs])


def _copies_of_two_experts(model) -> None:
    """Every MoE layer's experts become [A, A', B, B']: A' and B' are A and B with their hidden
    neurons permuted (the same functions), and the copies' router columns are the originals'."""
    permutation = np.random.default_rng(7).permutation(CONFIG.moe.expert_d_ff)
    for block in model.blocks:
        ffn = block.ffn
        for name in ("w_gate", "w_up", "w_down"):
            w = np.array(getattr(ffn, name)[...])
            neurons = 0 if name == "w_down" else 1  # w_down [d_ff, d_model], others [d_model, d_ff]
            w[1] = np.take(w[0], permutation, axis=neurons)
            w[3] = np.take(w[2], permutation, axis=neurons)
            getattr(ffn, name)[...] = jnp.asarray(w)
        router = np.array(ffn.router[...]) * 50  # decisive routing
        router[:, 1], router[:, 3] = router[:, 0], router[:, 2]
        ffn.router[...] = jnp.asarray(router)


def test_merging_permuted_copies_with_mc_smoe_leaves_the_logits_unchanged():
    """Top-1 routing over [A, A', B, B']: each copy ties with its original and loses (lower
    index first), so MC-SMoE groups {A, A'} and {B, B'} around A and B, and the two merged
    experts with A's and B's router columns compute exactly the model's function."""
    config = dataclasses.replace(CONFIG, moe=dataclasses.replace(CONFIG.moe, top_k=1))
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    _copies_of_two_experts(model)
    calibration = _calibration()
    result = compress_experts(model, config, calibration, method="mc_smoe", keep=2)
    assert result.config.moe.num_experts == 2 and result.config.moe.top_k == 1
    for layer in range(config.num_layers):
        report = result.report[f"block{layer}"]
        assert report["groups"] == [0, 0, 1, 1] and report["dominant"] == [0, 2]
        frequency = report["frequency"]
        assert frequency[1] == frequency[3] == 0 and frequency[0] > 0 and frequency[2] > 0
    tokens = jnp.asarray(_calibration(1)[0])
    expected = np.asarray(_logits(model, tokens))
    got = np.asarray(_logits(_loaded(result), tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _top(scores: np.ndarray, count: int) -> list[int]:
    return sorted(np.argsort(-scores, kind="stable")[:count].tolist())


@pytest.mark.parametrize("method", ["frequency", "importance"])
def test_pruning_keeps_the_highest_scoring_experts_of_each_layers_own_routing(method):
    """The scores counted here from each layer's `route` of the calibration tokens: the kept
    experts, their weights and router columns; everything else copied. Seed and `keep` are
    such that the two scores keep different experts in some layer."""
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(1))
    calibration = _calibration()
    before = _params(model)
    result = compress_experts(model, CONFIG, calibration, method=method, keep=2)
    assert result.config.moe.num_experts == 2 and result.config.moe.top_k == 2
    after = result.params
    inputs = _ffn_inputs(model, calibration)
    disagree = []
    for layer in range(CONFIG.num_layers):
        routings = [
            model.blocks[layer].ffn.route(x, RouterContext(token_ids=jnp.asarray(t)), train=False)
            for x, t in zip(inputs[layer], calibration, strict=True)
        ]
        index = np.concatenate([np.asarray(r.expert_index) for r in routings])
        counts = np.bincount(index.reshape(-1), minlength=4)
        importance = np.concatenate([np.asarray(r.router_probs) for r in routings]).sum(0)
        disagree.append(_top(counts, 2) != _top(importance, 2))
        kept = _top(counts if method == "frequency" else importance, 2)
        report = result.report[f"block{layer}"]
        assert report["kept"] == kept
        np.testing.assert_allclose(report["frequency"], counts / index.shape[0])
        old, new = before["blocks"][layer]["ffn"], after["blocks"][layer]["ffn"]
        for name in ("w_gate", "w_up", "w_down"):
            np.testing.assert_array_equal(new[name], old[name][kept])
            np.testing.assert_array_equal(new[f"shared_{name}"], old[f"shared_{name}"])
        np.testing.assert_array_equal(new["router"], old["router"][:, kept])
    assert any(disagree)
    unchanged = ["embedding", "final_norm", ("blocks", 0, "attention"), ("blocks", 1, "ffn_norm")]
    for path in unchanged:
        path = path if isinstance(path, tuple) else (path,)
        old, new = before, after
        for key in path:
            old, new = old[key], new[key]
        jax.tree.map(np.testing.assert_array_equal, new, old)
    logits = _logits(_loaded(result), jnp.asarray(calibration[0]))
    assert np.all(np.isfinite(np.asarray(logits)))


def test_pruning_keeps_the_per_expert_router_state_of_the_kept_experts():
    config = dataclasses.replace(CONFIG, router=RouterConfig(name="bias_balanced"))
    model = TransformerLM(config, rngs=nnx.Rngs(2))
    for block in model.blocks:
        block.ffn.router_state[...] = jnp.array([0.3, -0.2, 0.1, -0.4])
    result = compress_experts(model, config, _calibration(), method="frequency", keep=1)
    assert result.config.moe.top_k == 1  # top_k = min(top_k, keep)
    for layer in range(config.num_layers):
        kept = result.report[f"block{layer}"]["kept"]
        state = result.router_state["blocks"][layer]["ffn"]["router_state"]
        np.testing.assert_array_equal(state, np.array([0.3, -0.2, 0.1, -0.4], np.float32)[kept])
    model = _loaded(result)
    nnx.update(model, result.router_state)
    assert np.all(np.isfinite(np.asarray(_logits(model, jnp.asarray(_calibration(1)[0])))))


def test_read_me_with_every_expert_chosen_is_the_dense_model():
    """top_k = num_experts: each token sums every slice of the dense MLP with weight 1."""
    dense = TransformerLM(DENSE, rngs=nnx.Rngs(3))
    result = moefy_model(dense, DENSE, _calibration(), num_experts=4, top_k=4)
    config = result.config
    assert config.router.name == "token_table" and config.router.options.gate == "ones"
    assert config.router.options.vocab_size == DENSE.vocab_size
    assert all(config.is_moe_layer(layer) for layer in range(config.num_layers))
    assert (config.moe.num_experts, config.moe.top_k, config.moe.expert_d_ff) == (4, 4, 12)
    for layer in range(DENSE.num_layers):
        partition = np.array(result.report[f"block{layer}"]["partition"])
        assert sorted(partition.reshape(-1).tolist()) == list(range(DENSE.d_ff))
    tokens = jnp.asarray(_calibration(1)[0])
    expected = np.asarray(_logits(dense, tokens))
    got = np.asarray(_logits(_loaded(result), tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_read_me_routes_by_the_fitted_table_and_reports_its_oracle_agreement():
    """top_k < num_experts: the new layers route each token by its table row alone; the report's
    agreement is that of the table's choices with the top-k experts of each token's activation
    mass (computed here from the dense model), well above chance."""
    dense = TransformerLM(DENSE, rngs=nnx.Rngs(4))
    calibration = _calibration()
    result = moefy_model(dense, DENSE, calibration, num_experts=4, top_k=1)
    model = _loaded(result)
    ids = np.concatenate([t.reshape(-1) for t in calibration])
    params = _params(dense)
    inputs = _ffn_inputs(dense, calibration)
    for layer in range(DENSE.num_layers):
        ffn = params["blocks"][layer]["ffn"]
        x = _flat(inputs[layer])
        hidden = jax.nn.silu(x @ ffn["w_gate"]) * (x @ ffn["w_up"])  # [tokens, d_ff]
        partition = np.array(result.report[f"block{layer}"]["partition"])
        oracle = np.abs(np.asarray(hidden))[:, partition].sum(2)  # [tokens, experts]
        table = result.params["blocks"][layer]["ffn"]["router_params"]["table"]
        # A row's softmax: each expert's share of the id's mean activation mass.
        token = ids[0]
        mass = oracle[ids == token].mean(0)
        np.testing.assert_allclose(jax.nn.softmax(table[token]), mass / mass.sum(), rtol=1e-5)
        chosen = pregate(table, ids, 1)[:, 0]
        agreement = result.report[f"block{layer}"]["oracle_agreement"]
        assert agreement == pytest.approx(np.mean(chosen == oracle.argmax(1)))
        assert agreement > 0.4  # chance is 1/4
        # The new layer's routing of any hidden states follows the table.
        noise = jax.random.normal(jax.random.key(layer), (4, 16, DENSE.d_model))
        routing = model.blocks[layer].ffn.route(
            noise, RouterContext(token_ids=jnp.asarray(calibration[0])), train=False
        )
        np.testing.assert_array_equal(
            np.asarray(routing.expert_index)[:, 0], chosen[: calibration[0].size]
        )
    assert np.all(np.isfinite(np.asarray(_logits(model, jnp.asarray(calibration[1])))))


@pytest.fixture(scope="module")
def models():
    cosine = dataclasses.replace(CONFIG, router=RouterConfig(name="cosine"))
    return {
        "moe": TransformerLM(CONFIG, rngs=nnx.Rngs(5)),
        "dense": TransformerLM(DENSE, rngs=nnx.Rngs(5)),
        "cosine": TransformerLM(cosine, rngs=nnx.Rngs(5)),
        "configs": {"moe": CONFIG, "dense": DENSE, "cosine": cosine},
    }


BAD_CALLS = [
    ("compress", "moe", {"method": "svd", "keep": 2}, r"method: got 'svd'; allowed: frequency"),
    ("compress", "moe", {"method": "frequency", "keep": 0}, r"keep: got 0; allowed: an int in"),
    ("compress", "moe", {"method": "mc_smoe", "keep": 5}, r"keep: got 5"),
    ("compress", "cosine", {"method": "frequency", "keep": 2}, r"model.router.name: got 'cosine'"),
    ("compress", "dense", {"method": "frequency", "keep": 2}, r"model.moe.every: got 0"),
    (
        "compress",
        "moe",
        {"method": "frequency", "keep": 2, "calibration": []},
        r"calibration: got 0",
    ),
    ("readme", "moe", {"num_experts": 4, "top_k": 1}, r"model.moe.every: got 1; allowed: 0"),
    ("readme", "dense", {"num_experts": 5, "top_k": 1}, r"num_experts: got 5; allowed: .*d_ff=48"),
    ("readme", "dense", {"num_experts": 4, "top_k": 5}, r"top_k: got 5; allowed: an int in"),
    (
        "readme",
        "dense",
        {"num_experts": 4, "top_k": 1, "calibration": [np.full((2, 3), 64, np.int32)]},
        r"calibration\[0\]: got 'ids in \[64, 64\]'",
    ),
]


@pytest.mark.parametrize(("driver", "model", "arguments", "match"), BAD_CALLS)
def test_bad_arguments_name_the_field(models, driver, model, arguments, match):
    arguments = {"calibration": _calibration(), **arguments}
    calibration = arguments.pop("calibration")
    run = compress_experts if driver == "compress" else moefy_model
    with pytest.raises(ValueError, match=match):
        run(models[model], models["configs"][model], calibration, **arguments)
