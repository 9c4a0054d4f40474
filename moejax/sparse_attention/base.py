"""The attention-kind contract: the `AttentionPlan` a kind returns, its `AttentionKindSpec`, and
the registry.

A kind is a plan function plus an `AttentionKindSpec` that says what `SparseAttention` must hand
it. The layer reads the spec, never the kind's name: `needs` lists the inputs the plan function
takes as keyword arguments (from `CONTEXT_NEEDS`), `init_params` the parameters the layer owns
for it, `state` what it keeps between steps outside the gradient, and `options` its own settings
(a typed `KindOptions`, `attention.options` in a config). `moejax.sparse_attention` registers
every built-in kind by importing its file; adding a kind is one file that calls
`register(AttentionKindSpec(...))` and one import line there.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping

import jax
import numpy as np

from moejax.errors import require
from moejax.routers.base import RouterState

Params = dict[str, jax.Array]
Axes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Which blocks to visit and how: the kernel's mask and flags, and routing diagnostics.

    `block_mask [batch or 1, heads or 1, q_blocks, kv_blocks]` bool (numpy for static
    patterns); `selected [batch, heads or 1, q_blocks, top_k]` int32 routed kv blocks (-1:
    none), None for static patterns; `max_kv_blocks` the static bound on visited blocks per
    query block; `window` an exact token window inside the visited blocks (None: none);
    `key_bias [batch, length, kv_heads]` float32 added to every logit of a key (None: none).
    """

    block_mask: jax.Array | np.ndarray
    block_q: int
    block_kv: int
    max_kv_blocks: int
    window: int | None = None
    selected: jax.Array | None = None
    key_bias: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class HeadShape:
    """The attention layer's head layout, which a kind's parameters and state are shaped by."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class KindOptions:
    """A kind's own settings, `attention.options` in a config: a frozen dataclass per kind with
    defaults, checked when built (`__post_init__`, errors naming `attention.options.<field>`).

    `check(block_size)` checks the fields against the block size shared by all kinds, and
    `check_length(length)` against a sequence length; both do nothing unless a kind overrides
    them. `shares_qk` True means the keys are the (group-averaged) queries: the layer then has
    no key projection and moves keys and values one slot later (no token attends to itself).
    """

    def check(self, block_size: int) -> None:
        """Checks the options against `attention.block_size`; a ValueError if they clash."""

    def check_length(self, length: int) -> None:
        """Checks the options against a sequence length; a ValueError if they clash."""

    @property
    def shares_qk(self) -> bool:
        return False

    @property
    def query_block(self) -> int | None:
        """Query tokens per routing decision when it differs from the kv block; None: same."""
        return None


class KindState(RouterState):
    """A kind's state updated outside the gradient (Routing Transformer centroids); kept in the
    train state beside the parameters and checkpointed with them."""


@dataclasses.dataclass(frozen=True)
class KindStateSpec:
    """State a kind keeps between steps; the plan function then returns `(plan, new_state)`
    and the layer keeps the new state after training steps only.

    Attributes:
      name: the layer attribute that holds it (its checkpoint path).
      init: `(key, HeadShape, options) -> array`, the initial value.
      axes: logical axis names of the state array.
    """

    name: str
    init: Callable[[jax.Array, HeadShape, KindOptions], jax.Array]
    axes: Axes


# What the layer can hand a plan function, by the keyword the plan function takes it under.
CONTEXT_NEEDS: Mapping[str, str] = {
    "queries": "[batch, length, heads, head_dim] the queries before rotary",
    "keys": "[batch, length, kv_heads, head_dim] the keys before rotary (moved one slot later "
    "when the options share queries and keys)",
    "values": "[batch, length, kv_heads, head_dim] the values",
    "num_heads": "int, query heads",
    "params": "the kind's own parameters (from `init_params`), by name",
    "state": "the kind's state (from `state.init`); the plan then returns (plan, new_state)",
}


@dataclasses.dataclass(frozen=True)
class AttentionKindSpec:
    """Everything `SparseAttention` needs to know about one attention kind.

    Attributes:
      name: the value of `attention.kind` that selects it.
      plan: `plan(*, length, block_size, options, **needs) -> AttentionPlan` (or
        `(AttentionPlan, new_state)` when "state" is needed). Required: a kind without a plan
        is refused, there is no default pattern to fall back to.
      needs: the context keywords `plan` takes besides `length`, `block_size` and `options`,
        each a key of `CONTEXT_NEEDS`.
      options: the kind's `KindOptions` class, whose defaults are the kind's defaults.
      init_params: `(key, HeadShape, options) -> Params`, parameters each layer owns for the
        kind (passed as "params"); None when it has none.
      param_axes: logical axis names of each parameter of `init_params`.
      state: the kind's `KindStateSpec`, or None.
      full_attention: True for plain causal attention (every block visited): a transformer
        block then runs the dense `moejax.attention.Attention` module, which also gives token
        positions and attention weights to the layers that want them.
    """

    name: str
    plan: Callable[..., AttentionPlan | tuple[AttentionPlan, jax.Array]]
    needs: tuple[str, ...] = ()
    options: type[KindOptions] = KindOptions
    init_params: Callable[..., Params] | None = None
    param_axes: Mapping[str, Axes] = dataclasses.field(default_factory=dict)
    state: KindStateSpec | None = None
    full_attention: bool = False

    def __post_init__(self) -> None:
        where = f"AttentionKindSpec({self.name!r})"
        require(callable(self.plan), f"{where}.plan", self.plan, "a plan function")
        unknown = [need for need in self.needs if need not in CONTEXT_NEEDS]
        require(not unknown, f"{where}.needs", unknown, f"names from {', '.join(CONTEXT_NEEDS)}")
        require(
            ("params" in self.needs) == (self.init_params is not None),
            f"{where}.init_params",
            self.init_params,
            "a function exactly when 'params' is among the needs",
        )
        require(
            (self.init_params is None) == (not self.param_axes),
            f"{where}.param_axes",
            dict(self.param_axes),
            "the logical axes of every parameter of init_params (empty without init_params)",
        )
        require(
            ("state" in self.needs) == (self.state is not None),
            f"{where}.state",
            self.state,
            "a KindStateSpec exactly when 'state' is among the needs",
        )
        require(
            isinstance(self.options, type)
            and issubclass(self.options, KindOptions)
            and dataclasses.is_dataclass(self.options),
            f"{where}.options",
            self.options,
            "a KindOptions dataclass",
        )
        missing = [
            f.name
            for f in dataclasses.fields(self.options)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        require(not missing, f"{where}.options", missing, "fields with defaults (the kind's)")
        try:
            self.options()
        except ValueError as error:
            raise ValueError(f"{where}.options: its defaults are refused: {error}") from None
        keywords = inspect.signature(self.plan).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in keywords.values())
        takes = {"length", "block_size", "options", *self.needs}
        absent = sorted(name for name in takes if name not in keywords and not takes_any)
        require(
            not absent,
            f"{where}.plan",
            absent,
            "keywords the plan function takes (length, block_size, options and the needs)",
        )
        extra = sorted(
            name
            for name, p in keywords.items()
            if name not in takes and p.default is p.empty and p.kind is not p.VAR_KEYWORD
        )
        require(
            not extra,
            f"{where}.needs",
            extra,
            "every input the plan function requires, declared (never inferred)",
        )


KINDS: dict[str, AttentionKindSpec] = {}


def register(spec: AttentionKindSpec) -> AttentionKindSpec:
    """Makes `spec.name` selectable as `attention.kind`; returns the spec."""
    require(isinstance(spec, AttentionKindSpec), "attention kind", spec, "an AttentionKindSpec")
    require(spec.name not in KINDS, "attention.kind", spec.name, "a name not already registered")
    KINDS[spec.name] = spec
    return spec


def get(name: str) -> AttentionKindSpec:
    """The spec registered under `name`; a ValueError listing the registered names otherwise."""
    require(name in KINDS, "attention.kind", name, ", ".join(KINDS))
    return KINDS[name]


def names() -> tuple[str, ...]:
    """The registered kinds, in registration order (dense first)."""
    return tuple(KINDS)
