"""The architecture contract: an `Architecture` says how one Hugging Face `model_type` maps onto
moejax's `TransformerLM` (its config fields and its tensors), and the registry of them.

Every architecture here is a decoder of pre-norm blocks that moejax already builds; what differs
is config: biases, q/k norms, rope scaling, the router, shared experts, which layers are dense,
latent attention. So an architecture is a config translation plus a tensor table
(`moejax.pretrained.mapping`), not a model class. Adding one is a file that calls `register` and
an import line in `moejax.pretrained`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from moejax.attention import QK_NORMS
from moejax.config import ModelConfig
from moejax.errors import UserError
from moejax.pretrained.mapping import Tensor, bias, copy, copy_2d, experts, linear
from moejax.rotary import RopeScaling


class HFConfig:
    """A checkpoint's config.json, read with errors that name the file, the field and what is
    allowed."""

    def __init__(self, values: Mapping[str, Any], source: str = "config.json"):
        self.values, self.source = dict(values), source

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if self.values.get(key) is None:
            raise UserError(f"{self.source}: field {key!r} is missing; this architecture needs it")
        return self.values[key]

    def expect(self, key: str, allowed: Any, default: Any = None, why: str = "") -> None:
        """UserError unless the field (or `default` when absent) equals `allowed`."""
        value = self.get(key, default)
        if value != allowed:
            reason = f" ({why})" if why else ""
            raise UserError(
                f"{self.source}: field {key!r} is {value!r}; moejax loads only {allowed!r}{reason}"
            )


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture maps onto moejax.

    Attributes:
      model_type: config.json's "model_type" ("llama", "mixtral", ...).
      hf_class: the class config.json's "architectures" names ("LlamaForCausalLM").
      to_config: `HFConfig -> dict of ModelConfig fields` (shape, attention, MoE, router).
      to_hf: `ModelConfig -> dict of config.json fields`, the inverse, for export.
      tensors: `(ModelConfig, HFConfig) -> [Tensor]`, every moejax array and its checkpoint
        tensors.
    """

    model_type: str
    hf_class: str
    to_config: Callable[[HFConfig], dict[str, Any]]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    tensors: Callable[[ModelConfig, HFConfig], list[Tensor]]


ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    """Makes `architecture.model_type` loadable by `from_hf`; returns it."""
    if architecture.model_type in ARCHITECTURES:
        raise ValueError(f"architecture {architecture.model_type!r} is registered already")
    ARCHITECTURES[architecture.model_type] = architecture
    return architecture


