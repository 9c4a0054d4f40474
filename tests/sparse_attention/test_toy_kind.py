"""Adding an attention kind takes one spec and one `register` call: a toy kind defined in this
module, with its own typed options, selected by name through the config, trains the language
model, and its plan receives exactly the inputs it declares."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError, apply_overrides, load_config_file
from moejax.errors import require_config
from moejax.parallel import sharding
from moejax.sparse_attention import (
    KINDS,
    AttentionConfig,
    AttentionKindSpec,
    AttentionPlan,
    KindOptions,
    SparseAttention,
    register,
)
from moejax.training import state as state_lib
from moejax.training.step import global_batch, make_train_step

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECEIVED: list[set[str]] = []


@dataclasses.dataclass(frozen=True)
class StridedOptions(KindOptions):
    """stride: a query block visits its own block and every `stride`-th block before it."""

    stride: int = 2

    def __post_init__(self) -> None:
        require_config(self.stride >= 1, "attention.options.stride", self.stride, ">= 1")


def strided_plan(*, length: int, block_size: int, options: StridedOptions, **needs):
    """Static mask `[1, 1, blocks, blocks]`: block j for query block i when `stride | i - j`."""
    RECEIVED.append(set(needs))
    blocks = length // block_size
    distance = np.arange(blocks)[:, None] - np.arange(blocks)[None, :]
    mask = (distance >= 0) & (distance % options.stride == 0)
    bound = int(mask.sum(axis=1).max())
    return AttentionPlan(mask[None, None], block_size, block_size, bound)


TOY = AttentionKindSpec("strided", strided_plan, options=StridedOptions)


@pytest.fixture
def toy_kind():
    # Registered for this test only, so other test modules see the built-in table.
    spec = register(TOY)
    yield spec.name
    del KINDS[spec.name]


def test_toy_kind_selected_by_config_trains_the_language_model(toy_kind):
    config = load_config_file(CONFIGS / "tiny.py")
    overrides = [f"attention.kind={toy_kind}", "attention.block_size=8"]
    with pytest.raises(ConfigError, match=r"\(StridedOptions\): stride"):
        apply_overrides(config, [*overrides, "attention.options.top_k=2"])
    config = apply_overrides(config, [*overrides, "attention.options.stride=3"])
    assert config.attention.options == StridedOptions(stride=3)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    step = make_train_step(layout, mesh)
    tokens = np.arange(8 * 33).reshape(8, 33).astype(np.int32) % 256
    batch = global_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    RECEIVED.clear()
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    # 4 blocks with stride 3: 5 of the 10 causal block pairs (the diagonal and distance 3).
    density = float(metrics["attention/layer0/attention_density"])
    assert density == pytest.approx(0.5)
    assert RECEIVED and all(received == set() for received in RECEIVED)


def test_the_layer_hands_a_kind_exactly_the_inputs_it_declares(toy_kind):
    spec = dataclasses.replace(TOY, name="strided_keys", needs=("keys",))
    register(spec)
    try:
        attention = AttentionConfig.of("strided_keys", block_size=4)
        layer = SparseAttention(16, 2, 2, 8, attention=attention, rngs=nnx.Rngs(0))
        RECEIVED.clear()
        y, metrics = layer(jax.random.normal(jax.random.key(0), (1, 16, 16)))
        assert [{"keys"}] == RECEIVED
        assert y.shape == (1, 16, 16)
        # 4 blocks with the default stride 2: the diagonal and distance 2, 6 of 10 pairs.
        assert float(metrics["attention_density"]) == pytest.approx(0.6)
    finally:
        del KINDS["strided_keys"]
