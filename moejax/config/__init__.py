"""Typed experiment configuration: frozen dataclasses, CLI overrides, and validation.

A config is six groups (`model`, `attention`, `data`, `mesh`, `train`, `pruning`); `model` holds
the subgroups `moe`, `router` (with the router's typed `options`) and `depth`; `attention` holds
the attention kind's typed `options`. Config files in
`configs/` define `get_config() -> Config`; the command line overrides single fields with
`--config.model.moe.num_experts=8`. Every group checks its own fields when built and `validate`
checks what spans groups and the devices, before anything is compiled; both raise `ConfigError`
naming the field, the value and what is allowed.
"""

from moejax.config.groups import Config, DataConfig, MeshConfig, TrainConfig, describe
from moejax.config.loading import (
    apply_overrides,
    config_of,
    flat_fields,
    from_dict,
    load_config_file,
    load_config_module,
    load_json,
    save_json,
    to_dict,
    to_json,
    with_fields,
)
from moejax.config.model import (
    DTYPES,
    DepthConfig,
    DispatchConfig,
    ModelConfig,
    MoEConfig,
    RouterConfig,
)
from moejax.config.validation import validate, validate_attention, validate_mesh
from moejax.errors import ConfigError
from moejax.pruning.config import LMPruningConfig
from moejax.sparse_attention.config import AttentionConfig

__all__ = [
    "DTYPES",
    "AttentionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DepthConfig",
    "LMPruningConfig",
    "MeshConfig",
    "MoEConfig",
    "ModelConfig",
    "DispatchConfig",
    "RouterConfig",
    "TrainConfig",
    "apply_overrides",
    "config_of",
    "describe",
    "flat_fields",
    "from_dict",
    "load_config_file",
    "load_config_module",
    "load_json",
    "save_json",
    "to_dict",
    "to_json",
    "validate",
    "validate_attention",
    "validate_mesh",
    "with_fields",
]