def get(model_type: str, source: str = "config.json") -> Architecture:
    """The architecture of `model_type`; a UserError naming `source` and the supported ones."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported; moejax loads "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


# --- what the Llama family shares ---------------------------------------------------------

ROPE_FIELDS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_position",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "attention_factor": "attention_factor",
    "truncate": "truncate",
}


# A config.json's rope type -> moejax's `RopeScaling.kind`.
HF_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
# The fields of each kind a config.json states (transformers checks they are all there); a
# field whose value and default are 0 (unused) is left out.
ROPE_TYPE_FIELDS = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position", "low_freq_factor", "high_freq_factor"),
    "yarn": (
        "factor",
        "original_max_position",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ),
}


def rope(hf: HFConfig) -> tuple[float, RopeScaling]:
    """(rope base, scaling) from `rope_theta` + `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5)."""
    parameters = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **parameters}
    base = float(merged.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in HF_ROPE_TYPES:
        raise UserError(
            f"{hf.source}: rope type {rope_type!r} is not supported; moejax loads "
            f"{', '.join(HF_ROPE_TYPES)}"
        )
    kind = HF_ROPE_TYPES[rope_type]
    names = {ours: theirs for theirs, ours in ROPE_FIELDS.items()}
    fields = {
        field: merged[names[field]]
        for field in ROPE_TYPE_FIELDS[kind]
        if merged.get(names[field]) is not None
    }
    if rope_type == "yarn" and "original_max_position" in fields:
        # The reference derives YaRN's factor from the two context lengths when both are given.
        fields["factor"] = hf.require("max_position_embeddings") / fields["original_max_position"]
    return base, RopeScaling(kind=kind, **fields)


def rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    scaling, defaults = config.rope_scaling, RopeScaling()
    if not ROPE_TYPE_FIELDS[scaling.kind]:  # no stretch: stated as no rope_scaling block
        return {"rope_theta": config.rope_base, "rope_scaling": None}
    names = {ours: theirs for theirs, ours in ROPE_FIELDS.items()}
    block = {"rope_type": scaling.kind}
    for field in ROPE_TYPE_FIELDS[scaling.kind]:
        value = getattr(scaling, field)
        if field == "original_max_position":
            value = value or config.max_seq_len
        if value or getattr(defaults, field):
            block[names[field]] = value
    return {"rope_theta": config.rope_base, "rope_scaling": block}


def decoder_config(hf: HFConfig) -> dict[str, Any]:
    """The ModelConfig fields every Llama-family decoder shares."""
    hf.expect("hidden_act", "silu", "silu", "SwiGLU experts and MLPs")
    hf.expect("mlp_bias", False, False, "moejax's MLPs have no biases")
    heads = hf.require("num_attention_heads")
    d_model = hf.require("hidden_size")
    base, scaling = rope(hf)
    return {
        "vocab_size": hf.require("vocab_size"),
        "d_model": d_model,
        "num_layers": hf.require("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads", heads),
        "head_dim": hf.get("head_dim", d_model // heads),
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_base": base,
        "rope_scaling": scaling,
        "d_ff": hf.get("intermediate_size", 4 * d_model),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "scale_embedding": False,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    }


def decoder_to_hf(config: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "intermediate_size": config.d_ff,
        "tie_word_embeddings": config.tie_embeddings,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        **rope_to_hf(config),
    }


def outer_tensors(config: ModelConfig) -> list[Tensor]:
    """Embedding, final norm and (untied) output projection."""
    tensors = [
        copy_2d(("embedding",), "model.embed_tokens.weight"),
        copy(("final_norm", "scale"), "model.norm.weight"),
    ]
    if not config.tie_embeddings:
        tensors.append(linear(("unembedding",), "lm_head.weight"))
    return tensors


def attention_tensors(config: ModelConfig, layer: int) -> list[Tensor]:
    """Grouped-query attention of block `layer`, with its biases and q/k norms."""
    path, prefix = ("blocks", layer, "attention"), f"model.layers.{layer}.self_attn"
    tensors = [
        linear((*path, "w_q"), f"{prefix}.q_proj.weight", out_axes=2),
        linear((*path, "w_k"), f"{prefix}.k_proj.weight", out_axes=2),
        linear((*path, "w_v"), f"{prefix}.v_proj.weight", out_axes=2),
        linear((*path, "w_o"), f"{prefix}.o_proj.weight", out_axes=1),
    ]
    if config.qkv_bias:
        tensors += [bias((*path, f"b_{n}"), f"{prefix}.{n}_proj.bias") for n in "qkv"]
    if config.out_bias:
        tensors.append(bias((*path, "b_o"), f"{prefix}.o_proj.bias"))
    if QK_NORMS[config.qk_norm]:
        tensors += [copy((*path, f"{n}_norm"), f"{prefix}.{n}_norm.weight") for n in "qk"]
    return tensors


def block_norms(layer: int) -> list[Tensor]:
    prefix = f"model.layers.{layer}"
    return [
        copy(("blocks", layer, "attention_norm", "scale"), f"{prefix}.input_layernorm.weight"),
        copy(("blocks", layer, "ffn_norm", "scale"), f"{prefix}.post_attention_layernorm.weight"),
    ]


def routed_moe_tensors(config: ModelConfig, prefix: str, names: tuple[str, str, str]) -> list:
    """Every block of a model whose every layer is a routed MoE: norms, attention, the router
    `{layer prefix}.{prefix}.gate` and the experts `{...}.experts.{e}.{names}` (gate, up,
    down); `prefix` is the MoE module's name in a layer ("mlp", "block_sparse_moe")."""
    table = outer_tensors(config)
    for layer in range(config.num_layers):
        module, path = f"model.layers.{layer}.{prefix}", ("blocks", layer, "ffn")
        table += block_norms(layer) + attention_tensors(config, layer)
        table.append(linear((*path, "router"), f"{module}.gate.weight"))
        table += experts(path, f"{module}.experts", config.moe.num_experts, names)
    return table
