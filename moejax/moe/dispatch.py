"""The dispatch contract: `DispatchSpec`, typed `DispatchOptions`, the registry and `moe_ffn`.

A dispatch strategy sends each token's routed assignments to their experts and weighs the
results back: `(x [tokens, d_model], routing, expert_params) -> y [tokens, d_model]`, and every
strategy agrees with every other when none drops an assignment. A strategy is a pure function
plus a `DispatchSpec` that says what the caller must hand it, in the shape of the router seam
(`moejax.routers.base`): `needs` lists the context it takes as keywords ("mesh", "train"),
`options` its own settings (a typed `DispatchOptions`, `model.moe.dispatch.options` in a config),
and `expert_shards` how it stands to the mesh's expert axis. `moejax.moe` registers the
built-in strategies by importing their files; adding one is a file that calls
`register(DispatchSpec(...))` and one import line there.

Expert parallelism is named, never inferred from a mesh: a strategy that splits the experts over
the "expert" mesh axis ("several") refuses a mesh without expert shards, and one that runs every
expert on every device ("one") refuses a mesh with them, naming the strategies that fit. The
mesh reaches a strategy as an argument (the layer passes the one the step is traced under).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.moe.experts import ExpertParams, check_params, check_x, shared_expert_ffn
from moejax.routers.base import Routing

# What `moe_ffn` can hand a strategy, by the keyword the dispatch function takes it under.
CONTEXT_NEEDS: Mapping[str, str] = {
    "mesh": "the mesh the step is traced under when it spans several devices (moejax's axes), "
    "else None",
    "train": "bool, training (True) or evaluation (False)",
}
# How a strategy stands to the mesh's "expert" axis.
EXPERT_SHARDS: Mapping[str, str] = {
    "one": "runs every expert on every device (mesh.expert must be 1)",
    "several": "splits the experts over mesh.expert (it must be > 1)",
    "any": "leaves the expert axis to the compiler's sharding annotations (any mesh.expert)",
}
EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class DispatchOptions:
    """A strategy's own settings, `model.moe.dispatch.options` in a config: a frozen dataclass
    per strategy with defaults, checked when built.

    Every field is passed to the dispatch function as the keyword of the same name, except those
    in `layer_fields`, which the model reads instead (a capacity schedule over depth).
    """

    layer_fields: ClassVar[tuple[str, ...]] = ()

    def dispatch_arguments(self) -> dict[str, object]:
        """The fields the dispatch function takes, by keyword."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self.layer_fields
        }

    def at_depth(self, position: int, count: int) -> DispatchOptions:
        """The options of the `position`-th of `count` MoE layers (the same, unless a strategy
        varies them over depth)."""
        del position, count
        return self


# Compared and hashed by identity: one registered instance per name (a model\'s static
# structure holds it, and jit hashes that structure).
@dataclasses.dataclass(frozen=True, eq=False)
class DispatchSpec:
    """Everything `moe_ffn` needs to know about one strategy.

    Attributes:
      name: the value of `model.moe.dispatch.name` that selects it.
      dispatch: `dispatch(x, routing, expert_params, **needs, **options.dispatch_arguments())
        -> (y [tokens, d_model] in x's dtype, dropped_fraction scalar float32)`.
      options: the strategy's `DispatchOptions` class, whose defaults are its defaults.
      needs: the context keywords `dispatch` takes, each a key of `CONTEXT_NEEDS`.
      expert_shards: a key of `EXPERT_SHARDS`, checked against the mesh by `check_mesh`.
      drops: whether it may drop assignments (a fixed capacity); strategies that never drop
        compute the same function, so a resumed run may switch between them.
    """

    name: str
    dispatch: Callable[..., tuple[jax.Array, jax.Array]]
    options: type[DispatchOptions] = DispatchOptions
    needs: tuple[str, ...] = ()
    expert_shards: str = "one"
    drops: bool = False

    def __post_init__(self) -> None:
        where = f"DispatchSpec({self.name!r})"
        unknown = [need for need in self.needs if need not in CONTEXT_NEEDS]
        require(not unknown, f"{where}.needs", unknown, f"names from {', '.join(CONTEXT_NEEDS)}")
        require(
            self.expert_shards in EXPERT_SHARDS,
            f"{where}.expert_shards",
            self.expert_shards,
            ", ".join(EXPERT_SHARDS),
        )
        require(
            isinstance(self.options, type) and issubclass(self.options, DispatchOptions),
            f"{where}.options",
            self.options,
            "a DispatchOptions subclass",
        )
        keywords = inspect.signature(self.dispatch).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in keywords.values())
        wanted = list(self.needs) + [
            f.name
            for f in dataclasses.fields(self.options)
            if f.name not in self.options.layer_fields
        ]
        missing = [name for name in wanted if name not in keywords and not takes_any]
        require(
            not missing,
            f"{where}.dispatch",
            missing,
            "a function taking every need and option field as a keyword (or listing the option "
            "in layer_fields)",
        )

    def fits_expert_shards(self, shards: int) -> bool:
        """Whether the strategy runs with `shards` (the size of the mesh's expert axis)."""
        return {"one": shards == 1, "several": shards > 1, "any": True}[self.expert_shards]

    def expert_shards_rule(self, shards: int) -> str:
        """What is allowed instead of `shards`: the rule, and the strategies that fit it."""
        wanted = "several" if shards > 1 else "one"
        fitting = [s.name for s in DISPATCHES.values() if s.expert_shards in (wanted, "any")]
        return (
            f"{'1' if self.expert_shards == 'one' else '> 1'} for dispatch {self.name!r}, which "
            f"{EXPERT_SHARDS[self.expert_shards]}; for {shards} expert shards name one of: "
            f"{', '.join(fitting)}"
        )

    def check_mesh(self, mesh: jax.sharding.AbstractMesh | None) -> None:
        """ValueError naming the strategies that fit unless the expert axis of `mesh` (the
        mesh a step is traced under; None: one device) suits this strategy."""
        shards = 1 if mesh is None else dict(mesh.shape).get(EXPERT_AXIS, 1)
        require(
            self.fits_expert_shards(shards),
            "mesh expert axis",
            shards,
            self.expert_shards_rule(shards),
        )


