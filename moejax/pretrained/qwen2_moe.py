"""Qwen2-MoE: q/k/v biases, softmax top-k, one shared expert behind a sigmoid gate, and dense
layers where `mlp_only_layers` or `decoder_sparse_step` put them."""

from __future__ import annotations

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.pretrained.architecture import (
    Architecture,
    HFConfig,
    attention_tensors,
    block_norms,
    decoder_config,
    decoder_to_hf,
    outer_tensors,
    register,
)
from moejax.pretrained.mapping import (
    Tensor,
    experts,
    linear,
    row_vector,
    shared_expert,
    swiglu_mlp,
)

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def qwen_moe_fields(hf: HFConfig, **shared: object) -> dict:
    """The MoE and router fields Qwen2-MoE and Qwen3-MoE share."""
    hf.expect("use_sliding_window", False, False, "moejax's attention is full causal attention")
    return {
        "moe": MoEConfig(
            every=hf.get("decoder_sparse_step", 1),
            num_experts=hf.require("num_experts"),
            top_k=hf.require("num_experts_per_tok"),
            expert_d_ff=hf.require("moe_intermediate_size"),
            dense_layers=tuple(hf.get("mlp_only_layers", [])),
            **shared,
        ),
        "router": RouterConfig.of(
            "softmax_top_k", renormalize=bool(hf.get("norm_topk_prob", False))
        ),
    }


def qwen_moe_to_hf(config: ModelConfig) -> dict:
    moe = config.moe
    return {
        **decoder_to_hf(config),
        "decoder_sparse_step": moe.every,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_d_ff,
        "mlp_only_layers": list(moe.dense_layers),
        "norm_topk_prob": config.router.options.renormalize,
        "use_sliding_window": False,
    }


def qwen_moe_ffn(config: ModelConfig, layer: int) -> list[Tensor]:
    prefix, path = f"model.layers.{layer}.mlp", ("blocks", layer, "ffn")
    if not config.is_moe_layer(layer):
        return swiglu_mlp(path, prefix)
    table = [linear((*path, "router"), f"{prefix}.gate.weight")]
    table += experts(path, f"{prefix}.experts", config.moe.num_experts, EXPERT_NAMES)
    if config.moe.num_shared_experts:
        table += shared_expert(path, f"{prefix}.shared_expert")
        table.append(row_vector((*path, "shared_gate"), f"{prefix}.shared_expert_gate.weight"))
    return table


def to_config(hf: HFConfig) -> dict:
    shared_d_ff = hf.require("shared_expert_intermediate_size")
    shared = {
        "num_shared_experts": 1,
        "shared_expert_d_ff": shared_d_ff,
        "shared_expert_gate": True,
    }
    return {
        **decoder_config(hf),
        "qkv_bias": True,
        **qwen_moe_fields(hf, **(shared if shared_d_ff else {})),
    }


def to_hf(config: ModelConfig) -> dict:
    return {
        **qwen_moe_to_hf(config),
        "shared_expert_intermediate_size": config.moe.shared_expert_d_ff
        if config.moe.num_shared_experts
        else 0,
    }


def tensors(config: ModelConfig, hf: HFConfig) -> list:
    table = outer_tensors(config)
    for layer in range(config.num_layers):
        table += block_norms(layer) + attention_tensors(config, layer)
        table += qwen_moe_ffn(config, layer)
    return table


ARCHITECTURE = register(Architecture("qwen2_moe", "Qwen2MoeForCausalLM", to_config, to_hf, tensors))
