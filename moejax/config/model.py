"""The `model` group: the transformer's shape, and its `moe`, `router` and `depth` subgroups.

Each group checks its own fields when built (`__post_init__`, `ConfigError` naming the field's
command-line path); checks that need another group (the mesh, the data, the attention) are in
`moejax.config.validation`. A router's own settings are a typed `RouterOptions` of that router
(`moejax.routers`), checked by it: `--config.model.router.name=top_p
--config.model.router.options.top_p=0.5`; a dispatch strategy's likewise a typed
`DispatchOptions` (`moejax.moe`): `--config.model.moe.dispatch.name=capacity
--config.model.moe.dispatch.options.capacity_factor=2.0`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from moejax import moe, routers
from moejax.attention import QK_NORMS, AttentionOptions
from moejax.errors import (
    require_config,
    require_non_negative,
    require_one_of,
    require_positive,
)
from moejax.latent_attention import LatentAttentionConfig
from moejax.moe.dispatch import DispatchOptions, DispatchSpec
from moejax.rotary import RopeScaling
from moejax.routers.base import RouterOptions

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The MoE layers' router: `name` from `moejax.routers.ROUTERS` and its typed options.

    `options` None (or left out) means the router's defaults; options of another router are an
    error. The two weights are of the losses most routers report; a router's own loss weights
    are fields of its options (top_p's `entropy_weight`, relu_rmsnorm's `sparsity_weight`).
    """

    # The router, a name from moejax.routers.ROUTERS.
    name: str = "softmax_top_k"
    # The router's own options (model.router.options.*); None: its defaults.
    options: RouterOptions | None = None
    # Weight of the Switch load-balancing loss.
    load_balance_weight: float = 0.01
    # Weight of the ST-MoE router z-loss.
    router_z_weight: float = 0.001

    # Setting `name` from the command line starts `options` from the new router's defaults.
    resets: ClassVar[dict[str, str]] = {"name": "options"}

    def __post_init__(self) -> None:
        require_one_of("model.router.name", self.name, list(routers.ROUTERS))
        options_class = self.spec.options
        if self.options is None:
            object.__setattr__(self, "options", options_class())
        require_config(
            type(self.options) is options_class,
            "model.router.options",
            self.options,
            f"a {options_class.__name__} (the options of router {self.name!r})",
        )
        require_non_negative("model.router", self, ("load_balance_weight", "router_z_weight"))

    @property
    def spec(self) -> routers.RouterSpec:
        return routers.get(self.name)

    @classmethod
    def of(cls, name: str, **options: Any) -> RouterConfig:
        """`RouterConfig(name, options=<name's options>(**options))`, e.g.
        `RouterConfig.of("top_p", top_p=0.5)`."""
        require_one_of("model.router.name", name, list(routers.ROUTERS))
        return cls(name=name, options=routers.get(name).options(**options))

    def loss_weight(self, field: str) -> float:
        """The value of the loss-weight field `field` (a common weight or an options field)."""
        return self.spec.loss_weight(field, self.options, self)


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """How tokens reach the experts: `name` from `moejax.moe.DISPATCHES` and its typed options.

    `options` None (or left out) means the strategy's defaults; options of another strategy are
    an error. Expert parallelism is a strategy by name: "expert_parallel" and "llep" split the
    experts over mesh.expert (which must then be > 1), "dropless" keeps every expert on every
    device (mesh.expert must be 1), "capacity" runs on any mesh (`moejax.config.validation`).
    """

    # The strategy, a name from moejax.moe.DISPATCHES: "dropless" (grouped matmuls, nothing
    # dropped), "capacity" (fixed expert buffers, overflow dropped), "expert_parallel" (experts
    # split over mesh.expert, tokens exchanged by all-to-all) or "llep" (the same, with the load
    # of hot experts shared between shards).
    name: str = "dropless"
    # The strategy's own options (model.moe.dispatch.options.*); None: its defaults.
    options: DispatchOptions | None = None

    # Setting `name` from the command line starts `options` from the new strategy's defaults.
    resets: ClassVar[dict[str, str]] = {"name": "options"}

    def __post_init__(self) -> None:
        require_one_of("model.moe.dispatch.name", self.name, list(moe.DISPATCHES))
        options_class = self.spec.options
        if self.options is None:
            object.__setattr__(self, "options", options_class())
        require_config(
            type(self.options) is options_class,
            "model.moe.dispatch.options",
            self.options,
            f"a {options_class.__name__} (the options of dispatch {self.name!r})",
        )

    @property
    def spec(self) -> DispatchSpec:
        return moe.get(self.name)

    @classmethod
    def of(cls, name: str, **options: Any) -> DispatchConfig:
        """`DispatchConfig(name, options=<name's options>(**options))`, e.g.
        `DispatchConfig.of("capacity", capacity_factor=2.0)`."""
        require_one_of("model.moe.dispatch.name", name, list(moe.DISPATCHES))
        return cls(name=name, options=moe.get(name).options(**options))

    def at_depth(self, position: int, count: int) -> DispatchConfig:
        """This dispatch for the `position`-th of `count` MoE layers (a capacity schedule)."""
        return dataclasses.replace(self, options=self.options.at_depth(position, count))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Where the MoE layers are, their experts, and how tokens reach them."""

    # Layer i is a MoE layer when (i + 1) % every == 0; 0 means no MoE layer at all.
    every: int = 1
    # Routed experts in each MoE layer.
    num_experts: int = 4
    # Experts each token is sent to.
    top_k: int = 2
    # Hidden width of each expert's feed-forward.
    expert_d_ff: int = 256
    # The dispatch strategy and its options (model.moe.dispatch.name, .options.*).
    dispatch: DispatchConfig = dataclasses.field(default_factory=DispatchConfig)
    # Always-on experts beside the routed ones (DeepSeekMoE); width 0 means expert_d_ff.
    num_shared_experts: int = 0
    # Hidden width of each shared expert; 0 means expert_d_ff.
    shared_expert_d_ff: int = 0
    # Scale the shared experts' output by sigmoid(x @ w) per token (Qwen2-MoE).
    shared_expert_gate: bool = False
    # Layers that stay dense although `every` makes them MoE layers (DeepSeek's first layers,
    # Qwen's mlp_only_layers).
    dense_layers: tuple[int, ...] = ()
    # Zero-shot relative-norm halting at evaluation (Equifinality): a token skips a MoE layer's
    # update when ||update|| / ||x|| is below this; 0 turns it off. Training ignores it.
    halting_threshold: float = 0.0

    def __post_init__(self) -> None:
        require_config(
            self.every >= 0, "model.moe.every", self.every, "0 (no MoE layers) or a layer interval"
        )
        require_positive("model.moe", self, ("num_experts", "expert_d_ff"))
        require_config(
            1 <= self.top_k <= self.num_experts,
            "model.moe.top_k",
            self.top_k,
            f"1 <= top_k <= model.moe.num_experts={self.num_experts}",
        )
        require_config(
            self.halting_threshold >= 0,
            "model.moe.halting_threshold",
            self.halting_threshold,
            ">= 0 (0 turns halting off)",
        )
        require_non_negative("model.moe", self, ("num_shared_experts", "shared_expert_d_ff"))
        require_config(
            not self.shared_expert_gate or self.num_shared_experts > 0,
            "model.moe.shared_expert_gate",
            self.shared_expert_gate,
            "False when model.moe.num_shared_experts is 0",
        )
        # A JSON round trip gives a list.
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        require_config(
            all(isinstance(i, int) and i >= 0 for i in self.dense_layers),
            "model.moe.dense_layers",
            self.dense_layers,
            "layer indices >= 0",
        )

    def is_moe_layer(self, layer: int) -> bool:
        return self.every > 0 and (layer + 1) % self.every == 0 and layer not in self.dense_layers


@dataclasses.dataclass(frozen=True)
class DepthConfig:
    """Routing over depth: mixture-of-depths and Dr.LLM layer routers."""

    # Mixture-of-depths (Raposo et al.): layer i routes only the top mod_capacity share of each
    # sequence's tokens through the block when (i + 1) % mod_every == 0; 0 turns it off. At
    # evaluation a causal predictor (trained alongside) picks the tokens instead of top-C.
    mod_every: int = 0
    mod_capacity: float = 0.125
    # Weight of the loss of the causal predictor mixture-of-depths uses at eval.
    mod_predictor_weight: float = 0.1
    # Dr.LLM layer routers (skip / execute / repeat per sequence and block): the bottleneck
    # width of each router, 0 for none. They are fitted on a frozen model by
    # `moejax.training.fit_layer_router` and act at evaluation.
    layer_router_dim: int = 0

    def __post_init__(self) -> None:
        require_config(
            self.mod_every >= 0,
            "model.depth.mod_every",
            self.mod_every,
            "0 (no mixture-of-depths) or a positive layer interval",
        )
        require_config(
            0.0 < self.mod_capacity <= 1.0,
            "model.depth.mod_capacity",
            self.mod_capacity,
            "a share of the tokens in (0, 1]",
        )
        require_config(
            self.mod_predictor_weight >= 0,
            "model.depth.mod_predictor_weight",
            self.mod_predictor_weight,
            ">= 0",
        )
        require_config(
            self.layer_router_dim >= 0,
            "model.depth.layer_router_dim",
            self.layer_router_dim,
            "0 (no layer routers) or the router's hidden width",
        )
        require_config(
            not (self.mod_every and self.layer_router_dim),
            "model.depth.layer_router_dim",
            self.layer_router_dim,
            "0 when model.depth.mod_every is set (a block is routed by one depth router at most)",
        )

    def is_mod_layer(self, layer: int) -> bool:
        return self.mod_every > 0 and (layer + 1) % self.mod_every == 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer: its shape here, its MoE layers in `moe` and `router`, routing
    over depth in `depth`."""

    # Token vocabulary; the byte-level corpora need >= 256.
    vocab_size: int = 256
    # Width of the residual stream.
    d_model: int = 128
    # Transformer blocks.
    num_layers: int = 4
    # Query heads of each attention layer.
    num_heads: int = 4
    # Key/value heads (grouped-query attention); divides num_heads.
    num_kv_heads: int = 2
    # Width of each head; even (rotary embeddings rotate pairs).
    head_dim: int = 32
    # Longest sequence the model accepts (data.seq_len <= this).
    max_seq_len: int = 256
    # Base of the rotary position embedding frequencies.
    rope_base: float = 10_000.0
    # Feed-forward of the layers that are not MoE layers.
    d_ff: int = 512
    # Activation dtype: float32 or bfloat16.
    dtype: str = "float32"
    # Parameter (and optimiser state) dtype: float32 or bfloat16.
    param_dtype: str = "float32"
    # Share the input embedding with the output projection.
    tie_embeddings: bool = True
    # Multiply the tied input embedding by sqrt(d_model) (its table is small: std 0.02);
    # pretrained checkpoints do not.
    scale_embedding: bool = True
    # Epsilon of every RMSNorm.
    norm_eps: float = 1e-6
    # Biases on the query/key/value projections (Qwen2) and on the output projection.
    qkv_bias: bool = False
    out_bias: bool = False
    # RMSNorm of queries and keys before rotary: "none", "per_head" (Qwen3) or
    # "across_heads" (OLMoE).
    qk_norm: str = "none"
    # How the rotary frequencies are stretched (llama3, yarn, linear), model.rope_scaling.*.
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    # Multi-head latent attention (DeepSeek) instead of grouped-query attention when its
    # kv_lora_rank > 0.
    latent_attention: LatentAttentionConfig = dataclasses.field(
        default_factory=LatentAttentionConfig
    )
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    depth: DepthConfig = dataclasses.field(default_factory=DepthConfig)

    def __post_init__(self) -> None:
        require_positive(
            "model",
            self,
            (
                "vocab_size",
                "d_model",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "max_seq_len",
                "d_ff",
                "rope_base",
            ),
        )
        require_config(
            self.head_dim % 2 == 0,
            "model.head_dim",
            self.head_dim,
            "an even number (rotary embeddings rotate pairs of features)",
        )
        require_config(
            self.num_heads % self.num_kv_heads == 0,
            "model.num_kv_heads",
            self.num_kv_heads,
            f"a divisor of model.num_heads={self.num_heads}",
        )
        require_one_of("model.dtype", self.dtype, DTYPES)
        require_one_of("model.param_dtype", self.param_dtype, DTYPES)
        require_one_of("model.qk_norm", self.qk_norm, list(QK_NORMS))
        require_config(
            0 < self.norm_eps < 1, "model.norm_eps", self.norm_eps, "a small number in (0, 1)"
        )
        if self.moe.every and "state_prev" in self.router.spec.needs:
            # Its state is per token and layer to layer; depth routers change the token set.
            for name in ("mod_every", "layer_router_dim"):
                value = getattr(self.depth, name)
                require_config(
                    value == 0,
                    f"model.depth.{name}",
                    value,
                    f"0 with model.router.name={self.router.name!r} (it carries a state from "
                    "layer to layer)",
                )

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.is_moe_layer(layer)

    def attention_options(self) -> AttentionOptions:
        """What the grouped-query attention layers take from this config."""
        return AttentionOptions(
            qkv_bias=self.qkv_bias,
            out_bias=self.out_bias,
            qk_norm=self.qk_norm,
            norm_eps=self.norm_eps,
            rope_scaling=self.rope_scaling,
            max_position=self.max_seq_len,
        )

    def is_mod_layer(self, layer: int) -> bool:
        return self.depth.is_mod_layer(layer)