DISPATCHES: dict[str, DispatchSpec] = {}


def register(spec: DispatchSpec) -> DispatchSpec:
    """Makes `spec.name` selectable as `model.moe.dispatch.name`; returns the spec."""
    require(spec.name not in DISPATCHES, "dispatch", spec.name, "a name not already registered")
    DISPATCHES[spec.name] = spec
    return spec


def get(name: str) -> DispatchSpec:
    """The spec registered under `name`; a ValueError listing the registered names otherwise."""
    require(name in DISPATCHES, "dispatch", name, ", ".join(DISPATCHES))
    return DISPATCHES[name]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEOutput:
    """Result of `moe_ffn`.

    Attributes:
      y: [tokens, d_model], same dtype as the input.
      dropped_fraction: scalar float32, share of the tokens * top_k assignments that were
        dropped for lack of expert capacity (always 0 for dropless strategies).
    """

    y: jax.Array
    dropped_fraction: jax.Array


def moe_ffn(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    strategy: str,
    options: DispatchOptions | None = None,
    mesh: jax.sharding.AbstractMesh | None = None,
    train: bool = True,
    shared_params: ExpertParams | None = None,
    shared_gate: jax.Array | None = None,
) -> MoEOutput:
    """The routed-experts feed-forward block with a registered dispatch strategy.

    Args:
      x: [tokens, d_model].
      routing: from a router in `moejax.routers`.
      expert_params: see `moejax.moe.experts`.
      strategy: a name from `DISPATCHES`.
      options: the strategy's `DispatchOptions`; None: its defaults.
      mesh: the mesh the call is traced under when it spans several devices, else None (see
        `moejax.parallel.sharding.kernel_mesh`); checked against the strategy's
        `expert_shards`.
      train: training or evaluation (a capacity strategy may size its buffers differently).
      shared_params: shared experts added for every token (see `shared_expert_ffn`), or None.
      shared_gate: [tokens], a per-token factor of the shared experts' output (Qwen2-MoE's
        sigmoid gate), or None.

    Returns:
      `MoEOutput` with y [tokens, d_model] and the dropped fraction.
    """
    spec = get(strategy)
    options = spec.options() if options is None else options
    require(
        type(options) is spec.options,
        "options",
        options,
        f"a {spec.options.__name__} (the options of dispatch {strategy!r})",
    )
    spec.check_mesh(mesh)
    check_inputs(x, routing, expert_params)
    context = {"mesh": mesh, "train": train}
    y, dropped_fraction = spec.dispatch(
        x,
        routing,
        expert_params,
        **{need: context[need] for need in spec.needs},
        **options.dispatch_arguments(),
    )
    if shared_params is not None:
        shared = shared_expert_ffn(x, shared_params)
        if shared_gate is not None:
            shared = shared * shared_gate[:, None].astype(shared.dtype)
        y = y + shared
    return MoEOutput(y=y, dropped_fraction=jnp.asarray(dropped_fraction, jnp.float32))


def check_inputs(x: jax.Array, routing: Routing, expert_params: ExpertParams) -> int:
    """Validates shapes shared by every strategy and returns num_experts."""
    check_x(x)
    num_experts = check_params(x, expert_params, "expert_params", "experts")
    num_tokens = x.shape[0]
    if routing.expert_index.ndim != 2 or routing.expert_index.shape[0] != num_tokens:
        raise ValueError(
            f"routing.expert_index: expected [tokens={num_tokens}, top_k], "
            f"got shape {routing.expert_index.shape}"
        )
    if routing.combine_weights.shape != routing.expert_index.shape:
        raise ValueError(
            f"routing.combine_weights: shape {routing.combine_weights.shape} differs from "
            f"expert_index's {routing.expert_index.shape}"
        )
    return num_experts
