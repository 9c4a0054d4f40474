"""Small image classifiers for pruning studies (lottery tickets on Fashion-MNIST).

`LeNet300100`: the fully connected 784-300-100-10 network of *The Lottery Ticket Hypothesis*.
`SmallConvNet`: two 3x3 conv layers with max-pooling, then 256-10 dense layers (a reduced
version of the paper's Conv-2 that trains in seconds on a CPU).
Both take images `[batch, 28, 28, 1]` and return logits `[batch, 10]`; the output layer is named
`out` so that pruning rules can single it out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import require_one_of

OUTPUT_LAYER = "out"


def _glorot() -> nnx.Initializer:
    # The lottery-ticket paper initialises with Gaussian Glorot.
    return nnx.initializers.glorot_normal()


class LeNet300100(nnx.Module):
    """784-300-100-10 ReLU MLP. x: [batch, 28, 28, 1] -> logits [batch, num_classes]."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs) -> None:
        init = _glorot()
        self.fc1 = nnx.Linear(28 * 28, 300, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(300, 100, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(100, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)  # [batch, 784]
        h = jax.nn.relu(self.fc1(h))
        h = jax.nn.relu(self.fc2(h))
        return self.out(h)


class SmallConvNet(nnx.Module):
    """conv3x3(32) -> pool -> conv3x3(64) -> pool -> dense 256 -> dense num_classes.
    x: [batch, 28, 28, 1] -> logits [batch, num_classes]."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs) -> None:
        init = _glorot()
        self.conv1 = nnx.Conv(1, 32, (3, 3), kernel_init=init, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), kernel_init=init, rngs=rngs)
        self.fc1 = nnx.Linear(7 * 7 * 64, 256, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(256, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))  # [batch, 14, 14, 32]
        h = nnx.max_pool(jax.nn.relu(self.conv2(h)), (2, 2), (2, 2))  # [batch, 7, 7, 64]
        h = jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1)))  # [batch, 256]
        return self.out(h)


# The classifiers by the name a config gives them.
MODELS: dict[str, type[nnx.Module]] = {"lenet": LeNet300100, "conv": SmallConvNet}


def make_model(name: str, key: jax.Array, num_classes: int = 10) -> nnx.Module:
    """The model registered as `name` in `MODELS`, initialised from `key`."""
    require_one_of("model", name, list(MODELS))
    return MODELS[name](num_classes, rngs=nnx.Rngs(key))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. logits: [batch, classes], labels: int [batch]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
