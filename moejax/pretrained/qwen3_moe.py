"""Qwen3-MoE: per-head q/k RMSNorm, softmax top-k with `norm_topk_prob`, no shared expert."""

from __future__ import annotations

from moejax.config import ModelConfig
from moejax.pretrained.architecture import (
    Architecture,
    HFConfig,
    attention_tensors,
    block_norms,
    decoder_config,
    outer_tensors,
    register,
)
from moejax.pretrained.qwen2_moe import qwen_moe_ffn, qwen_moe_fields, qwen_moe_to_hf


def to_config(hf: HFConfig) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return {
        **decoder_config(hf),
        "qkv_bias": bias,
        "out_bias": bias,
        "qk_norm": "per_head",
        **qwen_moe_fields(hf),
    }


def to_hf(config: ModelConfig) -> dict:
    return {**qwen_moe_to_hf(config), "attention_bias": config.qkv_bias}


def tensors(config: ModelConfig, hf: HFConfig) -> list:
    table = outer_tensors(config)
    for layer in range(config.num_layers):
        table += block_norms(layer) + attention_tensors(config, layer)
        table += qwen_moe_ffn(config, layer)
    return table


ARCHITECTURE = register(Architecture("qwen3_moe", "Qwen3MoeForCausalLM", to_config, to_hf, tensors))
