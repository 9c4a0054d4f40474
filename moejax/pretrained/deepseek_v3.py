"""DeepSeek-V3: multi-head latent attention, the group-limited sigmoid router with its
score-correction bias, shared experts, and dense first layers."""

from __future__ import annotations

import numpy as np

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.latent_attention import LatentAttentionConfig
from moejax.pretrained.architecture import (
    Architecture,
    HFConfig,
    block_norms,
    decoder_config,
    decoder_to_hf,
    outer_tensors,
    register,
)
from moejax.pretrained.mapping import (
    Tensor,
    copy,
    deinterleave,
    experts,
    linear,
    permuted_rows,
    shared_expert,
    swiglu_mlp,
)

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def to_config(hf: HFConfig) -> dict:
    hf.expect("attention_bias", False, False, "latent attention without biases")
    hf.expect("scoring_func", "sigmoid", "sigmoid", "DeepSeek-V3's router")
    hf.expect("moe_layer_freq", 1, 1, "every layer after the first dense ones is MoE")
    latent = LatentAttentionConfig(
        kv_lora_rank=hf.require("kv_lora_rank"),
        q_lora_rank=hf.get("q_lora_rank", 0),
        qk_nope_head_dim=hf.require("qk_nope_head_dim"),
        qk_rope_head_dim=hf.require("qk_rope_head_dim"),
        v_head_dim=hf.require("v_head_dim"),
    )
    shared = hf.get("n_shared_experts", 0)
    moe_d_ff = hf.require("moe_intermediate_size")
    fields = decoder_config(hf)
    return {
        **fields,
        # Unused by latent attention; set to values the config accepts.
        "num_kv_heads": fields["num_heads"],
        "head_dim": latent.qk_rope_head_dim,
        "latent_attention": latent,
        "moe": MoEConfig(
            every=1,
            num_experts=hf.require("n_routed_experts"),
            top_k=hf.require("num_experts_per_tok"),
            expert_d_ff=moe_d_ff,
            # n shared experts of width f are one SwiGLU of width n * f.
            num_shared_experts=1 if shared else 0,
            shared_expert_d_ff=shared * moe_d_ff,
            dense_layers=tuple(range(hf.get("first_k_dense_replace", 0))),
        ),
        "router": RouterConfig.of(
            "group_limited_sigmoid",
            renormalize=bool(hf.get("norm_topk_prob", True)),
            num_groups=hf.get("n_group", 1),
            top_groups=hf.get("topk_group", 1),
            scaling=float(hf.get("routed_scaling_factor", 1.0)),
        ),
    }


def to_hf(config: ModelConfig) -> dict:
    latent, moe, options = config.latent_attention, config.moe, config.router.options
    dense = sorted(moe.dense_layers)
    if dense != list(range(len(dense))):
        raise ValueError(f"DeepSeek-V3 keeps only its first layers dense; got dense_layers={dense}")
    fields = decoder_to_hf(config)
    fields.pop("head_dim")
    return {
        **fields,
        "kv_lora_rank": latent.kv_lora_rank,
        "q_lora_rank": latent.q_lora_rank or None,
        "qk_nope_head_dim": latent.qk_nope_head_dim,
        "qk_rope_head_dim": latent.qk_rope_head_dim,
        "v_head_dim": latent.v_head_dim,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_d_ff,
        "n_shared_experts": moe.shared_expert_d_ff // moe.expert_d_ff
        if moe.num_shared_experts
        else 0,
        "first_k_dense_replace": len(dense),
        "moe_layer_freq": 1,
        "n_group": options.num_groups,
        "topk_group": options.top_groups,
        "norm_topk_prob": options.renormalize,
        "routed_scaling_factor": options.scaling,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "attention_bias": False,
        "rope_interleave": True,
    }


def _rope_rows(heads: int, nope: int, rope: int, interleaved: bool) -> np.ndarray:
    """Row order of a projection whose `heads` blocks end in `rope` rotary features."""
    per_head = np.concatenate(
        [np.arange(nope), nope + (deinterleave(rope) if interleaved else np.arange(rope))]
    )
    return np.concatenate([h * (nope + rope) + per_head for h in range(heads)])


def attention(config: ModelConfig, layer: int, interleaved: bool) -> list[Tensor]:
    latent, heads = config.latent_attention, config.num_heads
    path, prefix = ("blocks", layer, "attention"), f"model.layers.{layer}.self_attn"
    q_rows = _rope_rows(heads, latent.qk_nope_head_dim, latent.qk_rope_head_dim, interleaved)
    kv_rows = _rope_rows(1, latent.kv_lora_rank, latent.qk_rope_head_dim, interleaved)
    if latent.q_lora_rank:
        table = [
            linear((*path, "w_q_a"), f"{prefix}.q_a_proj.weight"),
            copy((*path, "q_a_norm"), f"{prefix}.q_a_layernorm.weight"),
            permuted_rows(linear((*path, "w_q_b"), f"{prefix}.q_b_proj.weight", 2), q_rows),
        ]
    else:
        table = [permuted_rows(linear((*path, "w_q"), f"{prefix}.q_proj.weight", 2), q_rows)]
    return table + [
        permuted_rows(linear((*path, "w_kv_a"), f"{prefix}.kv_a_proj_with_mqa.weight"), kv_rows),
        copy((*path, "kv_a_norm"), f"{prefix}.kv_a_layernorm.weight"),
        linear((*path, "w_kv_b"), f"{prefix}.kv_b_proj.weight", 2),
        linear((*path, "w_o"), f"{prefix}.o_proj.weight", 1),
    ]


def ffn(config: ModelConfig, layer: int) -> list[Tensor]:
    prefix, path = f"model.layers.{layer}.mlp", ("blocks", layer, "ffn")
    if not config.is_moe_layer(layer):
        return swiglu_mlp(path, prefix)
    table = [
        linear((*path, "router"), f"{prefix}.gate.weight"),
        copy((*path, "router_state"), f"{prefix}.gate.e_score_correction_bias", "router_state"),
    ]
    table += experts(path, f"{prefix}.experts", config.moe.num_experts, EXPERT_NAMES)
    if config.moe.num_shared_experts:
        table += shared_expert(path, f"{prefix}.shared_experts")
    return table


def tensors(config: ModelConfig, hf: HFConfig) -> list:
    interleaved = bool(hf.get("rope_interleave", True))
    table = outer_tensors(config)
    for layer in range(config.num_layers):
        table += block_norms(layer) + attention(config, layer, interleaved) + ffn(config, layer)
    return table


ARCHITECTURE = register(
    Architecture("deepseek_v3", "DeepseekV3ForCausalLM", to_config, to_hf, tensors)
)
