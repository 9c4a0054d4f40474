"""OLMoE: every layer MoE, q/k RMSNorm across all heads, softmax top-k (`norm_topk_prob`)."""

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

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def to_config(hf: HFConfig) -> dict:
    hf.expect("clip_qkv", None, None, "clipping queries, keys and values is not built")
    bias = bool(hf.get("attention_bias", False))
    return {
        **decoder_config(hf),
        "qkv_bias": bias,
        "out_bias": bias,
        "qk_norm": "across_heads",
        "moe": MoEConfig(
            every=1,
            num_experts=hf.require("num_experts"),
            top_k=hf.require("num_experts_per_tok"),
            expert_d_ff=hf.require("intermediate_size"),
        ),
        "router": RouterConfig.of(
            "softmax_top_k", renormalize=bool(hf.get("norm_topk_prob", False))
        ),
    }


def to_hf(config: ModelConfig) -> dict:
    return {
        **decoder_to_hf(config),
        "attention_bias": config.qkv_bias,
        "intermediate_size": config.moe.expert_d_ff,
        "num_experts": config.moe.num_experts,
        "num_experts_per_tok": config.moe.top_k,
        "norm_topk_prob": config.router.options.renormalize,
        "clip_qkv": None,
    }


def tensors(config: ModelConfig, hf: HFConfig) -> list:
    return routed_moe_tensors(config, "mlp", EXPERT_NAMES)


ARCHITECTURE = register(Architecture("olmoe", "OlmoeForCausalLM", to_config, to_hf, tensors))
