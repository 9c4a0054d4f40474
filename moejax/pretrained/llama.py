"""Llama (dense, grouped-query attention, rope scaling, tied or untied embeddings)."""

from __future__ import annotations

from moejax.config import ModelConfig, MoEConfig
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
from moejax.pretrained.mapping import swiglu_mlp


def to_config(hf: HFConfig) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return {
        **decoder_config(hf),
        "qkv_bias": bias,
        "out_bias": bias,
        "moe": MoEConfig(every=0),
    }


def to_hf(config: ModelConfig) -> dict:
    return {**decoder_to_hf(config), "attention_bias": config.qkv_bias, "mlp_bias": False}


def tensors(config: ModelConfig, hf: HFConfig) -> list:
    table = outer_tensors(config)
    for layer in range(config.num_layers):
        table += block_norms(layer) + attention_tensors(config, layer)
        table += swiglu_mlp(("blocks", layer, "ffn"), f"model.layers.{layer}.mlp")
    return table


ARCHITECTURE = register(Architecture("llama", "LlamaForCausalLM", to_config, to_hf, tensors))
