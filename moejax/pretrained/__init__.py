"""Pretrained models: Hugging Face checkpoints into moejax's `TransformerLM` and back.

    from moejax.pretrained import from_hf, to_hf

    model, config = from_hf("path/to/olmoe")      # config.json + safetensors
    logits, _ = model(tokens, train=False)        # tokens [batch, length]
    to_hf(model, "out/", like="path/to/olmoe")    # transformers loads it

A checkpoint becomes moejax's own model (routers, dispatch, pruning, parallelism all apply), not
a copy of the reference code: each architecture is a config translation plus a tensor table
(`architecture.py`, one file per architecture, registered on import here).
"""

from moejax.pretrained import deepseek_v3, llama, mixtral, olmoe, qwen2_moe, qwen3_moe
from moejax.pretrained.architecture import ARCHITECTURES, Architecture, HFConfig, register
from moejax.pretrained.convert import config_from_hf, from_hf, load_state, to_hf

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "HFConfig",
    "config_from_hf",
    "deepseek_v3",
    "from_hf",
    "llama",
    "load_state",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "register",
    "to_hf",
]
