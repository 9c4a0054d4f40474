"""The checks that need more than one group (or the devices present), run before anything is
built; each group checks its own fields when it is constructed. `ConfigError` names the field,
the value and what is allowed."""

from __future__ import annotations

import math
from pathlib import Path

from moejax.config.groups import Config, MeshConfig
from moejax.config.model import ModelConfig
from moejax.errors import ConfigError, require_config
from moejax.pruning.base import get_method
from moejax.sparse_attention.config import AttentionConfig


def validate_mesh(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Checks the mesh against the devices present; returns the resolved axis sizes."""
    sizes = mesh.sizes()
    known = math.prod(size for size in sizes.values() if size != -1)
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
    if -1 in sizes.values():
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


def validate_attention(attention: AttentionConfig, model: ModelConfig, seq_len: int) -> None:
    """Checks the attention group against the model and the sequence length."""
    if not attention.uses_block_kernel:
        return
    described = f"attention.kind={attention.kind!r}"
    require_config(
        model.depth.mod_every == 0,
        "model.depth.mod_every",
        model.depth.mod_every,
        f"0 with {described} (mixture-of-depths needs the dense attention's token positions)",
    )
    require_config(
        not model.moe.every or "attention_probs" not in model.router.spec.needs,
        "model.router.name",
        model.router.name,
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
    validate_attention(config.attention, model, data.seq_len)
    require_config(
        data.seq_len <= model.max_seq_len,
        "data.seq_len",
        data.seq_len,
        f"at most model.max_seq_len={model.max_seq_len}",
    )
    if data.tokenizer:
        tokens = tokenizer_vocab_size(data.tokenizer)
        require_config(
            model.vocab_size >= tokens,
            "model.vocab_size",
            model.vocab_size,
            f">= {tokens}, the vocabulary of data.tokenizer={data.tokenizer!r}",
        )
    else:
        require_config(
            model.vocab_size >= 256,
            "model.vocab_size",
            model.vocab_size,
            ">= 256 (the corpus is byte-level; data.tokenizer reads tokens instead)",
        )
    # A method that changes masks outside the optimizer (`MethodSpec.refine`: MaskLLM's learnt
    # masks, DSnoT's swaps, lottery rounds) has its own driver; the LM's training loop never
    # calls the hook, so such a run would silently train with plain masks instead.
    method = get_method(config.pruning.method.name)
    require_config(
        method.refine is None,
        "pruning.method.name",
        config.pruning.method.name,
        "a method train.py runs whole; this one changes masks through its refine hook, which "
        "its own program drives (moejax.tasks.lottery, moejax.compress --refine dsnot), not "
        "the LM's training loop",
    )
    first_prune_step = config.pruning.first_prune_step()
    if first_prune_step is not None:
        require_config(
            first_prune_step < train.steps,
            "pruning.schedule.options.begin_step",
            first_prune_step,
            f"< train.steps={train.steps} (the schedule would never prune)",
        )

    sizes = validate_mesh(config.mesh, num_devices)
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    for name in ("global_batch_size", "eval_batch_size"):
        value = getattr(data, name)
        require_config(
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
    if model.moe.every:
        divisible["model.moe.num_experts"] = (model.moe.num_experts, "expert")
        divisible["model.moe.expert_d_ff"] = (model.moe.expert_d_ff, "tensor")
    for field, (value, axis) in divisible.items():
        require_config(
            value % sizes[axis] == 0,
            field,
            value,
            f"a multiple of mesh.{axis}={sizes[axis]} (it is sharded over that axis)",
        )
    if model.moe.every:
        # Expert parallelism is named by the dispatch strategy, never implied by the mesh.
        spec = model.moe.dispatch.spec
        require_config(
            spec.fits_expert_shards(sizes["expert"]),
            "mesh.expert",
            sizes["expert"],
            f"{spec.expert_shards_rule(sizes['expert'])} (model.moe.dispatch.name)",
        )
    return sizes


def tokenizer_vocab_size(path: str) -> int:
    """The vocabulary size of the tokenizer `data.tokenizer` names; ConfigError if it cannot
    be read."""
    # The rule of moejax.data.pipeline.tokenizer_file, which this floor cannot import (grain).
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    require_config(
        file.is_file(),
        "data.tokenizer",
        path,
        "a tokenizer.json file or a directory holding one",
    )
    try:
        import tokenizers
    except ImportError:
        require_config(False, "data.tokenizer", path, "set with the `tokenizers` package installed")
    return tokenizers.Tokenizer.from_file(str(file)).get_vocab_size()
