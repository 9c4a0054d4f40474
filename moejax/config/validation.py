"""Checks of every config field before anything is built: `ConfigError` names the field, the
value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from moejax.config.groups import DTYPES, Config, ConfigError, MeshConfig, ModelConfig
from moejax.sparse_attention.options import AttentionOptions


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
    from moejax import expert_parallel, moe, routers
    from moejax.routers.dynamic import CAPACITY_SCHEDULES

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
    _known_name("model.router", model.router, list(routers.ROUTERS))
    if "state_prev" in routers.get(model.router).needs:
        # Its state is per token and layer to layer; depth routers change the token set.
        for name in ("mod_every", "layer_router_dim"):
            _require(
                getattr(model, name) == 0,
                f"model.{name}",
                getattr(model, name),
                f"0 with model.router={model.router!r} (it carries a state from layer to layer)",
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
    _known_name("model.expert_balance", model.expert_balance, expert_parallel.EXPERT_BALANCES)
    _require(model.llep_margin >= 0, "model.llep_margin", model.llep_margin, ">= 0")
    _require(
        model.llep_max_foreign >= 1,
        "model.llep_max_foreign",
        model.llep_max_foreign,
        "an int >= 1",
    )
    for name in (
        "load_balance_weight",
        "router_z_weight",
        "relu_sparsity_weight",
        "chunk_sparsity_weight",
        "router_entropy_weight",
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
    from moejax import routers

    _require(
        not model.moe_every or "attention_probs" not in routers.get(model.router).needs,
        "model.router",
        model.router,
        f"a router that does not read attention weights with {described} (only dense "
        "attention provides them)",
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
