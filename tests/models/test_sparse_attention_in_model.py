"""Every attention kind inside the language model: it trains, reports its density, and the
config rejects combinations that cannot work."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.models.transformer import TransformerLM
from moejax.sparse_attention import KINDS, AttentionConfig, SparseAttention

ROOT = Path(__file__).resolve().parents[2]
SMALL = dataclasses.replace(
    config_lib.load_config_file(ROOT / "configs" / "tiny.py").model, num_layers=2
)
# Every kind takes those of these options it has.
OPTIONS = {"top_k": 1, "window": 8, "num_global": 8, "num_clusters": 2}


def small_attention(kind: str) -> AttentionConfig:
    fields = {f.name for f in dataclasses.fields(KINDS[kind].options)}
    options = {name: value for name, value in OPTIONS.items() if name in fields}
    return AttentionConfig.of(kind, options=options, block_size=8)


@pytest.mark.parametrize("kind", [k for k, spec in KINDS.items() if not spec.full_attention])
def test_language_model_trains_with_each_attention_kind(kind):
    attention = small_attention(kind)
    model = TransformerLM(SMALL, attention=attention, rngs=nnx.Rngs(0))
    assert all(isinstance(block.attention, SparseAttention) for block in model.blocks)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256, jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Pure dicts, as the train step holds them: the merged model's variables then belong to the
    # traced function, so routers with state (k-means centroids) may update them.
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p, rest)(tokens)
        nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
        return nll + sum(a["aux_loss"] for a in aux), aux

    # Jitted: one compile per kind instead of every operation of the model compiled eagerly.
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    densities = [float(a["attention_density"]) for a in aux]
    assert all(0.0 < d <= 1.0 for d in densities)
    # 4 blocks of 8 tokens: a routed kind visits fewer than all 10 causal block pairs.
    assert min(densities) < 1.0


def test_dense_kind_keeps_the_dense_module_and_its_checkpoint_layout():
    dense = TransformerLM(SMALL, rngs=nnx.Rngs(0))
    explicit = TransformerLM(SMALL, attention=AttentionConfig.of("dense"), rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(dense)) == jax.tree.structure(nnx.state(explicit))
    assert not any(isinstance(b.attention, SparseAttention) for b in dense.blocks)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["attention.kind=moba", "attention.block_size=24"], "data.seq_len"),
        (
            ["attention.kind=moba", "attention.block_size=8", "model.depth.mod_every=1"],
            "model.depth.mod_every",
        ),
        (
            ["attention.kind=local", "attention.block_size=8", "model.router.name=attention_aware"],
            "model.router.name",
        ),
        (["attention.kind=sparse"], "attention.kind"),
        (["attention.kind=moba", "attention.window=8"], "attention.options.window now"),
        (["attention.kind=moba", "attention.options.window=8"], "MobaOptions.: top_k"),
    ],
)
def test_attention_config_errors_name_the_field(overrides, field):
    base = config_lib.load_config_file(ROOT / "configs" / "tiny.py")
    with pytest.raises(config_lib.ConfigError, match=field):
        config_lib.validate(config_lib.apply_overrides(base, overrides), 1)


def test_dense_kind_with_a_key_convolution_runs_the_block_kernel():
    # The dense module has no key convolution: it would silently drop it.
    attention = AttentionConfig.of("dense", block_size=8, key_conv_width=3)
    model = TransformerLM(SMALL, attention=attention, rngs=nnx.Rngs(0))
    assert all(isinstance(block.attention, SparseAttention) for block in model.blocks)
    assert all(block.attention.key_conv[...].shape[0] == 3 for block in model.blocks)
