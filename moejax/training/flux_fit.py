"""Training Flux layer routers on a frozen language model, and the fixed gates they are judged
against.

Flux Attention trains only the per-layer routers that choose full or sparse attention; the
model it routes stays as it was trained. Each router's hard choice passes a straight-through
gradient (`flux.flux_gate`), so the language-model loss tells it, per sequence, how much full
attention would have helped, and the budget loss holds the share of full attention near its
target. `FixedGate` replaces a router by a choice that ignores the content (always full,
always sparse, or a coin with a given probability), which is what the router must beat.

A training driver (an optimizer over a built model's router parameters), so it lives in
`training/` rather than in `moejax.sparse_attention`, the package of attention math the model
is built from. It is not a `tasks/` program: it has no data, workdir or report of its own;
`benchmarks/flux_router.py` is the experiment that drives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.sparse_attention.flux import ROUTER_NAME, router_param_filter

FULL_LOGIT = 10.0  # sigmoid(10) > 0.9999: a hard decision either way


@dataclasses.dataclass(frozen=True)
class FluxFitOptions:
    """Router training: Adam for `steps` steps at `learning_rate`; the loss is the mean
    next-token cross-entropy plus `budget_weight` times the layers' summed budget losses."""

    steps: int = 200
    learning_rate: float = 3e-3
    budget_weight: float = 1.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be at least 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate}: must be positive")
        if self.budget_weight < 0:
            raise ValueError(f"budget_weight={self.budget_weight}: must be >= 0")


class FixedGate(nnx.Module):
    """A stand-in for a Flux router that ignores content: each sequence runs full attention
    with probability `full_share` (a per-sequence coin seeded by `salt` and the sequence's own
    values, so the same sequence gets the same coin in every call). `full_share` 1 or 0 is
    always full or always sparse. `x [batch, length, d]` -> logits `[batch]`."""

    def __init__(self, full_share: float, salt: int):
        if not 0.0 <= full_share <= 1.0:
            raise ValueError(f"full_share={full_share}: must be in [0, 1]")
        self.full_share, self.salt = full_share, salt

    def __call__(self, x: jax.Array) -> jax.Array:
        # Integer sums wrap exactly in any order, so the coin does not depend on how a float
        # reduction was split (which changes with the batch size).
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
        fingerprint = jnp.sum(bits, axis=(1, 2), dtype=jnp.int32)
        keys = jax.vmap(lambda f: jax.random.fold_in(jax.random.key(self.salt), f))(fingerprint)
        coins = jax.vmap(jax.random.uniform)(keys)
        return jnp.where(coins < self.full_share, FULL_LOGIT, -FULL_LOGIT)


def flux_layers(model: nnx.Module) -> list[nnx.Module]:
    """The attention modules of `model` that hold a Flux router, in layer order."""
    layers = [
        m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and hasattr(m, ROUTER_NAME)
    ]
    if not layers:
        raise ValueError("the model has no Flux router: set attention.flux_router=true")
    return layers


def set_fixed_gates(model: nnx.Module, full_shares: Sequence[float], salt: int = 0) -> list:
    """Replaces each layer's Flux router by a `FixedGate` with that layer's full share; returns
    the replaced routers so `restore_routers` can put them back."""
    layers = flux_layers(model)
    if len(full_shares) != len(layers):
        raise ValueError(f"full_shares: {len(full_shares)} values for {len(layers)} Flux layers")
    previous = [getattr(layer, ROUTER_NAME) for layer in layers]
    for i, (layer, share) in enumerate(zip(layers, full_shares, strict=True)):
        setattr(layer, ROUTER_NAME, FixedGate(float(share), salt * 1000 + i))
    return previous


def restore_routers(model: nnx.Module, routers: list) -> None:
    """Puts back the routers `set_fixed_gates` returned."""
    for layer, router in zip(flux_layers(model), routers, strict=True):
        setattr(layer, ROUTER_NAME, router)


def sequence_nll(model: nnx.Module, tokens: jax.Array, targets: jax.Array, *, train: bool):
    """(`[batch]` mean next-token negative log-likelihood per sequence in nats,
    `[num_layers]` share of sequences each Flux layer sent to full attention,
    summed budget loss)."""
    logits, aux = model(tokens, train=train)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    layers = [a for a in aux if a is not None and "flux_full_share" in a]
    shares = jnp.stack([a["flux_full_share"] for a in layers])
    budget = sum(a["flux_budget_loss"] for a in layers)
    return jnp.mean(nll, axis=-1), shares, budget


def fit_flux_routers(
    model: nnx.Module, batches: Iterable[dict], options: FluxFitOptions
) -> list[dict[str, float]]:
    """Trains the Flux router parameters of `model` in place on `batches` (cycled, dicts with
    int32 `inputs`, `targets` `[batch, length]`) with every other weight frozen.

    Returns one record per step: `loss` (nats), `budget` and `full_share` (mean over layers).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches: need at least one training batch")
    flux_layers(model)
    graphdef, router_params, rest = nnx.split(model, router_param_filter, ...)
    optimizer = optax.adam(options.learning_rate)
    opt_state = optimizer.init(router_params)

    @jax.jit
    def step(router_params, opt_state, rest, tokens, targets):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest)
            nll, shares, budget = sequence_nll(m, tokens, targets, train=True)
            return jnp.mean(nll) + options.budget_weight * budget, (jnp.mean(shares), budget)

        (loss, (share, budget)), grads = jax.value_and_grad(loss_fn, has_aux=True)(router_params)
        updates, opt_state = optimizer.update(grads, opt_state, router_params)
        return optax.apply_updates(router_params, updates), opt_state, loss, share, budget

    history = []
    for i in range(options.steps):
        batch = batches[i % len(batches)]
        router_params, opt_state, loss, share, budget = step(
            router_params, opt_state, rest, batch["inputs"], batch["targets"]
        )
        history.append({"loss": float(loss), "budget": float(budget), "full_share": float(share)})
    nnx.update(model, router_params)
    return history


def evaluate_gates(model: nnx.Module, batches: Iterable[dict]) -> dict[str, object]:
    """Evaluation-mode pass (routers decide, dense runs only where one picked it) over
    `batches`: `nll` `[sequences]` in nats and `full_share` `[num_layers]`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, targets):
        return sequence_nll(nnx.merge(graphdef, state), tokens, targets, train=False)[:2]

    nlls, shares = [], []
    for batch in batches:
        nll, share = run(state, batch["inputs"], batch["targets"])
        nlls.append(nll)
        shares.append(share)
    return {"nll": jnp.concatenate(nlls), "full_share": jnp.mean(jnp.stack(shares), axis=0)}
