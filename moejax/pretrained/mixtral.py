"""Mixtral: Llama attention, every layer a softmax top-k MoE with renormalised weights."""

from __future__ import annotations

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.pretrained.architecture import (
    Architecture,
    HFConfig,
    decoder_config,
    decoder_to_hf,
    register,
    routed_moe_tensors,
)


def to_config(hf: HFConfig) -> dict:
    hf.expect("sliding_window", None, None, "moejax's attention is full causal attention")
    return {
        **decoder_config(hf),
        "moe": MoEConfig(
            every=1,
            num_experts=hf.require("num_local_experts"),
            top_k=hf.require("num_experts_per_tok"),
            expert_d_ff=hf.require("intermediate_size"),
        ),
        # Mixtral's softmax over the chosen experts' logits is the renormalised top-k softmax.
        "router": RouterConfig.of("softmax_top_k", renormalize=True),
    }


def to_hf(config: ModelConfig) -> dict:
    return {
        **decoder_to_hf(config),
        "intermediate_size": config.moe.expert_d_ff,
        "num_local_experts": config.moe.num_experts,
        "num_experts_per_tok": config.moe.top_k,
        "sliding_window": None,
    }


def tensors(config: ModelConfig, hf: HFConfig) -> list:
    return routed_moe_tensors(config, "block_sparse_moe", ("w1", "w3", "w2"))


ARCHITECTURE = register(Architecture("mixtral", "MixtralForCausalLM", to_config, to_hf, tensors))
